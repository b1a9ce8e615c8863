"""CLI verbs that build a repository: export, quantize, build, and the demo that builds and serves it."""

from __future__ import annotations

import importlib
import pickle
import subprocess
import sys
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.table import Table

from tritonforge.commands import err_console, fail, print_error, reported
from tritonforge.commands._options import json_flag, out_option, repo_option
from tritonforge.commands._output import make_console, print_json
from tritonforge.commands.registry import ModelSort, models
from tritonforge.errors import ExportError, QuantizationError, RepositoryError, TritonForgeError
from tritonforge.files import MAX_MODEL_BYTES, MAX_ONNX_BYTES, check_regular

console = make_console()
_fail = fail  # one way to report errors for every verb (tritonforge.commands)


class ExportFormat(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"


class QuantizeMode(str, Enum):
    int8_dynamic = "int8-dynamic"
    int8_static = "int8-static"
    fp16 = "fp16"


def _load_source(source: str) -> Any:
    """A model from ``package.module:attribute`` (called if callable) or a pickle file."""
    path = Path(source)
    if path.suffix in {".pkl", ".pickle", ".joblib", ".pt", ".pth"}:
        check_regular(path, what="model file", limit=MAX_MODEL_BYTES, error=ExportError)
        if path.suffix in {".pt", ".pth"}:
            import torch

            return torch.load(str(path), weights_only=False)
        with path.open("rb") as stream:
            return pickle.load(stream)
    if ":" not in source:
        raise ExportError(f"{source!r}: give a pickle file (.pkl/.joblib/.pt) or 'package.module:attribute'")
    module_name, attribute = source.split(":", 1)
    try:
        obj = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ExportError(f"can't import {source}: {exc}") from exc
    return obj() if callable(obj) and not hasattr(obj, "forward") and not hasattr(obj, "fit") else obj


def _load_arrays(path: Path, names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Named arrays from .npz, or one array from .npy (named after the first of ``names``)."""
    check_regular(path, what="sample file", limit=MAX_MODEL_BYTES, error=TritonForgeError)
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    return {names[0] if names else "input": np.load(path)}


def _batches(arrays: Mapping[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    rows = len(next(iter(arrays.values())))
    return [{k: v[i : i + size] for k, v in arrays.items()} for i in range(0, rows, size)]


def _figures_table(title: str, reports: Mapping[str, Any]) -> Table:
    table = Table(title=title)
    for column in (
        "output",
        "samples",
        "max abs",
        "max rel",
        "cosine mean",
        "cosine min",
        "accuracy",
        "ref accuracy",
        "passed",
    ):
        table.add_column(column, justify="right" if column not in ("output", "passed") else "left")
    for name, r in reports.items():
        table.add_row(
            name,
            str(r.samples),
            f"{r.max_abs:.3g}",
            f"{r.max_rel:.3g}",
            f"{r.cosine_mean:.5f}",
            f"{r.cosine_min:.5f}",
            "" if r.accuracy is None else f"{r.accuracy:.4f}",
            "" if r.accuracy_reference is None else f"{r.accuracy_reference:.4f}",
            "[green]yes[/]" if r.passed else "[red]no: " + "; ".join(r.failures) + "[/]",
        )
    return table


def _parse_axes(specs: Sequence[str], names: Sequence[str]) -> dict[str, dict[int, str]] | None:
    if not specs:
        return None
    axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in names}
    for spec in specs:
        try:
            name, axis, label = spec.split(":")
            axes.setdefault(name, {})[int(axis)] = label
        except ValueError as exc:
            raise ExportError(
                f"--dynamic-axis {spec!r}: use NAME:AXIS:LABEL, e.g. input_ids:1:sequence"
            ) from exc
    return axes


# export and quantize register what they made and report its figures alike
_NAME = typer.Option(None, help="The model's name in --repo.")
_MAX_BATCH_SIZE = typer.Option(None, help="max_batch_size of the registered model.")
_JSON_FIGURES = json_flag("The figures (and where it was registered) as JSON.")


def export(
    source: str = typer.Argument(
        ..., help="A pickled model (.pkl/.joblib/.pt) or 'package.module:attribute'."
    ),
    out: Path = out_option(None, "The artifact to write (.onnx or .pt)."),
    sample: Path = typer.Option(
        ..., help="Sample inputs (.npy, or .npz of named arrays) to check the export on."
    ),
    fmt: ExportFormat = typer.Option(
        ExportFormat.onnx, "--format", help="onnx, or torchscript (torch models only)."
    ),
    input_name: list[str] = typer.Option([], help="Input names (torch; default: input)."),
    output_name: list[str] = typer.Option([], help="Output names (torch; default: output)."),
    dynamic_axis: list[str] = typer.Option(
        [], help="NAME:AXIS:LABEL, e.g. input_ids:1:sequence (axis 0 is batch)."
    ),
    opset: int | None = typer.Option(None, help="ONNX opset (default 17)."),
    atol: float = typer.Option(1e-4, help="Largest abs difference from the source that passes."),
    labels: Path | None = typer.Option(None, help="True labels (.npy) for accuracy figures."),
    repo: Path | None = typer.Option(None, help="Also register the artifact in this repository."),
    name: str | None = _NAME,
    max_batch_size: int | None = _MAX_BATCH_SIZE,
    force: bool = typer.Option(False, help="Register it even if the check failed."),
    as_json: bool = _JSON_FIGURES,
) -> None:
    """Export a torch module or scikit-learn estimator, check it against its source, register it (--repo)."""
    from tritonforge.export import export_onnx, export_sklearn, export_torchscript
    from tritonforge.export.sklearn import DEFAULT_SKLEARN_OPSET
    from tritonforge.quantize import Tolerance

    try:
        with console.status(f"loading {source} ..."):
            model = _load_source(source)
        arrays = _load_arrays(sample, list(input_name) or ["input"])
        inputs = list(input_name) or list(arrays)  # an .npz's own order unless names are given
        missing = [n for n in inputs if n not in arrays]
        if missing:
            raise ExportError(f"{sample} has no arrays named {missing}; it has {sorted(arrays)}")
        y = np.load(labels) if labels else None
        with console.status(
            f"exporting {type(model).__name__} to {fmt.value} and checking it against the source ..."
        ):
            if hasattr(model, "forward"):
                import torch

                example = tuple(torch.from_numpy(arrays[n]) for n in inputs)
                if fmt is ExportFormat.torchscript:
                    artifact = export_torchscript(model, example, out, tolerance=Tolerance(max_abs=atol))
                else:
                    outputs = list(output_name) or ["output"]
                    artifact = export_onnx(
                        model,
                        example,
                        out,
                        input_names=inputs,
                        output_names=outputs,
                        dynamic_axes=_parse_axes(dynamic_axis, [*inputs, *outputs]),
                        opset=opset,
                        tolerance=Tolerance(max_abs=atol),
                    )
            elif hasattr(model, "predict"):
                artifact = export_sklearn(
                    model,
                    next(iter(arrays.values())),
                    out,
                    labels=y,
                    tolerance=Tolerance(max_abs=atol),
                    opset=opset or DEFAULT_SKLEARN_OPSET,
                )
            else:
                raise ExportError(
                    f"{type(model).__name__} is neither a torch module nor a scikit-learn estimator"
                )
        if not as_json:
            console.print(_figures_table(f"{out}: vs the source", artifact.reports))
        registered = _maybe_register(artifact, repo, name, source, force, max_batch_size, as_json)
    except TritonForgeError as exc:
        raise _fail(exc) from None
    if as_json:
        print_json(_artifact_json(out, artifact, registered))
    if not artifact.passed and not force:
        raise typer.Exit(code=1)


def _artifact_json(out: Path, artifact: Any, registered: Path | None) -> dict[str, Any]:
    """What export and quantize print with --json: the artifact, its figures and where it went."""
    return {
        "out": out,
        "passed": artifact.passed,
        "settings": dict(artifact.settings),
        "reports": {name: report.as_dict() for name, report in artifact.reports.items()},
        "registered": registered,
    }


def _maybe_register(
    artifact: Any,
    repo: Path | None,
    name: str | None,
    source: str,
    force: bool,
    max_batch_size: int | None,
    quiet: bool = False,
) -> Path | None:
    from tritonforge.registry import register

    if repo is None:
        return None
    if not name:
        raise RepositoryError("--repo needs --name (the model's name in the repository)")
    src: Any = source if Path(source).exists() else {"path": source, "sha256": None}
    options: dict[str, Any] = {"max_batch_size": max_batch_size} if max_batch_size is not None else {}
    path = register(repo, name, artifact, source=src, force=force, **options)
    if not quiet:
        console.print(f"registered [bold]{name}[/] version {path.name} at {path}")
    return path


def quantize(
    source: Path = typer.Argument(..., help="The FP32 ONNX model."),
    out: Path = out_option(None, "The quantized model to write."),
    mode: QuantizeMode = typer.Option(
        QuantizeMode.int8_dynamic, help="INT8 weights only, INT8 calibrated, or FP16."
    ),
    holdout: Path = typer.Option(..., help="Held-out inputs (.npz of named arrays, or .npy) to verify on."),
    calibration: Path | None = typer.Option(None, help="Calibration inputs (.npz/.npy) for int8-static."),
    labels: Path | None = typer.Option(None, help="True labels of the held-out rows (.npy) for accuracy."),
    batch_size: int = typer.Option(32, help="Rows per batch when feeding samples."),
    per_channel: bool = typer.Option(True, help="Per-channel weight scales (INT8)."),
    keep_io_types: bool = typer.Option(True, help="FP16: keep inputs and outputs FP32."),
    mask_input: str | None = typer.Option(
        None, help="An attention-mask input: padded tokens are not compared."
    ),
    min_cosine_mean: float = typer.Option(0.99, help="Tolerance: least mean cosine similarity to FP32."),
    min_cosine_min: float = typer.Option(0.95, help="Tolerance: least minimum cosine similarity."),
    max_accuracy_drop: float = typer.Option(0.01, help="Tolerance: largest accuracy loss (with --labels)."),
    repo: Path | None = typer.Option(None, help="Also register the result in this repository."),
    name: str | None = _NAME,
    max_batch_size: int | None = _MAX_BATCH_SIZE,
    force: bool = typer.Option(False, help="Register it even if it failed its tolerance."),
    as_json: bool = _JSON_FIGURES,
) -> None:
    """Quantize an ONNX model (INT8 dynamic/static, FP16) and verify it against the FP32 source."""
    from tritonforge.quantize import Tolerance, quantize_dynamic, quantize_static, to_fp16

    tolerance = Tolerance(
        min_cosine_mean=min_cosine_mean, min_cosine_min=min_cosine_min, max_accuracy_drop=max_accuracy_drop
    )
    try:
        check_regular(source, what="model file", limit=MAX_ONNX_BYTES, error=QuantizationError)
        import onnxruntime as ort

        names = [
            i.name for i in ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).get_inputs()
        ]
        held = _batches(_load_arrays(holdout, names), batch_size)
        y = np.load(labels) if labels else None
        common: dict[str, Any] = {
            "holdout": held,
            "tolerance": tolerance,
            "labels": y,
            "mask_input": mask_input,
        }
        with console.status(
            f"{mode.value}: quantizing {source.name} and verifying on {len(held)} batches ..."
        ):
            if mode is QuantizeMode.int8_dynamic:
                artifact = quantize_dynamic(source, out, per_channel=per_channel, **common)
            elif mode is QuantizeMode.int8_static:
                if calibration is None:
                    raise QuantizationError("int8-static needs --calibration samples")
                calib = _batches(_load_arrays(calibration, names), batch_size)
                artifact = quantize_static(source, out, calibration=calib, per_channel=per_channel, **common)
            else:
                artifact = to_fp16(source, out, keep_io_types=keep_io_types, **common)
        if not as_json:
            console.print(_figures_table(f"{out.name} ({mode.value}) vs {source.name}", artifact.reports))
            size = artifact.settings.get("file_bytes", 0) / max(
                artifact.settings.get("source_file_bytes", 1), 1
            )
            console.print(f"size: {size:.1%} of the source")
        registered = _maybe_register(artifact, repo, name, str(source), force, max_batch_size, as_json)
    except TritonForgeError as exc:
        raise _fail(exc) from None
    if as_json:
        print_json(_artifact_json(out, artifact, registered))
    if not artifact.passed:
        err_console.print(
            "[bold red]failed its tolerance:[/] " + "; ".join(artifact.failures()), highlight=False
        )
        if not force:
            raise typer.Exit(code=1)


def build(
    repo: Path = repo_option("The repository to build into."),
    tools: Path | None = typer.Option(
        None, help="A folder of your own build_*.py scripts (default: the example builders shipped here)."
    ),
    ensembles: Path | None = typer.Option(
        None, help="Pipeline specs compiled after the models (default: the example pipelines shipped here)."
    ),
    only: list[str] = typer.Option([], help="Run only these steps: digits, minilm, ensembles."),
    force: bool = typer.Option(False, help="Rebuild even unchanged models."),
) -> None:
    """Build the example repository: the example model builders, then the example pipelines.

    Works from any folder (the builders and specs ship in the package, ``pip install tritonforge[examples]``).
    Each builder writes every version atomically and skips what is unchanged, so an interrupted build
    leaves the previous repository servable and a rerun does only what is missing.
    """
    from tritonforge.examples import BUILDERS, SPECS_DIR, builder_module

    flag = ["--force"] if force else []
    steps: list[tuple[str, list[str]]] = []
    if tools is None:
        for name in BUILDERS:
            if not only or name in only:
                module = builder_module(name)
                steps.append((module, [sys.executable, "-m", module, "--repo", str(repo), *flag]))
    else:
        for script in sorted(tools.glob("build_*.py")):
            if not only or script.stem.removeprefix("build_") in only:
                steps.append((script.name, [sys.executable, str(script), "--repo", str(repo), *flag]))
    specs = SPECS_DIR if ensembles is None else ensembles
    if (not only or "ensembles" in only) and specs.is_dir():
        compile_command = [sys.executable, "-m", "tritonforge", "ensemble", "compile", str(specs)]
        steps.append((f"{specs}/ (ensemble compile)", [*compile_command, "--repo", str(repo)]))
    if not steps:
        where = "the example builders" if tools is None else f"build_*.py scripts in {tools.resolve()}"
        raise _fail(RepositoryError(f"nothing to build: no {where} match --only {' '.join(only)}"))
    failed = []
    for name, command in steps:
        console.rule(name)
        with console.status(f"running {name} ..."):
            done = subprocess.run(command, check=False)
        if done.returncode:
            failed.append(name)
    # called directly: every parameter given, none left a typer default
    models(repo, as_json=False, match=[], sort=ModelSort.name, limit=None)
    if failed:
        err_console.print(
            f"[bold red]failed:[/] {', '.join(failed)}; the repository keeps its previous versions"
        )
        raise typer.Exit(code=1)


def demo(
    repo: Path = repo_option("The example repository to build and serve."),
    build: bool = typer.Option(True, help="Run `tritonforge build` first (unchanged models are skipped)."),
    frameworks: bool = typer.Option(True, help="Also serve a torch MLP as ONNX and as TorchScript."),
    requests: int = typer.Option(0, help="Digits sent in the frameworks part (default: the test split)."),
) -> None:
    """The main job, end to end: build the example repository, run its pipelines on Triton, report."""
    from tritonforge.examples.demo import run_main_job

    try:
        run_main_job(console, repo, build=build, frameworks=frameworks, limit=requests or None)
    except TritonForgeError as exc:
        raise _fail(exc) from None


def register(app: typer.Typer) -> None:
    app.command()(demo)
    app.command()(export)
    app.command()(quantize)
    app.command()(build)


def print_python_requirements(out: Any, repo: Path, target: str, *, strict: bool) -> bool:
    """One line per Python model of ``repo``: what it imports beyond ``target``'s Python backend, each
    package marked declared or undeclared (by its ``requirements.txt``). Returns whether ``strict`` fails.

    Raises:
        typer.Exit: ``target`` is not an image tag or ``python3.X`` (exit 2), or ``repo`` can't be read.
    """
    from rich.markup import escape

    from tritonforge.repository.requirements import REQUIREMENTS_FILE, model_requirements

    with reported():
        found = model_requirements(repo, target)
    python = ".".join(map(str, found[0].python)) if found else ""
    out.print(
        f"{len(found)} Python model(s); beyond {escape(target)} (Python {python}, numpy):", highlight=False
    )
    for model in found:
        parts = [
            f"{r.line().split('  #')[0]} ({'undeclared' if r in model.undeclared else 'declared'})"
            for r in model.required
        ]
        parts += [f"optional {r.name}" for r in model.optional]
        out.print(
            f"  {model.model}: {', '.join(parts) or 'nothing beyond the image'}",
            markup=False,
            highlight=False,
        )
    missing = [m for m in found if m.undeclared]
    if missing and strict:
        named = "; ".join(f"{m.model}: {', '.join(r.name for r in m.undeclared)}" for m in missing)
        print_error(
            f"{len(missing)} Python model(s) import packages no {REQUIREMENTS_FILE} declares ({named}); "
            f"rebuild them or add the lines to <model>/<version>/{REQUIREMENTS_FILE}"
        )
    return bool(missing) and strict
