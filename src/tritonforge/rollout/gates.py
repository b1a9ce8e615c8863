"""Evaluation gates: a labelled holdout run through the server, figures kept in the version's manifest,
and the checks ``promote`` / ``rollout`` make against them (with a retraining hook when one fails).

The holdout is an ``.npz`` with the model's inputs by name (or one unnamed array for a one-input model)
and the labels as ``labels`` (or ``y``). Figures: ``accuracy`` and ``macro_f1`` on the arg-max of the
scored output (a one-column output is read as a probability of class 1), ``samples``. Each run is
appended to the manifest's ``evaluations`` and its figures merged into ``metrics``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import operator
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tritonforge.errors import ClientError, GateError, RolloutError
from tritonforge.registry import read_manifest, served_versions
from tritonforge.registry.audit import record_event
from tritonforge.repository.writer import load_config, versions
from tritonforge.rollout.state import write_json_atomic

if TYPE_CHECKING:
    from tritonforge.client.policies import Auth

__all__ = ["Evaluation", "GateError", "check_gates", "evaluate", "parse_gate", "run_hook"]

LOWER_IS_BETTER = ("error", "loss")
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_GATE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|>|<)\s*([-+0-9.eE]+)\s*$")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    model: str
    version: int
    figures: dict[str, float]
    data: str
    data_sha256: str


def _labels_and_inputs(data: Path, input_names: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    if not data.is_file():
        raise RolloutError(f"holdout file {data} does not exist")
    try:
        with np.load(data, allow_pickle=False) as loaded:
            arrays = {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError) as exc:
        raise RolloutError(f"{data}: not a readable .npz holdout ({exc})") from exc
    label_key = next((k for k in ("labels", "y", "label") if k in arrays), None)
    if label_key is None:
        raise RolloutError(
            f"{data}: no labels; save them as 'labels' beside the inputs ({', '.join(input_names)})"
        )
    labels = arrays.pop(label_key)
    if all(n in arrays for n in input_names):
        inputs = {n: arrays[n] for n in input_names}
    elif len(input_names) == 1 and len(arrays) == 1:
        inputs = {input_names[0]: next(iter(arrays.values()))}
    else:
        raise RolloutError(
            f"{data}: has arrays {', '.join(sorted(arrays)) or 'none'} besides the labels; "
            f"the model needs {', '.join(input_names)}"
        )
    return labels, inputs


def _figures(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if scores.ndim == 2 and scores.shape[1] > 1:
        predicted = scores.argmax(axis=1)
    elif scores.dtype.kind in "fc":
        predicted = (scores.reshape(-1) >= 0.5).astype(np.int64)
    else:
        predicted = scores.reshape(-1)
    truth = labels.reshape(-1)
    if predicted.shape != truth.shape:
        raise RolloutError(f"{len(truth)} labels but {len(predicted)} predictions")
    accuracy = float((predicted == truth).mean())
    f1s = []
    for cls in np.unique(truth):
        tp = float(((predicted == cls) & (truth == cls)).sum())
        fp = float(((predicted == cls) & (truth != cls)).sum())
        fn = float(((predicted != cls) & (truth == cls)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    return {"accuracy": accuracy, "macro_f1": float(np.mean(f1s)), "samples": float(len(truth))}


def evaluate(
    repo: str | os.PathLike[str],
    url: str,
    model: str,
    data: str | os.PathLike[str],
    *,
    version: int | None = None,
    output: str | None = None,
    batch_size: int = 64,
    ready_timeout_s: float = 120.0,
    auth: Auth | None = None,
) -> Evaluation:
    """Score ``version`` of ``model`` (default: the served one) on a labelled holdout, through the server.

    A version the server does not serve is loaded for the run under a temporary name (explicit model
    control) and unloaded after. The figures go into the manifest and the audit log.

    Raises:
        RolloutError: bad holdout, unknown version, or the server can't run it (the reason included).
    """
    from tritonforge.client import Client
    from tritonforge.rollout.twin import remove_twin, write_alias
    from tritonforge.rollout.waits import load_and_wait

    root = Path(repo)
    model_dir = root / model
    if not (model_dir / "config.pbtxt").is_file():
        raise RolloutError(f"no model '{model}' in {root}", model=model)
    config = load_config(model_dir)
    found = versions(model_dir)
    served = served_versions(config, found)
    if version is None:
        if not served:
            raise RolloutError(f"'{model}' serves no version; give --version", model=model)
        version = max(served)
    if version not in found:
        raise RolloutError(
            f"'{model}' has no version {version}; it has {', '.join(map(str, found))}", model=model
        )
    path = Path(data)
    labels, inputs = _labels_and_inputs(path, [t.name for t in config.inputs])
    scored = output or config.outputs[0].name
    if scored not in [t.name for t in config.outputs]:
        raise RolloutError(f"'{model}' has no output '{scored}'", model=model)
    target, temporary = model, None
    with Client(url, metrics=False, auth=auth) as client:
        try:
            if not client.is_model_ready(model, version):
                temporary = f"{model}__eval_v{version}"
                remove_twin(root, temporary)  # a leftover of an interrupted evaluation
                write_alias(root, model, temporary, (version,), config)
                load_and_wait(
                    client,
                    temporary,
                    lambda: bool(client.is_model_ready(temporary, version)),
                    timeout_s=ready_timeout_s,
                    url=url,
                    then=f"v{version} of '{model}' could not be evaluated (see the server's log)",
                )
                target = temporary
            rows = len(labels)
            if config.max_batch_size > 0:
                batch_size = min(batch_size, config.max_batch_size)
            parts = []
            for start in range(0, rows, batch_size):
                batch = {k: np.ascontiguousarray(v[start : start + batch_size]) for k, v in inputs.items()}
                parts.append(client.infer(target, batch, version=version, outputs=[scored])[scored])
        except ClientError as exc:
            raise RolloutError(
                f"evaluating v{version} of '{model}' on {url} failed: {exc.message}",
                model=model,
                version=version,
            ) from exc
        finally:
            if temporary is not None:
                with contextlib.suppress(ClientError):
                    client.unload_model(temporary)
                remove_twin(root, temporary)
    figures = _figures(np.concatenate(parts), labels)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    record = {
        "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data": str(path.resolve()),
        "data_sha256": digest,
        "output": scored,
        "server": url,
        "figures": figures,
    }
    manifest_path = model_dir / str(version) / "manifest.json"
    manifest = read_manifest(root, model, version)
    manifest.setdefault("evaluations", []).append(record)
    manifest["metrics"] = {**manifest.get("metrics", {}), **figures}
    write_json_atomic(manifest_path, manifest)
    record_event(
        root,
        "evaluate",
        model=model,
        version=version,
        details={"data": path.name, "data_sha256": digest[:12], "figures": figures},
    )
    return Evaluation(model, version, figures, str(path), digest)


def parse_gate(text: str) -> tuple[str, str, float]:
    """``"accuracy>=0.97"`` → ``("accuracy", ">=", 0.97)``.

    Raises:
        ValueError: not ``<figure><op><number>`` with op one of >=, <=, >, <, ==.
    """
    match = _GATE.match(text)
    if not match:
        raise ValueError(f"gate {text!r} must look like 'accuracy>=0.97' (ops: >=, <=, >, <, ==)")
    return match.group(1), match.group(2), float(match.group(3))


def _latest(repo: Path, model: str, version: int) -> dict[str, Any] | None:
    evaluations = read_manifest(repo, model, version).get("evaluations") or []
    return evaluations[-1] if evaluations else None


def check_gates(
    repo: str | os.PathLike[str],
    model: str,
    version: int,
    *,
    require: Sequence[str] = (),
    no_worse_than_serving: bool = False,
    hook: str | None = None,
    action: str = "promote",
) -> dict[str, float]:
    """Check ``version`` of ``model`` against the gates; return its figures when they pass.

    Raises:
        GateError: a gate failed (each failure with its figures; ``hook`` has been run and the failure
            recorded in the audit log), or the version has no evaluation to judge.
        ValueError: a malformed gate.
    """
    root = Path(repo)
    gates = [parse_gate(g) for g in require]
    latest = _latest(root, model, version)
    failures: list[str] = []
    figures: dict[str, float] = dict(latest["figures"]) if latest else {}
    if latest is None:
        failures.append(
            f"v{version} has no evaluation; run `tritonforge evaluate {model} --version {version} "
            "--data HOLDOUT` first"
        )
    for name, op, bound in gates:
        if latest is None:
            break
        if name not in figures:
            failures.append(f"v{version} has no figure '{name}' (it has {', '.join(sorted(figures))})")
        elif not _OPS[op](figures[name], bound):
            failures.append(f"{name} {figures[name]:.4f} is not {op} {bound:g}")
    if no_worse_than_serving and latest is not None:
        served = served_versions(load_config(root / model), versions(root / model))
        for other in [v for v in served if v != version]:
            theirs = _latest(root, model, other)
            if theirs is None:
                failures.append(f"the served v{other} has no evaluation to compare with; evaluate it first")
                continue
            if theirs.get("data_sha256") != latest.get("data_sha256"):
                failures.append(
                    f"v{version} and the served v{other} were evaluated on different data; "
                    "evaluate both on the same holdout"
                )
                continue
            for name, value in theirs["figures"].items():
                if name == "samples" or name not in figures:
                    continue
                lower = any(word in name for word in LOWER_IS_BETTER)
                worse = figures[name] > value if lower else figures[name] < value
                if worse:
                    failures.append(
                        f"{name} {figures[name]:.4f} is worse than the served v{other}'s {value:.4f}"
                    )
    if failures:
        record_event(
            root,
            "gate-failed",
            model=model,
            version=version,
            details={"for": action, "failures": failures, "figures": figures, "hook": hook},
        )
        if hook:
            run_hook(hook, model=model, version=version, failures=failures)
        raise GateError(
            f"v{version} of '{model}' failed its gate(s), so it was not {action}d: " + "; ".join(failures),
            failures=failures,
            model=model,
            version=version,
        )
    return figures


def run_hook(
    command: str, *, model: str, version: int, failures: Sequence[str], timeout_s: float = 600.0
) -> int:
    """Run the retraining hook ``command`` (through the shell) with the failure in its environment:
    ``TRITONFORGE_MODEL``, ``TRITONFORGE_VERSION``, ``TRITONFORGE_GATE_FAILURES`` (JSON list).

    Returns the hook's exit code (a failing hook does not hide the gate's failure).
    """
    env = {
        **os.environ,
        "TRITONFORGE_MODEL": model,
        "TRITONFORGE_VERSION": str(version),
        "TRITONFORGE_GATE_FAILURES": json.dumps(list(failures)),
    }
    try:
        return subprocess.run(command, shell=True, env=env, timeout=timeout_s, check=False).returncode
    except subprocess.TimeoutExpired:
        return -1
