"""Triton's own numbers: its Prometheus endpoint (parsed by prometheus_client's parser) and statistics API.

A :class:`Scrape` is one reading of one server: per model and version the cumulative counters Triton
exports (``nv_inference_*``), summary quantiles when the server runs with
``--metrics-config summary_latencies=true``, and the server's CPU/GPU gauges. Two readings make a
:class:`ModelRates` per model (requests/s, failures/s, mean latency, queue vs compute time, the mean batch
size the dynamic batcher achieved, busy instances). Nothing here re-implements the text format.

    first = scrape("http://127.0.0.1:8002/metrics")
    time.sleep(1)
    rates = model_rates(first, scrape("http://127.0.0.1:8002/metrics"))
"""

from __future__ import annotations

import dataclasses
import http.client
import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tritonforge.error_accounting import ERROR_RESPONSES
from tritonforge.errors import MetricsError

__all__ = [
    "SUMMARY_FLAGS",
    "MetricsError",
    "ModelRates",
    "Scrape",
    "batch_sizes",
    "metrics_url",
    "model_rates",
    "parse_metrics",
    "scrape",
    "summed",
]

# Triton 2.51 exports latency summaries (p50/p90/p99 over a sliding window) only when asked to:
SUMMARY_FLAGS = ("--metrics-config=summary_latencies=true",)

# cumulative counters per (model, version), by our short name
_COUNTERS = {
    "nv_inference_request_success": "success",
    "nv_inference_request_failure": "failure",
    # error responses of tritonforge's Python models, which Triton counts in its successes
    ERROR_RESPONSES: "error_responses",
    "nv_inference_count": "inferences",
    "nv_inference_exec_count": "executions",
    "nv_inference_request_duration_us": "request_us",
    "nv_inference_queue_duration_us": "queue_us",
    "nv_inference_compute_input_duration_us": "compute_input_us",
    "nv_inference_compute_infer_duration_us": "compute_infer_us",
    "nv_inference_compute_output_duration_us": "compute_output_us",
}
_SUMMARY = "nv_inference_request_summary_us"
_PENDING = "nv_inference_pending_request_count"
_SERVER_GAUGES = {
    "nv_cpu_utilization": "cpu_utilization",
    "nv_cpu_memory_used_bytes": "cpu_memory_used_bytes",
    "nv_gpu_utilization": "gpu_utilization",
    "nv_gpu_memory_used_bytes": "gpu_memory_used_bytes",
    "nv_gpu_memory_total_bytes": "gpu_memory_total_bytes",
    "nv_gpu_power_usage": "gpu_power_watts",
}
# the per-GPU gauges kept by gpu_uuid (Scrape.devices), by their name there
_DEVICE_GAUGES = {
    "gpu_utilization": "utilization",
    "gpu_memory_used_bytes": "memory_used_bytes",
    "gpu_memory_total_bytes": "memory_total_bytes",
}


@dataclasses.dataclass
class Scrape:
    """One reading of one server's metrics endpoint.

    ``models`` maps ``(model, version)`` to cumulative counters (names of ``_COUNTERS``' values) plus
    ``pending``; ``quantiles`` maps ``(model, version)`` to ``{0.5: us, 0.99: us}`` when summaries are on;
    ``server`` holds CPU/GPU gauges (GPU ones summed over GPUs, utilisation averaged); ``devices`` the
    GPU gauges per GPU, by Triton's ``gpu_uuid`` label (``utilization``, ``memory_used_bytes``,
    ``memory_total_bytes``; empty for a server exporting no GPU metrics, e.g. one without a GPU).
    """

    url: str
    at_s: float
    models: dict[tuple[str, str], dict[str, float]]
    quantiles: dict[tuple[str, str], dict[float, float]]
    server: dict[str, float]
    gpus: int = 0
    devices: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


def metrics_url(url: str) -> str:
    """``host:port`` or ``http://host:port`` -> ``http://host:port/metrics`` (a full URL is kept).

    Raises:
        ValueError: an empty URL.
    """
    url = url.strip()
    if not url:
        raise ValueError("a metrics URL is empty: give host:port of Triton's metrics endpoint (port 8002)")
    if "://" not in url:
        url = "http://" + url
    scheme, rest = url.split("://", 1)
    if "/" not in rest:
        url = f"{scheme}://{rest}/metrics"
    return url


def parse_metrics(text: str, *, url: str = "", at_s: float | None = None) -> Scrape:
    """Parse Triton's metrics text (Prometheus exposition format) into a :class:`Scrape`.

    Raises:
        MetricsError: the text is not Prometheus exposition format.
    """
    models: dict[tuple[str, str], dict[str, float]] = {}
    quantiles: dict[tuple[str, str], dict[float, float]] = {}
    server: dict[str, float] = {}
    gpu_util: list[float] = []
    devices: dict[str, dict[str, float]] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # the parser raises ValueError/TypeError/IndexError on malformed text
        raise MetricsError(f"{url or 'metrics text'} is not Prometheus exposition format: {exc}") from None
    for family in families:
        for sample in family.samples:
            name = sample.name
            # prometheus_client names a counter's sample <family>_total; Triton's have no suffix
            base = name.removesuffix("_total") if name.removesuffix("_total") in _COUNTERS else name
            labels = sample.labels
            key = (labels.get("model", ""), labels.get("version", ""))
            if base in _COUNTERS and "model" in labels:
                counters = models.setdefault(key, {})
                field = _COUNTERS[base]
                counters[field] = counters.get(field, 0.0) + float(sample.value)  # failure: per reason
            elif name == _PENDING and "model" in labels:
                models.setdefault(key, {})["pending"] = float(sample.value)
            elif name == _SUMMARY and "quantile" in labels and "model" in labels:
                quantiles.setdefault(key, {})[float(labels["quantile"])] = float(sample.value)
            elif name in _SERVER_GAUGES:
                field = _SERVER_GAUGES[name]
                if "gpu_uuid" in labels and field in _DEVICE_GAUGES:
                    devices.setdefault(labels["gpu_uuid"], {})[_DEVICE_GAUGES[field]] = float(sample.value)
                if field == "gpu_utilization":
                    gpu_util.append(float(sample.value))
                else:
                    server[field] = server.get(field, 0.0) + float(sample.value)
    if gpu_util:
        server["gpu_utilization"] = sum(gpu_util) / len(gpu_util)
    at = time.time() if at_s is None else at_s
    return Scrape(url, at, models, quantiles, server, len(gpu_util), dict(sorted(devices.items())))


def scrape(url: str, *, timeout_s: float = 5.0) -> Scrape:
    """Read and parse one server's metrics endpoint.

    Raises:
        MetricsError: unreachable, an HTTP error, or not Prometheus text.
    """
    full = metrics_url(url)
    try:
        with urllib.request.urlopen(full, timeout=timeout_s) as answer:
            text = answer.read().decode("utf-8", errors="replace")
    except http.client.HTTPException:
        # an answer that is not HTTP/1: most often Triton's gRPC port (8001), which speaks HTTP/2 only
        raise MetricsError(
            f"{full} did not answer HTTP (a gRPC port?): give Triton's metrics port, 8002 by default"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MetricsError(
            f"cannot read Triton's metrics at {full}: {reason} "
            "(is the server up, and is that its metrics port?)"
        ) from None
    return parse_metrics(text, url=full)


@dataclasses.dataclass
class ModelRates:
    """One model version's activity between two readings (``server`` names where it runs, or ``"all"``).

    Latencies are milliseconds per request; ``batch_size`` is inferences per execution (what the dynamic
    batcher achieved); ``busy_instances`` is compute time per wall second (≈ instances kept busy).
    ``p50_ms`` / ``p99_ms`` come from Triton's summaries (None when the server exports none).
    """

    server: str
    model: str
    version: str
    requests_per_s: float
    failures_per_s: float
    inferences_per_s: float
    mean_latency_ms: float | None
    queue_ms: float | None
    compute_ms: float | None
    batch_size: float | None
    busy_instances: float
    pending: float
    p50_ms: float | None
    p99_ms: float | None
    requests_total: float
    failures_total: float

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in vars(self).items()}


def _per(numerator: float, denominator: float, scale: float = 1.0) -> float | None:
    return numerator / denominator * scale if denominator > 0 else None


def model_rates(before: Scrape, after: Scrape) -> list[ModelRates]:
    """Per model version, what happened between two readings of the same server (sorted by model).

    A counter that went down (the server restarted, or the model was reloaded) counts from zero.

    Raises:
        ValueError: the readings are of different servers, or not in time order.
    """
    if before.url != after.url:
        raise ValueError(f"readings of different servers: {before.url} and {after.url}")
    elapsed = after.at_s - before.at_s
    if elapsed <= 0:
        raise ValueError("the second reading must be later than the first")
    out: list[ModelRates] = []
    for key in sorted(after.models):
        now = after.models[key]
        then = before.models.get(key, {})

        def delta(field: str, now: dict[str, float] = now, then: dict[str, float] = then) -> float:
            d = now.get(field, 0.0) - then.get(field, 0.0)
            return d if d >= 0 else now.get(field, 0.0)

        # Triton counts the error responses of Python models among its successes (and times them with
        # them: the per-request means stay over Triton's count); monitor counts them as failures
        success, failure = (
            delta("success"),
            delta("failure") + min(delta("error_responses"), delta("success")),
        )
        answered_total = min(now.get("error_responses", 0.0), now.get("success", 0.0))
        compute_us = delta("compute_input_us") + delta("compute_infer_us") + delta("compute_output_us")
        q = after.quantiles.get(key, {})
        out.append(
            ModelRates(
                server=after.url,
                model=key[0],
                version=key[1],
                requests_per_s=(success + delta("failure")) / elapsed,
                failures_per_s=failure / elapsed,
                inferences_per_s=delta("inferences") / elapsed,
                mean_latency_ms=_per(delta("request_us"), success, 1e-3),
                queue_ms=_per(delta("queue_us"), success, 1e-3),
                compute_ms=_per(compute_us, success, 1e-3),
                batch_size=_per(delta("inferences"), delta("executions")),
                busy_instances=compute_us / 1e6 / elapsed,
                pending=now.get("pending", 0.0),
                p50_ms=_quantile_ms(q, 0.5),
                p99_ms=_quantile_ms(q, 0.99),
                requests_total=now.get("success", 0.0) + now.get("failure", 0.0),
                failures_total=now.get("failure", 0.0) + answered_total,
            )
        )
    return out


def _quantile_ms(quantiles: Mapping[float, float], q: float) -> float | None:
    value = quantiles.get(q)
    if value is None or math.isnan(value):
        return None
    return value / 1000.0


def summed(rates: Iterable[ModelRates], *, by: Sequence[str] = ("model",)) -> list[ModelRates]:
    """Rates added up over servers (and versions): one row per ``by`` key, ``server="all"``.

    Per-request figures (latency, queue, compute) are weighted by requests; the batch size by executions
    (recovered as inferences / batch size); quantiles are not additive and become the worst server's.
    """
    groups: dict[tuple[str, ...], list[ModelRates]] = {}
    for r in rates:
        groups.setdefault(tuple(getattr(r, f) for f in by), []).append(r)
    out = []
    for _, rows in sorted(groups.items()):
        requests = sum(r.requests_per_s - r.failures_per_s for r in rows)
        executions = sum(r.inferences_per_s / r.batch_size for r in rows if r.batch_size)

        def weighted(field: str, rows: list[ModelRates] = rows, requests: float = requests) -> float | None:
            parts = [
                (getattr(r, field), r.requests_per_s - r.failures_per_s)
                for r in rows
                if getattr(r, field) is not None
            ]
            if not parts or requests <= 0:
                return None
            return sum(v * w for v, w in parts) / requests

        def worst(field: str, rows: list[ModelRates] = rows) -> float | None:
            values = [getattr(r, field) for r in rows if getattr(r, field) is not None]
            return max(values) if values else None

        first = rows[0]
        out.append(
            ModelRates(
                server="all",
                model=first.model if "model" in by else "*",
                version=first.version if "version" in by else "*",
                requests_per_s=sum(r.requests_per_s for r in rows),
                failures_per_s=sum(r.failures_per_s for r in rows),
                inferences_per_s=sum(r.inferences_per_s for r in rows),
                mean_latency_ms=weighted("mean_latency_ms"),
                queue_ms=weighted("queue_ms"),
                compute_ms=weighted("compute_ms"),
                batch_size=_per(sum(r.inferences_per_s for r in rows if r.batch_size), executions),
                busy_instances=sum(r.busy_instances for r in rows),
                pending=sum(r.pending for r in rows),
                p50_ms=worst("p50_ms"),
                p99_ms=worst("p99_ms"),
                requests_total=sum(r.requests_total for r in rows),
                failures_total=sum(r.failures_total for r in rows),
            )
        )
    return out


def batch_sizes(
    grpc_url: str, *, timeout_s: float = 5.0, auth: Any = None
) -> dict[tuple[str, str], dict[int, int]]:
    """From Triton's statistics API: per model version, how many executions ran at each batch size.
    ``auth``: a :class:`tritonforge.client.Auth` (the 'statistics' key, TLS) for a restricted server.

    Raises:
        MetricsError: the server's gRPC endpoint could not be read.
    """
    from tritonclient.utils import InferenceServerException

    from tritonforge.client.interop import tritonclient_for

    client = tritonclient_for(grpc_url, auth)
    try:
        stats = client.get_inference_statistics(as_json=True, client_timeout=timeout_s)
    except InferenceServerException as exc:
        raise MetricsError(f"cannot read Triton's statistics at {grpc_url}: {exc.message()}") from None
    finally:
        client.close()
    out: dict[tuple[str, str], dict[int, int]] = {}
    for model in stats.get("model_stats", []):
        sizes = {
            int(b["batch_size"]): int(b.get("compute_infer", {}).get("count", 0))
            for b in model.get("batch_stats", [])
        }
        out[(model["name"], str(model.get("version", "")))] = dict(sorted(sizes.items()))
    return out
