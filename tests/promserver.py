"""A real Prometheus for the tests: Debian's `prometheus` package, started on loopback.

`prometheus_bin()` finds `prometheus` and `promtool` on PATH; when they are not there it fetches
Debian's package with `apt-get download` and unpacks it with `dpkg -x` into a cache folder (as root it
refreshes empty package lists first). Nothing is installed system-wide, so no packaged service starts.
CI therefore never skips a test that needs it; a run by hand on a machine with neither apt nor the
binaries fails with a message saying what to install.

`PrometheusServer` runs one server with a generated scrape config (and optional rule files) in a temp dir
that it removes on exit, and answers PromQL through the HTTP API.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from tritonforge.server import free_port

PACKAGE = "prometheus"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tritonforge" / "prometheus"


class PrometheusMissing(RuntimeError):
    """Neither the binaries nor a way to install Debian's package are here."""


def _on_path() -> Path | None:
    found = shutil.which("prometheus"), shutil.which("promtool")
    if all(found):
        return Path(found[0]).parent  # type: ignore[arg-type]
    return None


def _cached() -> Path | None:
    bin_dir = CACHE / "usr" / "bin"
    if (bin_dir / "prometheus").is_file() and (bin_dir / "promtool").is_file():
        return bin_dir
    return None


def _run(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=600, **kwargs)


def _apt_download(into: Path) -> Path:
    """`apt-get download prometheus` into `into`; refreshes the package lists once if they are empty."""
    done = _run(["apt-get", "download", PACKAGE], cwd=into)
    if done.returncode != 0 and os.geteuid() == 0:
        _run(["apt-get", "update"])
        done = _run(["apt-get", "download", PACKAGE], cwd=into)
    debs = sorted(into.glob(f"{PACKAGE}_*.deb"))
    if done.returncode != 0 or not debs:
        raise PrometheusMissing(
            f"could not download Debian's {PACKAGE!r} package ({done.stderr.strip()[-300:]}); "
            f"install it (`apt-get install {PACKAGE}`) or put `prometheus` and `promtool` on PATH"
        )
    return debs[-1]


def _install_into_cache() -> Path:
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE.parent, prefix=".prometheus-") as tmp:
        staging = Path(tmp)
        deb = _apt_download(staging)
        root = staging / "root"
        done = _run(["dpkg", "-x", str(deb), str(root)])
        if done.returncode != 0:
            raise PrometheusMissing(f"dpkg -x {deb.name} failed: {done.stderr.strip()[-300:]}")
        try:
            root.rename(CACHE)  # atomic: a concurrent or interrupted install never leaves half a cache
        except OSError:
            if _cached() is None:
                raise
    bin_dir = _cached()
    if bin_dir is None:
        raise PrometheusMissing(f"Debian's {PACKAGE!r} package did not hold usr/bin/prometheus and promtool")
    return bin_dir


def prometheus_bin() -> Path:
    """The folder holding `prometheus` and `promtool`, installing Debian's package if needed.

    Raises:
        PrometheusMissing: neither on PATH nor installable here (says what to install).
    """
    found = _on_path() or _cached()
    if found is not None:
        return found
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise PrometheusMissing(
            "prometheus/promtool are not on PATH and this machine has no apt-get/dpkg to install "
            "Debian's package: install Prometheus 2.x and put both binaries on PATH"
        )
    return _install_into_cache()


def _duration(seconds: float) -> str:
    """Prometheus durations take no fractions: 0.5 s is written `500ms`."""
    return f"{round(seconds * 1000)}ms"


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `promtool ARGS` and return the finished process (the caller asserts on it)."""
    return _run([str(prometheus_bin() / "promtool"), *args], cwd=cwd)


class PrometheusServer:
    """A real Prometheus on 127.0.0.1 scraping `targets` (host:port of /metrics endpoints).

    Usage:
        with PrometheusServer({"triton": ["127.0.0.1:8002"]}, scrape_interval_s=1) as prom:
            prom.wait_for_targets()
            prom.query('nv_inference_count')
    """

    def __init__(
        self,
        jobs: dict[str, Iterable[str]],
        *,
        scrape_interval_s: float = 1.0,
        rule_files: Iterable[Path] = (),
        evaluation_interval_s: float | None = None,
        startup_timeout_s: float = 60.0,
    ) -> None:
        self.jobs = {name: list(targets) for name, targets in jobs.items()}
        self.scrape_interval_s = scrape_interval_s
        self.evaluation_interval_s = evaluation_interval_s or scrape_interval_s
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        return {
            "global": {
                "scrape_interval": _duration(self.scrape_interval_s),
                "evaluation_interval": _duration(self.evaluation_interval_s),
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": name, "static_configs": [{"targets": targets}]}
                for name, targets in self.jobs.items()
            ],
        }

    def __enter__(self) -> PrometheusServer:
        bin_dir = prometheus_bin()
        self._dir = tempfile.TemporaryDirectory(prefix="tritonforge-prometheus-")
        work = Path(self._dir.name)
        config = work / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self.port = free_port()
        self._log = work / "prometheus.log"
        argv = [
            str(bin_dir / "prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
        ]
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self._proc.returncode}): {self.log()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {self.startup_timeout_s}s: {self.log()[-2000:]}")

    def log(self) -> str:
        return self._log.read_text(errors="replace") if self._log and self._log.exists() else ""

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=15)
        self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path> and return its `data` (raises on an error status)."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as answer:
            body = json.load(answer)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus /api/v1/{path}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector: [{"metric": {...}, "value": [ts, "x"]}, ...]."""
        return list(self.api("query", query=promql)["result"])

    def values(self, promql: str) -> dict[str, float]:
        """An instant query as {instance label (or the series' labels): float value}."""
        out: dict[str, float] = {}
        for row in self.query(promql):
            labels = row["metric"]
            key = labels.get("instance") or json.dumps(labels, sort_keys=True)
            out[key] = float(row["value"][1])
        return out

    def wait_for_targets(self, timeout_s: float = 30.0) -> None:
        """Until every configured target has been scraped successfully at least once."""
        wanted = sum(len(t) for t in self.jobs.values())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            active = self.api("targets")["activeTargets"]
            if len(active) >= wanted and all(t["health"] == "up" for t in active):
                return
            time.sleep(0.25)
        raise TimeoutError(f"prometheus targets not all up after {timeout_s}s: {self.api('targets')}")

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts Prometheus holds now (pending and firing)."""
        return list(self.api("alerts")["alerts"])
