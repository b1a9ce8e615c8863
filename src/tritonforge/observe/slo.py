"""SLOs as code: a small YAML file of per-model objectives -> Prometheus rules and a Grafana dashboard.

The file (see ``observe/slo.example.yaml``)::

    window: 5m                  # rates are taken over this window
    for: 5m                     # an objective broken this long fires its alert
    selector: 'job="triton"'    # optional: added to every Triton series the rules read
    ensembles: ../ensembles     # optional: pipeline specs, to add an ensemble's composing models as rows
    repository: ../model_repository  # optional: the compiled pipelines there name the models they
                                #   really run (a fused encoder+pooling model, passthrough helpers)
    severity: page              # the alerts' severity label (per model too)
    models:
      digits_vote:
        p99_latency_ms: 50      # Triton's summary quantile (needs --metrics-config=summary_latencies=true)
        mean_latency_ms: 20     # from counters, always available
        error_rate: 0.01        # failed / all requests
        queue_ms: 10            # mean time in Triton's queue
        max_drift_psi: 0.25     # the largest feature PSI `tritonforge drift --metrics-file` exported
    gpu_utilization_max: 0.9    # optional, per GPU (Triton's nv_gpu_utilization, 0..1, mean over window)
    gpu_memory_max: 0.9         # optional, per GPU: nv_gpu_memory_used_bytes / nv_gpu_memory_total_bytes

:func:`load_slo` checks it (every error names the key and how to fix it); :func:`rules` builds the
recording rules (``model:tritonforge_*:rate<window>``) and one alert per objective and model;
:func:`dashboard` builds a Grafana dashboard with a row per model (and per composing model of an
ensemble); :func:`write` puts ``rules.yml`` and ``dashboard.json`` into a folder atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from tritonforge.atomic import write_atomic
from tritonforge.config.validate import model_name_problem
from tritonforge.error_accounting import ERROR_RESPONSES
from tritonforge.errors import ConfigError, SLOError
from tritonforge.files import read_yaml
from tritonforge.observe.gpu_rules import GPU_OBJECTIVES, gpu_rules

__all__ = [
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

OBJECTIVES = ("p99_latency_ms", "mean_latency_ms", "error_rate", "queue_ms", "max_drift_psi")
_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
_TOP_KEYS = {"window", "for", "selector", "ensembles", "repository", "severity", "models", *GPU_OBJECTIVES}
_MODEL_KEYS = {*OBJECTIVES, "for", "severity"}
# PromQL label matchers (name, operator, double-quoted value), comma-separated: what `selector:` may hold
_MATCHER = r'\s*[A-Za-z_][A-Za-z0-9_]*\s*(=|!=|=~|!~)\s*"(?:[^"\\\n]|\\.)*"\s*'
_SELECTOR = re.compile(rf"(?:{_MATCHER}(?:,{_MATCHER})*,?\s*)?")
_SEVERITY = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclasses.dataclass(frozen=True)
class Objective:
    """One model's objectives (``None``: not set) and how long a breach lasts before it fires."""

    model: str
    for_: str
    severity: str
    p99_latency_ms: float | None = None
    mean_latency_ms: float | None = None
    error_rate: float | None = None
    queue_ms: float | None = None
    max_drift_psi: float | None = None


@dataclasses.dataclass(frozen=True)
class SLOSpec:
    """A parsed SLO file: objectives per model, and the dashboard's rows (composing models expanded)."""

    window: str
    for_: str
    selector: str
    objectives: tuple[Objective, ...]
    rows: tuple[tuple[str, str | None], ...]  # (model, the ensemble it serves in, if any)
    source: str = ""
    severity: str = "page"
    gpu_utilization_max: float | None = None  # share 0..1 of each GPU busy, mean over the window
    gpu_memory_max: float | None = None  # share 0..1 of each GPU's memory used


def _duration(value: Any, where: str) -> str:
    text = str(value).strip()
    if not _DURATION.match(text):
        raise SLOError(f"{where}: {value!r} is not a Prometheus duration (write e.g. 30s, 5m, 1h)")
    return text


def _number(value: Any, where: str, *, at_most: float | None = None) -> float:
    # NaN compares false with everything and inf is never exceeded: either makes an alert that never fires
    number = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value) if not isinstance(value, int) or abs(value) < 10**300 else math.inf
    if not math.isfinite(number) or number <= 0:
        raise SLOError(f"{where}: {_shown(value)} must be a finite number above 0")
    if at_most is not None and value > at_most:
        raise SLOError(f"{where}: {value!r} must be at most {at_most} (a share, e.g. 0.01 for 1%)")
    return float(value)


def _shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
    return text if len(text) <= 80 else text[:77] + "..."


def _label_value(text: str) -> str:
    """``text`` as the inside of a double-quoted PromQL string (a label value): ``\\``, ``"`` and
    newlines escaped, so that no value can end the string and add PromQL of its own."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")


def _model_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise SLOError(f"{where}: model names must be non-empty strings, got {_shown(name)}; name each model")
    problem = model_name_problem(name)
    if problem is not None:
        # the name goes into PromQL and alert templates; Triton serves no model by such a name anyway
        raise SLOError(f"{where}: {problem}")
    return name


def _composing(spec_dir: Path) -> dict[str, list[str]]:
    """{pipeline name: the models it runs} from the pipeline specs in ``spec_dir``."""
    from tritonforge.ensemble.spec import load_spec

    out: dict[str, list[str]] = {}
    for path in sorted(spec_dir.glob("*.yaml")):
        spec, issues = load_spec(path)
        if spec is None:
            problems = "; ".join(str(i) for i in issues)
            raise SLOError(f"ensemble spec {path} does not parse ({problems}): fix it or drop `ensembles`")
        models: list[str] = []
        for step in spec.steps:
            models.append(step.model)
        for stage in spec.route:
            models.extend((stage.model, *stage.fallback))
        models.extend(m.name for m in spec.models if m.name not in models)
        out[spec.name] = list(dict.fromkeys(models))
    return out


def _compiled(repo: Path, pipelines: dict[str, list[str]]) -> dict[str, list[str]]:
    """``pipelines`` with each ensemble that ``repo`` holds compiled replaced by the models its steps run
    (and theirs, for an ensemble step, as far as ``repo`` has their configs).

    The compiler may run other models than the spec names (an encoder fused with its pooling step, the
    passthrough helper of an output another step reads); the compiled config is what takes the traffic.
    A pipeline not compiled there, or not an ensemble (a routed pipeline's router), keeps its spec's list.

    Raises:
        SLOError: a compiled pipeline's config.pbtxt that does not parse.
    """
    from tritonforge.config import ComposingWalk, read_config

    out = dict(pipelines)
    for name in pipelines:
        config_file = repo / name / "config.pbtxt"
        if not config_file.is_file():
            continue
        try:
            config = read_config(config_file)
        except Exception as exc:
            raise SLOError(f"{config_file} does not parse ({exc}): rebuild it or drop `repository`") from None
        if config.ensemble_steps:
            walk = ComposingWalk(name)
            for model in walk:
                if model == name:
                    walk.add(step.model_name for step in config.ensemble_steps)
                    continue
                with contextlib.suppress(OSError, ConfigError):  # a model the repository lacks, or can't read
                    steps = read_config(repo / model / "config.pbtxt").ensemble_steps
                    walk.add(step.model_name for step in steps or ())
            out[name] = list(walk.found[1:])
    return out


def load_slo(path: str | os.PathLike[str]) -> SLOSpec:
    """Read and check an SLO file.

    Raises:
        SLOError: unreadable YAML, an unknown key, a bad duration or objective, no models.
    """
    path = Path(path)
    # bounded, regular files only, strict YAML (a key written twice is refused with both lines)
    data = read_yaml(path, what="SLO file", error=SLOError)
    if not isinstance(data, dict):
        raise SLOError(f"{path}: expected a mapping with a `models:` key at the top")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise SLOError(f"{path}: unknown key(s) {sorted(unknown)[:10]}; allowed: {sorted(_TOP_KEYS)}")
    window = _duration(data.get("window", "5m"), f"{path}: window")
    for_ = _duration(data.get("for", "5m"), f"{path}: for")
    selector = _selector(data.get("selector", ""), f"{path}: selector")
    severity = _severity(data.get("severity", "page"), f"{path}: severity")
    for key in ("ensembles", "repository"):
        if key in data and (not isinstance(data[key], str) or not data[key]):
            raise SLOError(f"{path}: {key}: {_shown(data[key])} must be a folder path (a string)")
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise SLOError(f"{path}: `models:` must map each model name to its objectives (none given)")
    objectives = []
    for name, body in models.items():
        where = f"{path}: models.{_model_name(name, f'{path}: models')}"
        if not isinstance(body, dict):
            raise SLOError(f"{where}: expected a mapping of objectives ({', '.join(OBJECTIVES)})")
        bad = set(body) - _MODEL_KEYS
        if bad:
            listed = sorted(map(str, bad))[:10]
            raise SLOError(f"{where}: unknown key(s) {listed}; objectives are {', '.join(OBJECTIVES)}")
        values = {
            key: _number(body[key], f"{where}.{key}", at_most=1.0 if key == "error_rate" else None)
            for key in OBJECTIVES
            if key in body
        }
        objectives.append(
            Objective(
                model=str(name),
                for_=_duration(body.get("for", for_), f"{where}.for"),
                severity=_severity(body.get("severity", severity), f"{where}.severity"),
                **values,
            )
        )
    rows: list[tuple[str, str | None]] = [(o.model, None) for o in objectives]
    if "ensembles" in data:
        spec_dir = (path.parent / str(data["ensembles"])).resolve()
        if not spec_dir.is_dir():
            raise SLOError(f"{path}: ensembles: {spec_dir} is not a folder of pipeline specs")
        pipelines = _composing(spec_dir)
        if "repository" in data:
            repo = (path.parent / str(data["repository"])).resolve()
            if not repo.is_dir():
                raise SLOError(
                    f"{path}: repository: {repo} is not a model repository (build it, or drop `repository`)"
                )
            pipelines = _compiled(repo, pipelines)
        for o in objectives:
            for member in pipelines.get(o.model, []):
                if (member, o.model) not in rows:
                    rows.append((member, o.model))
        rows = _ordered(rows)
    gpu = {key: _number(data[key], f"{path}: {key}", at_most=1.0) for key in GPU_OBJECTIVES if key in data}
    return SLOSpec(window, for_, selector, tuple(objectives), tuple(rows), str(path), severity, **gpu)


def _selector(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise SLOError(f"{where}: {_shown(value)} must be label matchers as text, e.g. 'job=\"triton\"'")
    text = value.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    if not _SELECTOR.fullmatch(text):
        raise SLOError(
            f"{where}: {_shown(value)} is not a list of PromQL label matchers; write e.g. "
            '\'job="triton", namespace=~"prod-.*"\' (name, =, !=, =~ or !~, a double-quoted value)'
        )
    return text.strip().rstrip(",").strip()


def _severity(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _SEVERITY.fullmatch(value):
        raise SLOError(
            f"{where}: {_shown(value)} must be a word of letters, digits, '_', '-' or '.' (e.g. page, ticket)"
        )
    return value


def _ordered(rows: list[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """Each model's row followed by its composing models' rows."""
    out: list[tuple[str, str | None]] = []
    for model, parent in rows:
        if parent is None:
            out.append((model, None))
            out.extend(r for r in rows if r[1] == model)
    return out


# -- rules --------------------------------------------------------------------------------------------


def _sel(spec: SLOSpec, extra: str = "") -> str:
    parts = [p for p in (spec.selector, extra) if p]
    return "{" + ",".join(parts) + "}" if parts else ""


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
    # Triton counts a Python model's error response as a success: the models tritonforge generates count
    # those in their own counter (see tritonforge.error_accounting.ERROR_RESPONSES), added here
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


def rules(spec: SLOSpec) -> dict[str, Any]:
    """Prometheus rule groups: the recording rules every objective reads, and one alert per objective.

    Raises:
        SLOError: never for a spec from :func:`load_slo` (kept for hand-built specs with no objectives).
    """
    if not spec.objectives:
        raise SLOError("an SLO spec without objectives gives no rules: add models with objectives")
    names, exprs = _record_names(spec.window), _exprs(spec, spec.window)
    recording = [{"record": names[k], "expr": exprs[k]} for k in names]
    alerts: list[dict[str, Any]] = []
    for o in spec.objectives:
        for objective, (alert, key, what, unit) in _ALERTS.items():
            threshold = getattr(o, objective)
            if threshold is None:
                continue
            shown = f'{{{{ $value | printf "%.4g" }}}}{unit}'
            alerts.append(
                {
                    "alert": alert,
                    "expr": f'{names[key]}{{model="{_label_value(o.model)}"}} > {threshold:g}',
                    "for": o.for_,
                    "labels": {"severity": o.severity, "slo": objective, "model": o.model},
                    "annotations": {
                        "summary": f"{o.model}: {what} above its objective ({threshold:g}{unit})",
                        "description": f"{what} of {o.model} over {spec.window} is {shown} "
                        f"(objective {threshold:g}{unit}) for {o.for_}.",
                    },
                }
            )
        if o.max_drift_psi is not None:
            alerts.append(
                {
                    "alert": "TritonModelInputDrift",
                    "expr": f'max by (model) (tritonforge_drift_psi{{model="{_label_value(o.model)}"}})'
                    f" > {o.max_drift_psi:g}",
                    "for": "0s",
                    "labels": {"severity": o.severity, "slo": "max_drift_psi", "model": o.model},
                    "annotations": {
                        "summary": f"{o.model}: traffic drifted from its reference profile",
                        "description": f"largest feature PSI of {o.model} is "
                        f'{{{{ $value | printf "%.3g" }}}} '
                        f"(objective {o.max_drift_psi:g}); run `tritonforge drift` for the report.",
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


def dashboard(spec: SLOSpec, *, title: str = "Triton models (tritonforge SLOs)") -> dict[str, Any]:
    """A Grafana dashboard (JSON model, importable as is): one row per model and per composing model.

    Each row: requests and failures per second; error ratio; p50/p99 and mean latency; queue vs compute
    time; the mean batch size. Objective thresholds are drawn as lines on their panels.
    """
    by_model = {o.model: o for o in spec.objectives}
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for model, parent in spec.rows:
        o = by_model.get(model)
        q = dashboard_queries(spec, model)
        title_row = model if parent is None else f"{parent} / {model}"
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": title_row,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y = pid + 1, y + 1
        latency_line = None if o is None else (o.p99_latency_ms or o.mean_latency_ms)
        row = [
            ("Requests / s", [(q["success"], "ok"), (q["failure"], "failed")], "reqps", None),
            ("Error ratio", [(q["error_ratio"], "failed / all")], "percentunit", o.error_rate if o else None),
            ("Latency", [(q["p50"], "p50"), (q["p99"], "p99"), (q["mean"], "mean")], "ms", latency_line),
            (
                "Queue vs compute · batch size",
                [(q["queue"], "queue ms"), (q["compute"], "compute ms"), (q["batch"], "mean batch size")],
                "none",
                o.queue_ms if o else None,
            ),
        ]
        for i, (name, targets, unit, line) in enumerate(row):
            panels.append(_panel(pid, f"{model}: {name}", targets, 6 * i, y, unit, line))
            pid += 1
        y += 8
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
                }
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
