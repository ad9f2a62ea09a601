"""Grafana dashboards in dashboards/*.json: structure offline, every query on a live Prometheus.

No Grafana runs here, so the JSON is checked two ways:

- structure: the classic dashboard schema basics, unique panel ids, a non-overlapping
  gridPos inside 24 columns, the ``datasource`` template variable used by every panel and
  every target (no hard-coded datasource uid, no ``${DS_...}`` import input: those only work
  in the UI import wizard, not in file provisioning), unique refIds, ``$__rate_interval`` in
  every rate()/increase(), only known template variables;
- live: a real Mosquitto, an exporter with four sites (one receiving messages, one on a dead
  port, one kicked by a scripted MQTT 5 peer with "Session taken over", one disabled),
  restarted once so the persisted shutdown histogram has data, and a real Debian Prometheus
  scraping it every second. Every panel query (and the two variable queries) is evaluated
  the way Grafana would send it, with the template variables substituted: no query may
  error, every panel returns data (except the few listed in ``MAY_BE_EMPTY``, with the
  reason), and the core panels return the expected values.
"""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from tests.support import HOST, REPO_ROOT, free_port, mqtt_client, site, wait_until

DASHBOARD_DIR = REPO_ROOT / "dashboards"
DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))
OVERVIEW = DASHBOARD_DIR / "mqtt-site-exporter-overview.json"

DS_REF = {"type": "prometheus", "uid": "${datasource}"}
GRID_COLUMNS = 24
#: Grafana's global variables a query may use, besides the dashboard's own variables.
BUILTIN_VARS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s",
                "__range_ms", "__from", "__to", "__dashboard", "__name", "__org", "__user"}
VAR_RE = re.compile(r"\$(?:\{(\w+)(?::[\w]+)?\}|(\w+))")
RATE_FUNCS = ("rate", "irate", "increase")

#: Scrape interval of the test Prometheus: 1 s. Grafana's $__rate_interval is
#: max($__interval + scrape interval, 4 x scrape interval) with the datasource's configured
#: scrape interval (15 s by default), i.e. 1m: what a default Grafana would send.
RATE_INTERVAL = "1m"
RANGE_SECONDS = 120
RANGE_STEP = "2s"


def load(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def all_panels(dashboard: dict) -> list[dict]:
    """Top-level panels plus those nested in collapsed rows."""
    out = []
    for p in dashboard.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def query_panels(dashboard: dict) -> list[dict]:
    return [p for p in all_panels(dashboard) if p.get("targets")]


def variables(dashboard: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def walk(node, path="$"):
    """Yield (json path, key, value) for every key of every object in ``node``."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def call_args(expr: str, func: str) -> list[str]:
    """The argument text of every call of ``func`` in ``expr`` (balanced parentheses)."""
    out = []
    for m in re.finditer(rf"(?<![\w:]){func}\s*\(", expr):
        depth, i = 1, m.end()
        while depth and i < len(expr):
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            i += 1
        assert depth == 0, f"unbalanced parentheses after {func}( in {expr!r}"
        out.append(expr[m.end():i - 1])
    return out


def used_vars(text: str) -> set[str]:
    return {a or b for a, b in VAR_RE.findall(text)}


def dashboard_ids(paths):
    return [p.name for p in paths]


# --------------------------------------------------------------------------- structure


@pytest.mark.timeout(10)
def test_dashboards_exist():
    assert OVERVIEW in DASHBOARDS, f"{OVERVIEW} missing; found {DASHBOARDS}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", DASHBOARDS, ids=dashboard_ids(DASHBOARDS))
def test_schema_basics(path):
    d = load(path)
    assert d.get("id") is None, "id must be null: Grafana assigns it on import"
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d.get("uid") or ""), d.get("uid")
    assert d.get("title"), "title"
    assert isinstance(d.get("schemaVersion"), int) and d["schemaVersion"] >= 36
    assert isinstance(d.get("tags"), list) and d["tags"]
    assert d.get("time", {}).get("from") and d["time"].get("to")
    assert isinstance(d.get("panels"), list) and d["panels"]
    assert isinstance(d.get("templating", {}).get("list"), list)
    assert "__inputs" not in d and "__requires" not in d, \
        "export for sharing externally: ${DS_...} inputs break file provisioning"
    titles = [p.get("title") for p in all_panels(d) if p.get("type") != "row"]
    assert all(titles), "every panel needs a title"
    assert len(titles) == len(set(titles)), f"duplicate panel titles: {titles}"
    uids = [load(p).get("uid") for p in DASHBOARDS]
    assert uids.count(d["uid"]) == 1, f"uid {d['uid']} used by several dashboards"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", DASHBOARDS, ids=dashboard_ids(DASHBOARDS))
def test_panel_ids_and_grid(path):
    d = load(path)
    panels = all_panels(d)
    ids = [p.get("id") for p in panels]
    assert all(isinstance(i, int) and i > 0 for i in ids), ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    for p in panels:
        assert p.get("type"), f"panel {p['id']} has no type"
        g = p.get("gridPos")
        assert g is not None, f"panel {p['id']} {p.get('title')!r} has no gridPos"
        for k in ("x", "y", "w", "h"):
            assert isinstance(g.get(k), int) and g[k] >= 0, (p["id"], g)
        assert g["w"] > 0 and g["h"] > 0, (p["id"], g)
        assert g["x"] + g["w"] <= GRID_COLUMNS, f"panel {p['id']} {p['title']!r}: {g}"
    # Visible panels must not overlap (Grafana would push them around).
    visible = list(d["panels"])
    cells: dict[tuple[int, int], int] = {}
    for p in visible:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                other = cells.setdefault((x, y), p["id"])
                assert other == p["id"], f"panels {other} and {p['id']} overlap at {(x, y)}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", DASHBOARDS, ids=dashboard_ids(DASHBOARDS))
def test_datasource_variable_used_everywhere(path):
    d = load(path)
    vs = variables(d)
    ds = vs.get("datasource")
    assert ds is not None, "no 'datasource' template variable"
    assert ds["type"] == "datasource" and ds["query"] == "prometheus", ds
    # Default: the datasource the Docker stack provisions (uid prometheus, name Prometheus).
    assert ds.get("current", {}).get("value") == "prometheus", ds.get("current")
    assert ds["current"].get("text") == "Prometheus", ds.get("current")

    for p in all_panels(d):
        if p.get("type") == "row" and "datasource" not in p:
            assert not p.get("targets"), f"row {p['id']} has targets"
            continue
        assert p.get("datasource") == DS_REF, f"panel {p['id']} {p.get('title')!r}: " \
                                              f"{p.get('datasource')}"
        for t in p.get("targets", []):
            assert t.get("datasource") == DS_REF, f"panel {p['id']} target {t.get('refId')}"
    for v in vs.values():
        if v["type"] == "query":
            assert v.get("datasource") == DS_REF, f"variable {v['name']}: {v.get('datasource')}"
    for a in d.get("annotations", {}).get("list", []):
        assert a.get("datasource") == DS_REF or a.get("builtIn") == 1, a

    # No datasource uid anywhere but the variable (the top-level uid is the dashboard's own).
    text = json.dumps(d)
    assert "${DS_" not in text and "$DS_" not in text
    for where, key, value in walk(d):
        if key == "uid" and where != "$":
            assert value == "${datasource}", f"{where}.uid = {value!r}"
        if key == "datasource" and isinstance(value, str):
            raise AssertionError(f"{where}.datasource is a plain string {value!r} (legacy "
                                 f"name reference)")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", DASHBOARDS, ids=dashboard_ids(DASHBOARDS))
def test_template_variables(path):
    d = load(path)
    vs = variables(d)
    for name in ("instance", "site"):
        v = vs.get(name)
        assert v is not None, f"no '{name}' variable"
        assert v["type"] == "query" and v.get("multi") is True and v.get("includeAll") is True, v
    assert vs["instance"]["query"] == "label_values(mqtt_exporter_build_info, instance)"
    assert vs["site"]["query"] == 'label_values(mqtt_site_info{instance=~"$instance"}, site)'
    # Variables are defined before they are used (Grafana resolves them in order).
    order = [v["name"] for v in d["templating"]["list"]]
    assert order.index("instance") < order.index("site")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", DASHBOARDS, ids=dashboard_ids(DASHBOARDS))
def test_targets_refids_rates_and_variables(path):
    d = load(path)
    known = set(variables(d)) | BUILTIN_VARS
    for p in query_panels(d):
        refs = [t.get("refId") for t in p["targets"]]
        assert all(refs) and len(refs) == len(set(refs)), f"panel {p['id']}: refIds {refs}"
        for t in p["targets"]:
            expr = t.get("expr", "")
            where = f"panel {p['id']} {p['title']!r} {t['refId']}"
            assert expr.strip(), f"{where}: empty expr"
            assert used_vars(expr) <= known, f"{where}: unknown variable in {expr!r}"
            for func in RATE_FUNCS:
                for arg in call_args(expr, func):
                    ranges = re.findall(r"\[[^\]]*\]", arg)
                    assert ranges == ["[$__rate_interval]"], \
                        f"{where}: {func}() must use [$__rate_interval], got {ranges} in {expr!r}"
            # Every per-site query filters by the dashboard's site selection.
            if "mqtt_site_" in expr:
                for sel in re.findall(r"mqtt_site_\w+\{([^}]*)\}", expr):
                    assert 'site=~"$site"' in sel and 'instance=~"$instance"' in sel, \
                        f"{where}: selector {{{sel}}} ignores $site/$instance"
            elif ("mqtt_exporter_" in expr or "mqtt_broker_" in expr or "process_" in expr
                  or re.search(r"\bup\b", expr)):
                assert 'instance=~"$instance"' in expr, f"{where}: ignores $instance"


# --------------------------------------------------------------------------- live


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace ``$name``/``${name}``/``${name:fmt}`` the way Grafana interpolates them."""

    def repl(m):
        name = m.group(1) or m.group(2)
        if name not in values:
            raise AssertionError(f"no test value for ${name} in {expr!r}")
        return values[name]

    return VAR_RE.sub(repl, expr)


def regex_all(values: list[str]) -> str:
    """Grafana's "All" of a multi-value variable without allValue: (v1|v2), regex-escaped."""
    return "(" + "|".join(re.sub(r"([\\.^$*+?()\[\]{}|])", r"\\\\\1", v) for v in values) + ")"


def label_values(prom, metric_selector: str, label: str) -> list[str]:
    """Grafana's label_values(selector, label): the series API over the dashboard range."""
    end = time.time()
    series = prom.api("series", **{"match[]": metric_selector, "start": end - 3600, "end": end})
    return sorted({s[label] for s in series if label in s})


#: Panels that may legitimately return no series at the moment of evaluation, and why.
MAY_BE_EMPTY: dict[str, str] = {
    "Connect latency": "the mean is drawn only where connects happened in the window; here "
                       "every connect happens at start-up, before Prometheus sees the "
                       "histogram move (the quantiles are NaN then, not absent)",
}


class Publisher:
    """A plain paho client publishing to one site's topic every ``period`` s until stopped."""

    def __init__(self, broker, topic: str, period: float = 0.2):
        self.topic, self.period = topic, period
        self.sent = 0
        self._stop = threading.Event()
        self._client = mqtt_client(broker, client_id=f"dash-pub-{free_port()}")
        self._client.connect(broker.host, broker.port, keepalive=30)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.period):
            self._client.publish(self.topic, json.dumps({"n": self.sent, "t": time.time()}))
            self.sent += 1

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()


def values_of(result: list[dict]) -> list[float]:
    out = []
    for s in result:
        if "value" in s:
            out.append(float(s["value"][1]))
        else:
            out.extend(float(v) for _, v in s.get("values", []))
    return out


def instant(prom, expr: str) -> dict[str, float]:
    """{site or '': value} of an instant query."""
    return {s["metric"].get("site", ""): float(s["value"][1]) for s in prom.query(expr)}


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_every_panel_query_on_live_prometheus(broker, fake_v5_factory, exporter_factory,
                                              prometheus_factory):
    t_start = time.monotonic()
    # "Session taken over" 5 s after every CONNACK: late enough that Prometheus scrapes the
    # restarted exporter before the kick, so the takeover and cooldown counters move under
    # its eyes (a counter that is already 1 at the first scrape has a rate of 0).
    fake = fake_v5_factory(kick_after=5.0)
    sites = [
        site("alpha", broker),                                     # receives messages
        {"name": "dead", "host": HOST, "port": free_port()},        # nothing listens: refused
        {"name": "dup", "host": HOST, "port": fake.port, "protocol": "5"},  # takeover, cooldown
        site("off", broker, enabled=False),                         # disabled
    ]
    env = {"MQTT_COOLDOWN_SECONDS": "300", "MQTT_STABLE_SECONDS": "3",
           "MQTT_BACKOFF_MIN_SECONDS": "0.5", "MQTT_BACKOFF_MAX_SECONDS": "2",
           "MQTT_CONNECT_TIMEOUT": "2", "MQTT_SHUTDOWN_TIMEOUT": "2"}
    exp = exporter_factory(sites, instance_id="dash", env=env).wait_ready()
    target = f"{HOST}:{exp.port}"
    prom = prometheus_factory([target])
    wait_until(lambda: instant(prom, 'up{job="mqtt-site-exporter"}') == {"": 1.0}, 30,
               interval=0.2, message="first scrapes of the exporter")

    # One restart on the same port and state dir: the shutdown histogram gets one sample.
    first_pid = exp.pid
    exp.terminate()
    assert exp.wait_exit(15) == 0, exp.log_tail()
    exp.start().wait_ready()
    assert exp.pid != first_pid and exp.port == int(target.rsplit(":", 1)[1])

    publisher = Publisher(broker, "alpha/telemetry/temp")
    try:
        checks = {
            "shutdown recorded": "mqtt_exporter_shutdown_duration_seconds_count >= 1",
            "alpha messages": 'rate(mqtt_site_messages_received_total{site="alpha"}[1m]) > 0',
            "alpha last message": 'mqtt_site_last_message_timestamp_seconds{site="alpha"} > 0',
            "dead refused": 'mqtt_site_disconnects_total{site="dead", reason="refused"} > 0',
            "dup takeover": 'increase(mqtt_site_disconnects_total{site="dup", '
                            'reason="takeover"}[2m]) > 0',
            "dup cooldown": 'mqtt_site_cooldown_remaining_seconds{site="dup"} > 0',
            "restart seen": "changes(process_start_time_seconds[5m]) >= 1",
            "samples": 'count_over_time(mqtt_site_up{site="alpha"}[1m]) >= 5',
        }
        pending: dict[str, str] = {}

        def ready():
            pending.clear()
            pending.update({k: q for k, q in checks.items() if not prom.query(q)})
            return not pending

        wait_until(ready, 60, interval=0.25, message=f"Prometheus data: missing {pending}")
        t_ready = time.monotonic()
        assert publisher.sent > 0

        metric_names = set(re.findall(r"^(\w+)", exp.metrics_text(), re.M))
        d = load(OVERVIEW)
        vs = variables(d)

        # The variable queries, as Grafana runs them.
        instances = label_values(prom, "mqtt_exporter_build_info", "instance")
        assert instances == [target]
        inst_value = regex_all(instances)
        site_q = substitute(vs["site"]["query"], {"instance": inst_value})
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", site_q)
        assert m, site_q
        assert label_values(prom, m[1], m[2]) == ["alpha", "dead", "dup", "off"]

        values = {"datasource": "prometheus", "instance": inst_value,
                  "site": vs["site"].get("allValue") or regex_all(["alpha", "dead", "dup", "off"]),
                  "__rate_interval": RATE_INTERVAL, "__interval": RANGE_STEP,
                  "__range": f"{RANGE_SECONDS}s"}
        results: dict[tuple[str, str], list[dict]] = {}
        empty = []
        for p in query_panels(d):
            for t in p["targets"]:
                expr = substitute(t["expr"], values)
                for name in re.findall(r"\b((?:mqtt|process)_\w+?)(?:_bucket|_sum|_count)?\b",
                                       expr):
                    assert any(n == name or n.startswith(name) for n in metric_names), \
                        f"{p['title']!r}: {name} is not exported"
                if t.get("instant"):
                    res = prom.query(expr)  # raises on any API error
                else:
                    res = prom.query_range(expr, seconds=RANGE_SECONDS, step=RANGE_STEP)
                results[(p["title"], t["refId"])] = res
                # A division by zero shows up as +-Inf; NaN only where a histogram has no
                # observations in the window (histogram_quantile over zero rates).
                for v in values_of(res):
                    assert v not in (float("inf"), float("-inf")), \
                        f"{p['title']!r} {t['refId']}: {v} from {expr}"
                    assert v == v or "histogram_quantile" in expr, \
                        f"{p['title']!r} {t['refId']}: NaN from {expr}"
                if not res:
                    empty.append((p["title"], t["refId"], expr))
        t_eval = time.monotonic()
        allowed = [e for e in empty if e[0] in MAY_BE_EMPTY]
        assert not [e for e in empty if e not in allowed], "panels without data:\n" + \
            "\n".join(map(str, empty))

        # Core panels: the values are the ones the exporter has right now.
        def one(title, ref="A"):
            return {s["metric"].get("site", s["metric"].get("instance", "")): float(s["value"][1])
                    for s in results[(title, ref)]}

        assert one("Sites connected") == {"": 1.0}
        assert one("Sites connected", "B") == {"": 4.0}
        assert one("Enabled sites not connected") == {"": 2.0}  # dead + dup; off is disabled
        status = one("Site status")
        assert status["alpha"] == 1 and status["dup"] == 4 and status["off"] == 5, status
        assert status["dead"] in (2, 3), status  # connecting or backoff
        timeline = {s["metric"]["site"]: values_of([s]) for s in results[("Site state timeline",
                                                                          "A")]}
        assert set(timeline) == {"alpha", "dead", "dup", "off"}
        assert timeline["alpha"][-1] == 1
        reasons = {s["metric"].get("reason") for s in
                   results[("Connects and disconnects by reason", "B")]}
        assert reasons == {"takeover", "connection_lost", "keepalive_timeout", "refused",
                           "normal"}
        # Connects happen at start-up only (before Prometheus sees the counter move), the dead
        # site adds a refused attempt every backoff.
        refused = [s for s in results[("Connects and disconnects by reason", "B")]
                   if s["metric"]["reason"] == "refused"]
        assert max(values_of(refused)) > 0
        assert max(values_of(results[("Connects and disconnects by reason", "C")])) > 0
        takeovers = {s["metric"]["site"]: max(values_of([s])) for s in
                     results[("Takeovers and cooldowns per site", "A")]}
        assert takeovers["dup"] > 0 and takeovers["alpha"] == 0, takeovers
        cooldown = {s["metric"]["site"] for s in results[("Cooldown remaining", "A")]}
        assert cooldown == {"dup"}
        rates = {s["metric"]["site"]: values_of([s])[-1] for s in
                 results[("Messages per second per site", "A")]}
        assert rates["alpha"] > 0 and rates["dead"] == 0, rates
        # The per-broker connect histogram is filtered to the selected sites' endpoints; the
        # slowest last connect of a selected site is always drawn.
        assert 0 < values_of(results[("Connect latency", "E")])[-1] < 5
        silence = one("Time since last message")
        assert set(silence) == {"alpha"} and 0 <= silence["alpha"] < 30, silence
        buckets = {s["metric"]["le"]: float(s["value"][1])
                   for s in results[("Shutdown duration histogram", "A")]}
        assert buckets["+Inf"] == 1.0 and buckets["1.0"] == 1.0, buckets
        assert one("Shutdowns") == {target: 1.0}
        assert one("Shutdowns", "C") == {target: 0.0}  # none over 1 s
        assert 0 < one("Shutdowns", "B")[target] < 1
        assert one("Last shutdown timed out") == {target: 0.0}
        assert one("Exporter up") == {target: 1.0}
        build = results[("Build info", "A")]
        assert [(s["metric"]["instance"], s["metric"]["instance_id"]) for s in build] == \
            [(target, "dash")]
        # Duplicates and broker events: every site has a gauge (0 or 1); one broker endpoint per
        # distinct host:port, counting enabled sites only (the disabled "off" shares alpha's).
        dup = {s["metric"]["site"]: float(s["value"][1])
               for s in results[("Duplicate instance per site", "A")]}
        assert set(dup) == {"alpha", "dead", "dup", "off"} and dup["alpha"] == 0, dup
        assert one("Sites with a duplicate instance") == {"": sum(dup.values())}
        configured = {s["metric"]["broker"]: values_of([s])[-1]
                      for s in results[("Broker sites connected vs configured", "B")]}
        assert configured == {f"{HOST}:{broker.port}": 1.0,
                              f"{HOST}:{sites[1]['port']}": 1.0,
                              f"{HOST}:{fake.port}": 1.0}, configured
        connected = {s["metric"]["broker"]: values_of([s])[-1]
                     for s in results[("Broker sites connected vs configured", "A")]}
        assert connected[f"{HOST}:{broker.port}"] == 1.0, connected
        assert connected[f"{HOST}:{sites[1]['port']}"] == 0.0, connected
        losses = values_of(results[("Broker connection losses", "A")])
        assert losses and max(losses) == 0, losses  # no broker has two sites here
        info = {s["metric"]["site"]: s["metric"] for s in results[("Sites", "A")]}
        assert info["alpha"]["client_id"] == "alpha_idash" and info["dup"]["protocol"] == "5"
        print(f"\ndashboard live test: setup+data {t_ready - t_start:.1f}s, "
              f"{len(results)} queries evaluated in {t_eval - t_ready:.2f}s, "
              f"empty (allowed): {[(t, r) for t, r, _ in allowed]}")
    finally:
        publisher.close()
