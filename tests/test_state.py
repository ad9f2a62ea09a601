"""Unit tests of the state objects (exporter/state.py): histograms and the shutdown history."""
from __future__ import annotations

import json
import logging
import os

import pytest

from exporter.state import (
    CONNECT_DURATION_BUCKETS,
    SHUTDOWN_DURATION_BUCKETS,
    ConnectDurations,
    HistogramData,
    ShutdownHistory,
)

pytestmark = pytest.mark.timeout(10)

def test_histogram_value_on_a_bound_goes_in_that_bucket():
    h = HistogramData((1.0, 2.0, 5.0))
    for v in (0.5, 1.0, 1.0000001, 2.0, 5.0, 5.1, 100.0):
        h.observe(v)
    # Non-cumulative: le=1 -> {0.5, 1.0}; le=2 -> {1.0000001, 2.0}; le=5 -> {5.0}; +Inf -> 2.
    assert h.counts == [2, 2, 1, 2]
    assert h.count == 7 and h.sum == pytest.approx(114.6000001)
    assert h.cumulative() == [("1.0", 2), ("2.0", 4), ("5.0", 5), ("+Inf", 7)]


def test_histogram_empty_and_shutdown_bounds():
    h = HistogramData(SHUTDOWN_DURATION_BUCKETS)
    assert [le for le, _ in h.cumulative()] == [
        "0.05", "0.1", "0.25", "0.5", "0.75", "1.0", "2.0", "5.0", "10.0", "+Inf"]
    assert all(n == 0 for _, n in h.cumulative())
    h.observe(1.0)  # exactly the alerting threshold: counted as "within 1 s"
    assert dict(h.cumulative())["1.0"] == 1 and dict(h.cumulative())["0.75"] == 0


def test_shutdown_history_round_trip(tmp_path):
    fresh = ShutdownHistory.load(str(tmp_path))
    assert fresh.histogram.count == 0 and fresh.last_timed_out is False
    assert fresh.last_duration is None
    fresh.record(0.3, False)
    fresh.record(1.0, False)
    fresh.record(7.5, True)
    loaded = ShutdownHistory.load(str(tmp_path))
    assert loaded.histogram.counts == fresh.histogram.counts
    assert loaded.histogram.count == 3
    assert loaded.histogram.sum == pytest.approx(8.8)
    assert loaded.last_timed_out is True and loaded.last_duration == 7.5
    assert dict(loaded.histogram.cumulative())["1.0"] == 2
    # And it keeps accumulating across "restarts".
    loaded.record(0.1, False)
    again = ShutdownHistory.load(str(tmp_path))
    assert again.histogram.count == 4 and again.last_timed_out is False


def test_shutdown_history_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    state_dir = tmp_path / "state" / "nested"  # created on demand
    h = ShutdownHistory.load(str(state_dir))
    for i in range(5):
        h.record(0.01 * i, False)
        assert sorted(os.listdir(state_dir)) == [ShutdownHistory.FILENAME]
    data = json.loads((state_dir / ShutdownHistory.FILENAME).read_text())
    assert data["count"] == 5 and data["bounds"] == list(SHUTDOWN_DURATION_BUCKETS)


def test_shutdown_history_failed_write_cleans_up_its_temp_file(tmp_path):
    h = ShutdownHistory.load(str(tmp_path))
    # The target path is a directory: os.replace fails after the temp file was written.
    (tmp_path / ShutdownHistory.FILENAME).mkdir()
    (tmp_path / ShutdownHistory.FILENAME / "x").write_text("keep me non-empty")
    with pytest.raises(OSError):
        h.record(0.2, False)
    assert sorted(os.listdir(tmp_path)) == [ShutdownHistory.FILENAME]


GOOD_FILE = {"bounds": list(SHUTDOWN_DURATION_BUCKETS), "counts": [0] * 10, "sum": 0.0,
             "count": 0, "last_timed_out": False}


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        "[]",
        "null",
        json.dumps({**GOOD_FILE, "bounds": [1, 2, 3]}),
        json.dumps({**GOOD_FILE, "counts": [1, 2, 3]}),
        json.dumps({k: v for k, v in GOOD_FILE.items() if k != "sum"}),
        json.dumps({**GOOD_FILE, "sum": "abc"}),
        b"\xff\xfe\x00garbage",
    ],
    ids=["bad-json", "empty", "list", "null", "bounds-changed", "wrong-bucket-count",
         "missing-key", "sum-not-a-number", "not-utf8"],
)
def test_corrupt_shutdown_history_gives_fresh_history_with_a_warning(tmp_path, caplog, content):
    path = tmp_path / ShutdownHistory.FILENAME
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with caplog.at_level(logging.WARNING, logger="exporter.state"):
        h = ShutdownHistory.load(str(tmp_path))
    assert h.histogram.count == 0 and h.histogram.counts == [0] * 10
    assert h.last_timed_out is False
    assert any(r.levelno == logging.WARNING and str(path) in r.getMessage() for r in caplog.records), \
        caplog.text
    # The fresh history can be recorded over the corrupt file.
    h.record(0.2, False)
    assert ShutdownHistory.load(str(tmp_path)).histogram.count == 1


def test_shutdown_history_with_non_numeric_counts_is_treated_as_corrupt(tmp_path, caplog):
    (tmp_path / ShutdownHistory.FILENAME).write_text(
        json.dumps({**GOOD_FILE, "counts": ["0"] * 10}))
    with caplog.at_level(logging.WARNING, logger="exporter.state"):
        h = ShutdownHistory.load(str(tmp_path))
    h.histogram.cumulative()  # what every scrape does
    assert h.histogram.counts == [0] * 10


# =========================================================================== metrics


def test_connect_durations_keep_the_last_and_feed_the_shared_histogram():
    durations = ConnectDurations()
    assert (durations.last, durations.count) == (None, 0)
    durations.observe(0.2)  # not linked to a broker yet: its own buckets only
    shared = HistogramData(CONNECT_DURATION_BUCKETS)
    durations.shared = shared
    durations.observe(0.01)
    assert (durations.last, durations.count, shared.count) == (0.01, 2, 1)
    assert dict(shared.cumulative())["0.01"] == 1
