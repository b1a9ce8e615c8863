"""The SLO file: a small YAML file of per-model objectives, read and checked into an :class:`SLOSpec`.

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

:func:`load_slo` checks it (every error names the key and how to fix it). The PromQL helpers that quote
its model names and selector (never letting a name add PromQL of its own) are here too, for the rules
and the dashboard :mod:`tritonforge.observe.slo` builds from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

from tritonforge.config.validate import model_name_problem
from tritonforge.errors import ConfigError, SLOError
from tritonforge.files import read_yaml
from tritonforge.observe.gpu_rules import GPU_OBJECTIVES

__all__ = ["OBJECTIVES", "Objective", "SLOError", "SLOSpec", "load_slo"]

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
        known = set(rows)  # a set beside the list: 500 models are not 500 scans of the rows
        for o in objectives:
            for member in pipelines.get(o.model, []):
                if (member, o.model) not in known:
                    known.add((member, o.model))
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
    members: dict[str, list[tuple[str, str | None]]] = {}
    for row in rows:
        if row[1] is not None:
            members.setdefault(row[1], []).append(row)
    out: list[tuple[str, str | None]] = []
    for model, parent in rows:
        if parent is None:
            out.append((model, None))
            out.extend(members.get(model, ()))
    return out


# -- PromQL of the spec's names ----------------------------------------------------------------------


def _sel(spec: SLOSpec, extra: str = "") -> str:
    parts = [p for p in (spec.selector, extra) if p]
    return "{" + ",".join(parts) + "}" if parts else ""


def _models_matcher(models: list[str]) -> str:
    """The label matcher selecting exactly ``models``: ``model="a"``, or ``model=~"a|b"`` (each name a
    literal: regex characters escaped; Prometheus anchors the regex and looks such a list up as a set)."""
    if len(models) == 1:
        return f'model="{_label_value(models[0])}"'
    return f'model=~"{_label_value("|".join(re.escape(m) for m in models))}"'
