"""Benchmarks of mqtt-site-exporter: ``python -m bench [--quick] [--runs N] [--only NAME]``.

``BENCHMARKS`` is the registry: name -> function taking a :class:`bench.common.BenchContext`
and returning a :class:`bench.common.BenchResult`. To add one, write ``bench/<name>.py``
with a ``run(ctx)`` function and add it here. Results go to ``.bench/results.md``
(untracked); ``make bench-update`` rewrites the committed ``bench/results.md`` on purpose.
"""
from __future__ import annotations

from collections.abc import Callable

from . import bridge, duplicates, faults, kill_offline, reload, scale, scrape, shutdown
from .common import BenchContext, BenchResult

BENCHMARKS: dict[str, Callable[[BenchContext], BenchResult]] = {
    "shutdown": shutdown.run,
    "kill_offline": kill_offline.run,
    "bridge": bridge.run,
    "scrape": scrape.run,
    "duplicates": duplicates.run,
    "faults": faults.run,
    "reload": reload.run,
    "scale": scale.run,
}
