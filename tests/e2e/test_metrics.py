"""The monitoring deliverables against a real mirror: /metrics counts what really happened, a real
Prometheus scrapes it and answers every query of the Grafana dashboard, promtool accepts both
prometheus.yml and the exposition, and compose.yaml, grafana/ and prometheus.yml fit together.

Counters are checked against the upstream's own access log (distribution), so a number on the
dashboard is the number of requests that really reached Docker Hub (or did not)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirror.server.metrics import Metrics
from tests.e2e.conftest import require
from tests.support.clients import skopeo_copy
from tests.support.compose import load_compose
from tests.support.images import Layout
from tests.support.procs import REPO_ROOT, Distribution, Mirror, free_port, http, mirror_config, wait_for
from tests.support.prometheus import PROMETHEUS, PROMTOOL, Prometheus, PromQLError, Samples, finite, promtool

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

DASHBOARD = REPO_ROOT / "grafana" / "dashboards" / "mirror.json"
DATASOURCES = REPO_ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = REPO_ROOT / "grafana" / "provisioning" / "dashboards" / "mirror.yml"
PROMETHEUS_YML = REPO_ROOT / "prometheus.yml"
COMPOSE = REPO_ROOT / "compose.yaml"

# What Grafana puts in for its built-in variables when the test runs a panel's query by hand.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__interval_ms": "15000", "__range": "5m",
                    "__range_s": "300", "__range_ms": "300000"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)(?::\w+)?\]\]|\$(\w+)")
# Series that are legitimately NaN in the tests: no distribution upstream sends Docker Hub's
# ratelimit-* headers, and the mirror reports "unknown" as NaN rather than as 0 headroom.
NAN_ALLOWED = ("mirror_upstream_ratelimit_", "mirror_storage_operation_duration")  # no calls yet: NaN quantiles


def load_dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title / refId, expr) of every target of every panel."""
    return [(f"{p.get('title')!r}/{t.get('refId')}", t.get("expr", ""))
            for p in all_panels(dashboard) if p.get("type") != "row" for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    """Grafana's rendering of an expr for the test: built-ins get fixed durations, the dashboard's
    own variables (multi-value, with an All of `.*`) become `.*`."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        assert not name.startswith("__"), f"unknown Grafana built-in ${name} in {expr}"
        return ".*"

    return _VARIABLE.sub(one, expr)


def provisioned_datasource() -> dict[str, Any]:
    (ds,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    return dict(ds)


# --- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    """`make(targets)` -> a started Prometheus scraping them every second; all stopped at teardown."""
    require(PROMETHEUS)
    started: list[Prometheus] = []

    def make(targets: list[str]) -> Prometheus:
        prom = Prometheus(tmp_path / f"prometheus-{len(started)}", targets)
        started.append(prom)
        return prom.start()

    yield make
    for prom in started:
        prom.stop()


def metrics_of(mirror: Mirror) -> Samples:
    return Samples.scrape(f"{mirror.url}/metrics")


def blob_bytes(blobs: list[Any]) -> int:
    return sum(b.size for b in blobs)


# --- the files: compose.yaml, grafana/, prometheus.yml ------------------------------------------------

def test_compose_runs_mirror_prometheus_and_grafana() -> None:
    compose = load_compose(COMPOSE)
    services = compose["services"]
    assert set(services) >= {"mirror", "prometheus", "grafana"}
    named = set(compose.get("volumes") or {})

    mirror = services["mirror"]
    assert mirror["build"] == "." and "5000:5000" in mirror["ports"]
    data_volume, data_dir = mirror["volumes"][0].split(":")[:2]
    assert data_dir == "/var/lib/mirror" and data_volume in named

    mounts: dict[str, dict[str, tuple[str, list[str]]]] = {}  # service -> target -> (source, options)
    for name, service in services.items():
        for spec in service.get("volumes", []):
            assert isinstance(spec, str), f"{name}: long volume syntax not checked here: {spec}"
            source, target, *options = spec.split(":")
            mounts.setdefault(name, {})[target] = (source, options)
            if source.startswith((".", "/")):
                assert (REPO_ROOT / source).exists(), f"{name} mounts {source}, which is not in the repo"
            else:
                assert source in named, f"{name}: volume {source} is not declared under top-level volumes"

    prom = services["prometheus"]
    assert str(prom["image"]).startswith("prom/prometheus")
    assert "9090:9090" in prom["ports"]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in prom.get("command", []))
    config_target = flags.get("config.file", "/etc/prometheus/prometheus.yml")
    assert mounts["prometheus"][config_target][0] in ("./prometheus.yml", "prometheus.yml")
    tsdb = flags.get("storage.tsdb.path", "/prometheus")
    assert mounts["prometheus"][tsdb][0] in named, "Prometheus' TSDB should live in a named volume"

    grafana = services["grafana"]
    assert str(grafana["image"]).startswith("grafana/grafana")
    assert "3000:3000" in grafana["ports"]
    provisioning = mounts["grafana"]["/etc/grafana/provisioning"]
    assert provisioning[0].rstrip("/") == "./grafana/provisioning" and "ro" in provisioning[1]
    dashboards_dir = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]["options"]["path"]
    dashboards = mounts["grafana"][dashboards_dir]
    assert dashboards[0].rstrip("/") == "./grafana/dashboards" and "ro" in dashboards[1]
    env = grafana["environment"]
    env = dict(e.split("=", 1) for e in env) if isinstance(env, list) else env
    assert str(env["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert home.startswith(dashboards_dir + "/")
        assert (REPO_ROOT / "grafana" / "dashboards" / home.removeprefix(dashboards_dir + "/")).is_file()

    # the names the three files use for each other are compose's service names and container ports
    scrape = yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]
    job = next(j for j in scrape if j["job_name"] == "mirror")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["mirror:5000"]
    assert provisioned_datasource()["url"] == "http://prometheus:9090"


def test_grafana_provisioning_and_dashboard_fit_together() -> None:
    ds = provisioned_datasource()
    assert ds["type"] == "prometheus" and ds["uid"]
    (provider,) = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"

    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = all_panels(dashboard)
    assert panels
    problems = []
    ids = [p.get("id") for p in panels]
    if len(set(ids)) != len(ids) or None in ids:
        problems.append(f"panel ids not unique: {ids}")
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        title = p.get("title")
        if p.get("type") == "row":
            continue
        if not title:
            problems.append(f"panel {p.get('id')} has no title")
        if (p.get("datasource") or {}).get("uid") != ds["uid"]:
            problems.append(f"{title}: datasource {p.get('datasource')} is not the provisioned uid {ds['uid']!r}")
        targets = p.get("targets") or []
        if not targets:
            problems.append(f"{title}: no targets")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs):
            problems.append(f"{title}: refIds not unique: {refs}")
        for t in targets:
            if not str(t.get("expr", "")).strip():
                problems.append(f"{title}/{t.get('refId')}: no expr")
            if "datasource" in t and t["datasource"].get("uid") != ds["uid"]:
                problems.append(f"{title}/{t.get('refId')}: datasource {t['datasource']}")
        g = p.get("gridPos") or {}
        if not (g.get("w", 0) > 0 and g.get("h", 0) > 0 and g.get("x", -1) >= 0 and g["x"] + g["w"] <= 24):
            problems.append(f"{title}: gridPos {g} outside the 24-column grid")
            continue
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g.get("y", 0), g.get("y", 0) + g["h"]):
                if (x, y) in cells:
                    problems.append(f"{title} overlaps {cells[(x, y)]} at {(x, y)}")
                    break
                cells[(x, y)] = str(title)
            else:
                continue
            break
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query" and (var.get("datasource") or {}).get("uid") != ds["uid"]:
            problems.append(f"variable {var.get('name')}: datasource {var.get('datasource')}")

    # every metric the mirror defines is on the dashboard, and the exprs use variables the way
    # multi-value variables render (a regex: =~)
    exprs = [e for _, e in dashboard_queries(dashboard)]
    joined = "\n".join(exprs)
    defined = {family.name for family in Metrics(["hub"]).registry.collect() if family.name.startswith("mirror_")}
    problems += [f"metric {name} is on no panel" for name in sorted(defined) if name not in joined]
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    for expr in exprs:
        for m in re.finditer(r'(=~?|!~?)"\$\{?(\w+)', expr):
            if m.group(2) in variables and m.group(1) != "=~":
                problems.append(f"${m.group(2)} used with {m.group(1)} (needs =~) in {expr}")
    assert not problems, "\n".join(problems)


def test_promtool_accepts_prometheus_yml() -> None:
    require(PROMTOOL)
    r = promtool("check", "config", str(PROMETHEUS_YML))
    assert r.returncode == 0, r.stdout + r.stderr


# --- counters against the upstream's access log --------------------------------------------------------

def test_cold_then_warm_skopeo_copy_counts(skopeo_required: None, mirror: Mirror, upstream: Distribution,
                                            layouts: dict[str, Layout], tmp_path: Path) -> None:
    small = layouts["small"]
    blobs = small.image().blobs  # config + layers
    n, size = len(blobs), blob_bytes(blobs)
    src = f"docker://{mirror.host}/library/small:latest"
    before = metrics_of(mirror)
    assert before.value("mirror_cache_requests_total", kind="blob") == 0

    mark = upstream.mark()
    skopeo_copy(src, f"oci:{tmp_path / 'cold'}:latest")
    # A fetch ends (and counts its received bytes) once the blob is committed to storage, just
    # after the client got its last byte.
    wait_for(lambda: metrics_of(mirror).value("mirror_blob_flights_in_progress") == 0, 10, "the fetches to end")
    # access logs are written when a response is done, a moment after the client has it all
    wait_for(lambda: len(upstream.requests(contains="/blobs/", since=mark)) >= n, 10, "the upstream's access log")
    wait_for(lambda: sum("/blobs/" in str(e["path"]) for e in mirror.requests()) >= n, 10, "the mirror's access log")
    cold = metrics_of(mirror)
    blob_requests_upstream = upstream.requests(contains="/blobs/", since=mark)
    assert len(upstream.blob_gets(since=mark)) == n, blob_requests_upstream
    assert {e.method for e in blob_requests_upstream} == {"GET"}, blob_requests_upstream
    client_blob_requests = [e for e in mirror.requests() if "/blobs/" in str(e["path"])]
    assert [e["method"] for e in client_blob_requests] == ["GET"] * n, client_blob_requests

    assert cold.value("mirror_cache_requests_total", kind="blob", result="miss") == n
    assert cold.value("mirror_cache_requests_total", kind="blob", result="hit") == 0
    assert cold.value("mirror_upstream_requests_total", upstream="hub", kind="blob", status="2xx") == n
    assert cold.value("mirror_upstream_requests_total", kind="blob") == n  # nothing else, no other upstream
    assert cold.value("mirror_upstream_request_duration_seconds_count", upstream="hub", kind="blob") == n
    assert cold.value("mirror_http_requests_total", route="blobs", method="GET", status="2xx") == n
    assert cold.value("mirror_served_bytes_total", kind="blob", source="upstream") == size
    assert cold.value("mirror_served_bytes_total", kind="blob", source="cache") == 0
    assert cold.value("mirror_upstream_received_bytes_total", upstream="hub") == size
    assert cold.value("mirror_upstream_errors_total") == 0
    assert cold.value("mirror_upstream_retries_total") == 0
    assert cold.value("mirror_cache_requests_total", kind="manifest", result="miss") >= 1

    mark = upstream.mark()
    skopeo_copy(src, f"oci:{tmp_path / 'warm'}:latest")
    warm = metrics_of(mirror)
    assert not upstream.blob_gets(since=mark)
    assert not upstream.requests(contains="/blobs/", since=mark)
    assert warm.value("mirror_cache_requests_total", kind="blob", result="hit") == n
    assert warm.value("mirror_cache_requests_total", kind="blob", result="miss") == n  # unchanged
    assert warm.value("mirror_upstream_requests_total", kind="blob") == n  # unchanged
    assert warm.value("mirror_http_requests_total", route="blobs", method="GET", status="2xx") == 2 * n
    assert warm.value("mirror_served_bytes_total", kind="blob", source="cache") == size
    assert warm.value("mirror_served_bytes_total", kind="blob", source="upstream") == size  # unchanged
    assert warm.value("mirror_upstream_received_bytes_total", upstream="hub") == size  # unchanged
    # the tag is still fresh (tag_ttl 30s): the manifest came from the cache too
    assert warm.value("mirror_cache_requests_total", kind="manifest", result="hit") >= 1
    assert warm.value("mirror_http_requests_total", status="5xx") == 0

    # The storage gauges come from a scan of storage (at start, then every minute): after a
    # restart they add up what the mirror holds, config, layers and manifest.
    files = mirror.blob_files()
    assert len(files) >= n + 1
    mirror.restart()
    wait_for(lambda: metrics_of(mirror).value("mirror_storage_blobs", backend="filesystem") == len(files), 10,
             f"mirror_storage_blobs == {len(files)}")
    assert metrics_of(mirror).value("mirror_storage_bytes", backend="filesystem") == sum(
        f.stat().st_size for f in files)


# --- a real Prometheus runs the dashboard -------------------------------------------------------------

def test_every_dashboard_query_returns_data(skopeo_required: None, mirror: Mirror, upstream: Distribution,
                                            prometheus_factory: Callable[..., Prometheus],
                                            tmp_path: Path) -> None:
    require(PROMTOOL)
    prom = prometheus_factory([mirror.host])
    prom.wait_up()  # a scrape before the pulls, so rate() sees them as an increase

    for round_ in (1, 2):  # the second round is all cache hits
        for name, extra in (("small", ()), ("multi", ("--all",))):
            skopeo_copy(f"docker://{mirror.host}/library/{name}:latest", f"oci:{tmp_path / f'{name}-{round_}'}:latest",
                        *extra)
    pulled = time.time()
    direct = metrics_of(mirror)
    hits = direct.value("mirror_cache_requests_total", kind="blob", result="hit")
    assert hits > 0
    prom.wait_scrapes_after(pulled, scrapes=3)
    got = prom.value('sum(mirror_cache_requests_total{job="mirror", kind="blob", result="hit"})')
    assert got == hits, f"Prometheus has {got} blob hits, the mirror's /metrics {hits}"

    dashboard = load_dashboard()
    queries = dashboard_queries(dashboard)
    failures = []
    for where, expr in queries:
        promql = substitute(expr)
        try:
            result = prom.query(promql)
        except PromQLError as e:
            failures.append(f"{where}: {promql}\n    -> {e}")
            continue
        if not result:
            failures.append(f"{where}: {promql}\n    -> no series")
        elif not finite(result) and not any(m in expr for m in NAN_ALLOWED):
            failures.append(f"{where}: {promql}\n    -> only NaN/Inf: {[s['value'][1] for s in result][:8]}")
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", q)
        if not m:
            failures.append(f"variable {var['name']}: not label_values(selector, label): {q}")
            continue
        try:
            values = prom.label_values(m.group(2), substitute(m.group(1)))
        except PromQLError as e:
            failures.append(f"variable {var['name']}: {q} -> {e}")
            continue
        if not values:
            failures.append(f"variable {var['name']}: {q} -> no values")
    assert not failures, f"{len(failures)} of {len(queries)} dashboard queries failed:\n" + "\n".join(failures)

    # promtool lints the exposition the dashboard was built on (after traffic: histograms filled)
    r = promtool("check", "metrics", stdin=metrics_of(mirror).text.encode())
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


# --- metrics.addr: a listener of its own ---------------------------------------------------------------

def test_metrics_on_a_separate_listener(mirror_factory: Callable[..., Mirror], upstream: Distribution) -> None:
    port = free_port()
    config = mirror_config(upstream.url)
    config["metrics"] = {"addr": f"127.0.0.1:{port}"}
    mirror = mirror_factory(config)

    r = http("GET", f"http://127.0.0.1:{port}/metrics")
    assert r.status == 200, r.body[:500]
    assert r.headers.get("Content-Type", "").startswith("text/plain")
    samples = Samples(r.body.decode())
    assert samples.find("mirror_build_info") and samples.find("mirror_cache_requests_total")
    assert samples.find("mirror_upstream_requests_total", upstream="hub")

    r = http("GET", f"{mirror.url}/metrics")
    assert r.status == 404, (r.status, r.body[:500])
    assert r.headers.get("Content-Type", "").startswith("application/json")
    errors = r.json()["errors"]
    assert errors and all(e.get("code") and "message" in e for e in errors), errors
    assert b"mirror_build_info" not in r.body
