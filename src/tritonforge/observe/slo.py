"""SLOs as code: an SLO file's objectives -> Prometheus rules and a Grafana dashboard.

The file and its checks are :mod:`tritonforge.observe.slo_spec` (:func:`load_slo`, re-exported here).
:func:`rules` builds the recording rules (``model:tritonforge_*:rate<window>``, aggregated by model) and
one alert per objective and threshold (the models sharing it in one rule); :func:`dashboard` builds a
Grafana dashboard with a row per model (and per composing model of an ensemble), or, for many models, an
overview and a row repeated per model of its ``model`` variable; :func:`write` puts ``rules.yml`` and
``dashboard.json`` into a folder atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tritonforge.atomic import write_atomic
from tritonforge.error_accounting import ERROR_RESPONSES
from tritonforge.errors import SLOError
from tritonforge.observe.gpu_rules import GPU_OBJECTIVES, gpu_rules
from tritonforge.observe.slo_spec import (
    OBJECTIVES,
    Objective,
    SLOSpec,
    _label_value,
    _models_matcher,
    _sel,
    load_slo,
)

__all__ = [
    "DASHBOARD_ROWS",
    "GPU_OBJECTIVES",
    "OBJECTIVES",
    "Objective",
    "SLOError",
    "SLOSpec",
    "dashboard",
    "dashboard_queries",
    "load_slo",
    "rules",
    "write",
]


# -- rules --------------------------------------------------------------------------------------------


def _record_names(window: str) -> dict[str, str]:
    return {
        "requests": f"model:tritonforge_requests:rate{window}",
        "failures": f"model:tritonforge_failures:rate{window}",
        "error_ratio": f"model:tritonforge_error_ratio:rate{window}",
        "latency_mean_ms": f"model:tritonforge_latency_mean_ms:rate{window}",
        "queue_ms": f"model:tritonforge_queue_mean_ms:rate{window}",
        "compute_ms": f"model:tritonforge_compute_mean_ms:rate{window}",
        "batch_size": f"model:tritonforge_batch_size:rate{window}",
        "p99_ms": "model:tritonforge_latency_p99_ms:max",
        "p50_ms": "model:tritonforge_latency_p50_ms:max",
    }


def _exprs(spec: SLOSpec, window: str) -> dict[str, str]:
    s, w = _sel(spec), window

    def rate(metric: str) -> str:
        return f"sum by (model) (rate({metric}{s}[{w}]))"

    success, failure = rate("nv_inference_request_success"), rate("nv_inference_request_failure")
    # a model without failure series yet still gets a 0 (not an empty result)
    raised = f"({failure} or {success} * 0)"
    # Triton counts a Python model's error response as a success: tritonforge's Python models count those
    # in their own counter (tritonforge.error_accounting.ERROR_RESPONSES), added to the failures here
    answered = f"({rate(ERROR_RESPONSES)} or {success} * 0)"
    failures = f"({raised} + {answered})"
    q50, q99 = 'quantile="0.5"', 'quantile="0.99"'
    compute = " + ".join(
        rate(f"nv_inference_compute_{part}_duration_us") for part in ("input", "infer", "output")
    )
    return {
        "requests": f"{success} + {raised}",
        "failures": failures,
        "error_ratio": f"{failures} / ({success} + {raised})",
        "latency_mean_ms": f"{rate('nv_inference_request_duration_us')} / {success} / 1000",
        "queue_ms": f"{rate('nv_inference_queue_duration_us')} / {success} / 1000",
        "compute_ms": f"({compute}) / {success} / 1000",
        "batch_size": f"{rate('nv_inference_count')} / {rate('nv_inference_exec_count')}",
        "p99_ms": f"max by (model) (nv_inference_request_summary_us{_sel(spec, q99)}) / 1000",
        "p50_ms": f"max by (model) (nv_inference_request_summary_us{_sel(spec, q50)}) / 1000",
    }


_ALERTS = {
    # objective: (alert name, recorded series key, what it measures, unit)
    "p99_latency_ms": ("TritonModelP99LatencyHigh", "p99_ms", "p99 latency", "ms"),
    "mean_latency_ms": ("TritonModelMeanLatencyHigh", "latency_mean_ms", "mean latency", "ms"),
    "error_rate": ("TritonModelErrorRateHigh", "error_ratio", "error rate", ""),
    "queue_ms": ("TritonModelQueueTimeHigh", "queue_ms", "mean queue time", "ms"),
}


def _alert_groups(spec: SLOSpec) -> dict[tuple[str, float, str, str], list[str]]:
    """The models of each (objective, threshold, for, severity), in the order the SLO file names them."""
    groups: dict[tuple[str, float, str, str], list[str]] = {}
    for o in spec.objectives:
        for objective in (*_ALERTS, "max_drift_psi"):
            threshold = getattr(o, objective)
            if threshold is not None:
                groups.setdefault((objective, threshold, o.for_, o.severity), []).append(o.model)
    return groups


def _alert_labels(
    severity: str,
    objective: str,
    threshold: float,
    for_: str,
    groups: Mapping[tuple[str, float, str, str], Any],
) -> dict[str, str]:
    """An alert rule's labels: its severity, objective and threshold, and its ``for`` where another rule
    has the same three (Prometheus refuses two alerting rules of one name with the same labels)."""
    labels = {"severity": severity, "slo": objective, "objective": f"{threshold:g}"}
    if sum(1 for o, t, _, s in groups if (o, t, s) == (objective, threshold, severity)) > 1:
        labels["for"] = for_
    return labels


def rules(spec: SLOSpec) -> dict[str, Any]:
    """Prometheus rule groups: the recording rules every objective reads (aggregated ``by (model)``, so
    their number does not grow with the models), and one alert per objective and threshold: the models
    that share a threshold share one rule (``model=~"a|b|..."``), and the alert carries each firing
    model's name as its ``model`` label.

    Raises:
        SLOError: never for a spec from :func:`load_slo` (kept for hand-built specs with no objectives).
    """
    if not spec.objectives:
        raise SLOError("an SLO spec without objectives gives no rules: add models with objectives")
    names, exprs = _record_names(spec.window), _exprs(spec, spec.window)
    recording = [{"record": names[k], "expr": exprs[k]} for k in names]
    alerts: list[dict[str, Any]] = []
    groups = _alert_groups(spec)
    for (objective, threshold, for_, severity), models in groups.items():
        matcher = _models_matcher(models)
        if objective == "max_drift_psi":
            alerts.append(
                {
                    "alert": "TritonModelInputDrift",
                    "expr": f"max by (model) (tritonforge_drift_psi{{{matcher}}}) > {threshold:g}",
                    "for": "0s",
                    "labels": _alert_labels(severity, objective, threshold, for_, groups),
                    "annotations": {
                        "summary": "{{ $labels.model }}: traffic drifted from its reference profile",
                        "description": "largest feature PSI of {{ $labels.model }} is "
                        '{{ $value | printf "%.3g" }} '
                        f"(objective {threshold:g}); run `tritonforge drift` for the report.",
                    },
                }
            )
            continue
        alert, key, what, unit = _ALERTS[objective]
        shown = f'{{{{ $value | printf "%.4g" }}}}{unit}'
        alerts.append(
            {
                "alert": alert,
                "expr": f"{names[key]}{{{matcher}}} > {threshold:g}",
                "for": for_,
                "labels": _alert_labels(severity, objective, threshold, for_, groups),
                "annotations": {
                    "summary": f"{{{{ $labels.model }}}}: {what} above its objective ({threshold:g}{unit})",
                    "description": f"{what} of {{{{ $labels.model }}}} over {spec.window} is {shown} "
                    f"(objective {threshold:g}{unit}) for {for_}.",
                },
            }
        )
    limits = {key: getattr(spec, key) for key in GPU_OBJECTIVES}
    gpu_recording, gpu_alerts = gpu_rules(_sel(spec), spec.window, spec.for_, spec.severity, limits)
    return {
        "groups": [
            {"name": "tritonforge-slo-recording", "rules": recording + gpu_recording},
            {"name": "tritonforge-slo-alerts", "rules": alerts + gpu_alerts},
        ]
    }


# -- dashboard ----------------------------------------------------------------------------------------

_DS = {"type": "prometheus", "uid": "${datasource}"}


def _panel(
    pid: int, title: str, targets: list[tuple[str, str]], x: int, y: int, unit: str, thresholds: float | None
) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if thresholds is not None:
        steps.append({"color": "red", "value": thresholds})
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "datasource": _DS,
        "gridPos": {"h": 8, "w": 6, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "thresholds": {"mode": "absolute", "steps": steps},
                "custom": {"thresholdsStyle": {"mode": "line" if thresholds is not None else "off"}},
            },
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(65 + i), "datasource": _DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard_queries(spec: SLOSpec, model: str, rate_window: str = "$__rate_interval") -> dict[str, str]:
    """The PromQL of a model's panels (the dashboard reads Triton's series directly: no rules needed)."""
    m = f'model="{_label_value(model)}"'
    s = _sel(spec, m)

    def rate(metric: str) -> str:
        return f"sum(rate({metric}{s}[{rate_window}]))"

    success, raised = rate("nv_inference_request_success"), rate("nv_inference_request_failure")
    failure = f"(({raised} or vector(0)) + ({rate(ERROR_RESPONSES)} or vector(0)))"  # see _exprs
    q50, q99 = ',quantile="0.5"', ',quantile="0.99"'
    return {
        "success": f"({success} - ({rate(ERROR_RESPONSES)} or vector(0)))",
        "failure": failure,
        "error_ratio": f"{failure} / ({success} + ({raised} or vector(0)))",
        "p50": f"max(nv_inference_request_summary_us{_sel(spec, m + q50)}) / 1000",
        "p99": f"max(nv_inference_request_summary_us{_sel(spec, m + q99)}) / 1000",
        "mean": f"{rate('nv_inference_request_duration_us')} / {success} / 1000",
        "queue": f"{rate('nv_inference_queue_duration_us')} / {success} / 1000",
        "compute": f"({rate('nv_inference_compute_input_duration_us')} + "
        f"{rate('nv_inference_compute_infer_duration_us')} + "
        f"{rate('nv_inference_compute_output_duration_us')}) / {success} / 1000",
        "batch": f"{rate('nv_inference_count')} / {rate('nv_inference_exec_count')}",
    }


#: above this many rows the dashboard shows the busiest models and one row per model chosen in its
#: ``model`` variable, instead of a row per model (a dashboard of 500 rows is slow and unreadable)
DASHBOARD_ROWS = 20
_TOP = 10  # models in each overview panel


def _model_row(
    spec: SLOSpec, model: str, title: str, pid: int, y: int, lines: dict[str, float | None]
) -> list[dict[str, Any]]:
    """A row panel titled ``title`` and its four panels for ``model`` (a name, or ``$model``)."""
    q = dashboard_queries(spec, model)
    row = [
        ("Requests / s", [(q["success"], "ok"), (q["failure"], "failed")], "reqps", None),
        ("Error ratio", [(q["error_ratio"], "failed / all")], "percentunit", lines["error_rate"]),
        ("Latency", [(q["p50"], "p50"), (q["p99"], "p99"), (q["mean"], "mean")], "ms", lines["latency"]),
        (
            "Queue vs compute · batch size",
            [(q["queue"], "queue ms"), (q["compute"], "compute ms"), (q["batch"], "mean batch size")],
            "none",
            lines["queue_ms"],
        ),
    ]
    panels: list[dict[str, Any]] = [
        {
            "id": pid,
            "type": "row",
            "title": title,
            "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            "panels": [],
        }
    ]
    for i, (name, targets, unit, line) in enumerate(row):
        panels.append(_panel(pid + 1 + i, f"{model}: {name}", targets, 6 * i, y + 1, unit, line))
    return panels


def _lines(o: Objective | None) -> dict[str, float | None]:
    """The objective lines drawn on a model's panels."""
    if o is None:
        return dict.fromkeys(("error_rate", "latency", "queue_ms"))
    return {
        "error_rate": o.error_rate,
        "latency": o.p99_latency_ms or o.mean_latency_ms,
        "queue_ms": o.queue_ms,
    }


def _overview(spec: SLOSpec, y: int) -> list[dict[str, Any]]:
    """A row of the busiest, failing and slowest models among the SLO's (top 10 each)."""
    names = list(dict.fromkeys(model for model, _ in spec.rows))
    s = _sel(spec, _models_matcher(names))
    w = "$__rate_interval"

    def rate(metric: str) -> str:
        return f"sum by (model) (rate({metric}{s}[{w}]))"

    success = rate("nv_inference_request_success")
    raised = f"({rate('nv_inference_request_failure')} or {success} * 0)"
    failure = f"({raised} + ({rate(ERROR_RESPONSES)} or {success} * 0))"  # as the recording rules count
    p99 = _sel(spec, _models_matcher(names) + ',quantile="0.99"')
    p99_ms = f"max by (model) (nv_inference_request_summary_us{p99}) / 1000"
    mean_ms = f"{rate('nv_inference_request_duration_us')} / {success} / 1000"
    top = [
        ("Busiest models: requests / s", f"topk({_TOP}, {success} + {raised})", "reqps"),
        ("Most failed requests / s", f"topk({_TOP}, {failure} > 0)", "reqps"),
        ("Slowest models: p99 ms", f"topk({_TOP}, {p99_ms})", "ms"),
        ("Slowest models: mean latency ms", f"topk({_TOP}, {mean_ms})", "ms"),
    ]
    panels: list[dict[str, Any]] = [
        {
            "id": 1,
            "type": "row",
            "title": f"Overview: the top {_TOP} of {len(names)} models",
            "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            "panels": [],
        }
    ]
    for i, (title, expr, unit) in enumerate(top):
        panels.append(_panel(2 + i, title, [(expr, "{{model}}")], 6 * i, y + 1, unit, None))
    return panels


def _shared_lines(spec: SLOSpec) -> dict[str, float | None]:
    """The objective lines every model of the dashboard shares (None where they differ or are unset)."""
    by_model = {o.model: o for o in spec.objectives}
    per_row = [_lines(by_model.get(model)) for model, _ in spec.rows]
    return {
        key: (values.pop() if len(values := {r[key] for r in per_row}) == 1 else None) for key in per_row[0]
    }


def dashboard(spec: SLOSpec, *, title: str = "Triton models (tritonforge SLOs)") -> dict[str, Any]:
    """A Grafana dashboard (JSON model, importable as is).

    Up to :data:`DASHBOARD_ROWS` models: one row per model and per composing model. Each row: requests
    and failures per second; error ratio; p50/p99 and mean latency; queue vs compute time; the mean batch
    size. Objective thresholds are drawn as lines on their panels.

    More models than that: an overview row (the ten busiest, failing and slowest models) and the same
    row repeated for each model picked in the dashboard's ``model`` variable (its options: the SLO's
    models), so the dashboard has a dozen panels whatever the number of models. Objective lines are
    drawn where every model shares the objective (else the alert rules hold each model's).
    """
    by_model = {o.model: o for o in spec.objectives}
    panels: list[dict[str, Any]] = []
    variables: list[dict[str, Any]] = []
    if len(spec.rows) <= DASHBOARD_ROWS:
        pid, y = 1, 0
        for model, parent in spec.rows:
            title_row = model if parent is None else f"{parent} / {model}"
            panels += _model_row(spec, model, title_row, pid, y, _lines(by_model.get(model)))
            pid, y = pid + 5, y + 9
    else:
        panels = _overview(spec, 0)
        repeated = _model_row(spec, "$model", "$model", len(panels) + 1, 9, _shared_lines(spec))
        repeated[0]["repeat"] = "model"
        panels += repeated
        names = list(dict.fromkeys(model for model, _ in spec.rows))
        first = {"text": names[0], "value": names[0], "selected": True}
        variables.append(
            {
                "name": "model",
                "label": "Model",
                "type": "custom",
                "multi": True,
                "includeAll": False,
                "query": ",".join(names),
                "current": {"text": [names[0]], "value": [names[0]]},
                "options": [first] + [{"text": n, "value": n, "selected": False} for n in names[1:]],
                "hide": 0,
            }
        )
    return {
        "title": title,
        "uid": "tritonforge-slo",
        "tags": ["triton", "tritonforge"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                },
                *variables,
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def write(spec: SLOSpec, out: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``rules.yml`` and ``dashboard.json`` into ``out`` (each replaced whole, never half written).

    Raises:
        SLOError: ``out`` exists and is not a folder, or cannot be written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SLOError(f"--out {out} is a file: give a folder for rules.yml and dashboard.json")
    try:
        out.mkdir(parents=True, exist_ok=True)
        header = f"# generated by `tritonforge slo {spec.source}`; edit the SLO file, not this one\n"
        files = {
            "rules.yml": header + yaml.safe_dump(rules(spec), sort_keys=False, width=1000),
            "dashboard.json": json.dumps(dashboard(spec), indent=2) + "\n",
        }
        for name, text in files.items():
            write_atomic(out / name, text)
    except OSError as exc:
        raise SLOError(f"cannot write into {out}: {exc.strerror}") from None
    return {name.split(".")[0]: out / name for name in ("rules.yml", "dashboard.json")}
