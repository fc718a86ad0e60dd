"""A real Prometheus (and promtool) for the metrics tests, plus a reader for /metrics text.

`Prometheus` runs Debian's /usr/bin/prometheus on a loopback port with its own TSDB and a
generated config that scrapes the given targets every second; `query()` uses its HTTP API.
`Samples` parses the Prometheus text format with prometheus_client's own parser, so a test can
read counter values straight from a mirror's /metrics.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import Proc, client_env, free_port, http, run, wait_for

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"


# --- /metrics text ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


class Samples:
    """Every sample of one /metrics exposition."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [Sample(s.name, dict(s.labels), s.value)
                        for family in text_string_to_metric_families(text) for s in family.samples]

    @classmethod
    def scrape(cls, url: str) -> Samples:
        r = http("GET", url, timeout=10)
        assert r.status == 200, f"GET {url}: {r.status} {r.body[:500]!r}"
        return cls(r.body.decode())

    def find(self, name: str, **labels: str) -> list[Sample]:
        return [s for s in self.samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        """The sum over every series of `name` whose labels include `labels` (there must be one)."""
        found = self.find(name, **labels)
        assert found, f"no series {name}{labels} in /metrics"
        return sum(s.value for s in found)

    def names(self) -> set[str]:
        return {s.name for s in self.samples}


# --- Prometheus ------------------------------------------------------------------------------------

class PromQLError(AssertionError):
    pass


class Prometheus:
    """`prometheus` scraping `targets` (host:port) as job `job` every `interval`."""

    def __init__(self, tmp: Path, targets: Iterable[str], job: str = "mirror", interval: str = "1s",
                 timeout: str = "800ms", metrics_path: str = "/metrics") -> None:
        self.dir = Path(tmp)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.job = job
        self.scrape_interval = interval
        self.config: dict[str, Any] = {
            "global": {"scrape_interval": interval, "scrape_timeout": timeout, "evaluation_interval": interval},
            "scrape_configs": [{"job_name": job, "metrics_path": metrics_path, "scrape_interval": interval,
                                "scrape_timeout": timeout, "static_configs": [{"targets": list(targets)}]}],
        }
        self.config_path = self.dir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.proc = Proc("prometheus", [
            PROMETHEUS,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=info",
        ], self.dir, env=client_env(), cwd=self.dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Prometheus:
        self.proc.start()
        self.proc.wait_ready(lambda: http("GET", f"{self.url}/-/ready", timeout=2).status == 200, timeout)
        return self

    def stop(self) -> int | None:
        return self.proc.stop(timeout=15)

    def logs(self, lines: int = 40) -> str:
        return self.proc.logs(lines)

    def api(self, path: str, params: Mapping[str, str] | list[tuple[str, str]]) -> Any:
        """GET /api/v1/<path>; the `data` of a success, PromQLError with Prometheus' message otherwise."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        r = http("GET", url, timeout=15)
        try:
            body = json.loads(r.body)
        except ValueError:
            raise PromQLError(f"{path} {dict(params)}: HTTP {r.status}, not JSON: {r.body[:300]!r}") from None
        if r.status != 200 or body.get("status") != "success":
            raise PromQLError(f"HTTP {r.status} {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query: the result list of a vector (a scalar comes back as one unlabelled series)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", params)
        if data["resultType"] == "vector":
            return list(data["result"])
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        raise PromQLError(f"{expr}: result type {data['resultType']}, expected a vector")

    def value(self, expr: str) -> float | None:
        """The value of a query that gives one series, None while it gives none."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: {len(result)} series, expected one"
        return float(result[0]["value"][1]) if result else None

    def label_values(self, label: str, match: str) -> list[str]:
        return list(self.api(f"label/{label}/values", [("match[]", match)]))

    def last_scrape(self) -> float:
        """Timestamp (unix seconds) of the latest scrape of every target of the job (0: none yet)."""
        v = self.value(f'min(timestamp(up{{job="{self.job}"}}))')
        return v or 0.0

    def wait_up(self, timeout: float = 20.0) -> None:
        wait_for(lambda: self.value(f'min(up{{job="{self.job}"}})') == 1.0, timeout,
                 f"prometheus to scrape job {self.job}\n{self.logs()}", interval=0.2)

    def wait_scrapes_after(self, t: float, scrapes: int = 3, timeout: float = 20.0) -> None:
        """Until every target was scraped `scrapes` intervals (at least) after unix time `t`."""
        interval = _seconds(self.scrape_interval)
        wait_for(lambda: self.last_scrape() >= t + scrapes * interval, timeout,
                 f"{scrapes} scrapes after the pulls\n{self.logs()}", interval=0.2)


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert m, duration
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m.group(2)]


def finite(result: list[dict[str, Any]]) -> list[float]:
    """The finite values of an instant-query result (NaN and ±Inf left out)."""
    out = []
    for series in result:
        v = float(series["value"][1])
        if math.isfinite(v):
            out.append(v)
    return out


def promtool(*args: str, stdin: bytes | None = None, timeout: float = 60.0) -> Any:
    return run([PROMTOOL, *args], timeout=timeout, check=False, input=stdin)
