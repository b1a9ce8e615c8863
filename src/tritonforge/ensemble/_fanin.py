"""Fan-in fusion: ONNX member models side by side, and a ``combiner`` block's math after them, as one model.

:func:`fan_in` decides whether a ``combiner`` step and the ONNX members feeding it fuse (called by the pass
in :mod:`tritonforge.ensemble.fuse`), :func:`write_fan_in` writes the graph and :func:`check_fan_in` checks
it; a fusion that can't be checked equal is dropped and the steps compile as written. Each member's graph is
copied in under its own prefix (``m<k>/``), keeps only the nodes its one used output needs (a
scikit-learn export also computes a label no one reads), and reads the fused model's input named after the
pipeline tensor it was fed. The combiner's ``average``, ``weighted`` and ``vote`` become a dozen standard
operators (ArgMax, Equal, Sum, Where ...), so the fused model is a plain ONNX model on any onnxruntime.

The check runs every member on its own and the combiner block's own ``combine`` function (read from the
block's ``model.py``, not rewritten here) on a random batch, and compares every output of the fused model.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tritonforge.config import DataType, ModelConfig, TensorSpec
from tritonforge.ensemble._fuse_check import measured_layout
from tritonforge.ensemble._fusing import FUSE_TOLERANCE, FusedModel, name_free, onnx_source
from tritonforge.ensemble.blocks import GENERATED_MARK
from tritonforge.ensemble.check import Resolved
from tritonforge.ensemble.spec import BlockModelSpec, StepSpec
from tritonforge.repository import file_sha256, with_layout

__all__ = ["Member", "check_fan_in", "fan_in", "write_fan_in"]

#: the combiner's outputs in the fused model, under the block's own names
COMBINED, LABEL = "PROBABILITIES", "LABEL"


@dataclasses.dataclass(frozen=True)
class Member:
    """One member model: its ONNX file, which fused input feeds each of its inputs, its output read."""

    path: Path
    inputs: Mapping[str, str]  # member graph input -> fused model input
    output: str  # the member graph's output the combiner reads
    exposed: str | None  # the fused model's output of it (``PROBS_<k>``), when the pipeline uses it too


def _needed(nodes: Sequence[Any], outputs: set[str]) -> list[Any]:
    """The nodes ``outputs`` depend on, in their order (the rest is dead weight)."""
    want = set(outputs)
    kept = []
    for node in reversed(nodes):
        if want.intersection(node.output):
            kept.append(node)
            want.update(n for n in node.input if n)
    return kept[::-1]


def _rename(nodes: Sequence[Any], names: Mapping[str, str]) -> None:
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in names:
                node.input[i] = names[name]
        for i, name in enumerate(node.output):
            if name in names:
                node.output[i] = names[name]


def _combiner_nodes(
    probs: Sequence[str], method: str, weights: np.ndarray, classes: int, opset: int, want: set[str]
) -> tuple[list[Any], list[Any]]:
    """Nodes and initializers computing the combiner block's PROBABILITIES and LABEL from ``probs``."""
    from onnx import TensorProto, helper, numpy_helper

    def t(name: str) -> str:
        return f"tritonforge_combine/{name}"

    n = len(probs)
    inits = [numpy_helper.from_array(np.array(np.float32(n)), t("members"))]
    nodes: list[Any] = []
    if method == "vote":
        inits += [
            numpy_helper.from_array(np.arange(classes, dtype=np.int64)[None, :], t("classes")),
            numpy_helper.from_array(np.array(np.float32(-1.0)), t("minus_one")),
        ]
        for k, p in enumerate(probs):
            nodes += [
                helper.make_node("ArgMax", [p], [t(f"pick{k}")], axis=1, keepdims=1),
                helper.make_node("Equal", [t(f"pick{k}"), t("classes")], [t(f"hit{k}")]),
                helper.make_node("Cast", [t(f"hit{k}")], [t(f"one{k}")], to=TensorProto.FLOAT),
            ]
        nodes += [
            helper.make_node("Sum", [t(f"one{k}") for k in range(n)], [t("votes")], name=t("votes")),
            helper.make_node("Sum", list(probs), [t("total")], name=t("total")),
            helper.make_node("Div", [t("total"), t("members")], [t("mean")], name=t("mean")),
        ]
        if opset >= 18:  # ReduceMax took its axes as an input from opset 18
            inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), t("axis1")))
            nodes.append(helper.make_node("ReduceMax", [t("votes"), t("axis1")], [t("top")], keepdims=1))
        else:
            nodes.append(helper.make_node("ReduceMax", [t("votes")], [t("top")], axes=[1], keepdims=1))
        nodes += [
            helper.make_node("Equal", [t("votes"), t("top")], [t("is_top")], name=t("is_top")),
            # among the classes with the most votes, the one with the highest mean probability wins
            helper.make_node("Where", [t("is_top"), t("mean"), t("minus_one")], [t("masked")]),
        ]
        if LABEL in want:
            nodes.append(helper.make_node("ArgMax", [t("masked")], [LABEL], axis=1, keepdims=1))
        if COMBINED in want:
            nodes.append(helper.make_node("Div", [t("votes"), t("members")], [COMBINED], name=t("shares")))
        return nodes, inits
    for k, p in enumerate(probs):
        inits.append(numpy_helper.from_array(np.array(weights[k], dtype=np.float32), t(f"w{k}")))
        nodes.append(helper.make_node("Mul", [p, t(f"w{k}")], [t(f"part{k}")], name=t(f"part{k}")))
    combined = COMBINED if COMBINED in want else t("combined")
    nodes.append(helper.make_node("Sum", [t(f"part{k}") for k in range(n)], [combined], name=t("sum")))
    if LABEL in want:
        nodes.append(helper.make_node("ArgMax", [combined], [LABEL], axis=1, keepdims=1, name=t("label")))
    return nodes, inits


def write_fan_in(
    members: Sequence[Member],
    method: str,
    weights: np.ndarray,
    classes: int,
    want: set[str],
    target: Path,
) -> bool:
    """Write the fused model to ``target``; False when the members' graphs can't be put side by side.

    ``want`` names the combiner outputs the pipeline reads (``PROBABILITIES``, ``LABEL``).
    """
    import onnx
    from onnx import TensorProto, compose, helper

    graphs: list[tuple[list[Any], list[Any], str, Any]] = []
    inputs: dict[str, Any] = {}
    opsets: dict[str, int] = {}
    ir_version = 0
    for k, member in enumerate(members):
        model = onnx.load(str(member.path))
        if model.functions or any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for node in model.graph.node
            for a in node.attribute
        ):
            return False  # local functions or subgraphs: not worth the risk of a wrong rename
        outs = {o.name: o for o in model.graph.output}
        out = outs.get(member.output)
        if out is None or out.type.tensor_type.elem_type != TensorProto.FLOAT:
            return False
        if out.type.tensor_type.shape.dim and len(out.type.tensor_type.shape.dim) != 2:
            return False
        for entry in model.opset_import:
            domain = entry.domain or ""
            opsets[domain] = max(opsets.get(domain, 0), entry.version)
        ir_version = max(ir_version, model.ir_version)
        prefix = f"m{k}/"
        model = compose.add_prefix(model, prefix)
        graph = model.graph
        given = {i.name[len(prefix) :]: i for i in graph.input}
        if set(given) - {i.name for i in graph.initializer} != set(member.inputs):
            return False
        names = {prefix + name: fused for name, fused in member.inputs.items()}
        result = member.exposed or f"{prefix}{member.output}"
        names[prefix + member.output] = result
        nodes = _needed(list(graph.node), {prefix + member.output})
        _rename(nodes, names)
        for name, fused in member.inputs.items():
            value = onnx.ValueInfoProto()
            value.CopyFrom(given[name])
            value.name = fused
            if fused in inputs and inputs[fused].type != value.type:
                return False  # two members read one tensor with different types
            inputs.setdefault(fused, value)
        used = {n for node in nodes for n in node.input}
        inits = [i for i in graph.initializer if i.name in used]
        graphs.append((nodes, inits, result, out))
    opset = opsets.get("", 0)
    if opset < 13:
        return False
    probs = [result for _, _, result, _ in graphs]
    nodes, inits = _combiner_nodes(probs, method, weights, classes, opset, want)
    outputs = []
    batch = "batch"
    if COMBINED in want:
        outputs.append(helper.make_tensor_value_info(COMBINED, TensorProto.FLOAT, [batch, classes]))
    if LABEL in want:
        outputs.append(helper.make_tensor_value_info(LABEL, TensorProto.INT64, [batch, 1]))
    for member, (_, _, result, _) in zip(members, graphs, strict=True):
        if member.exposed:
            outputs.append(helper.make_tensor_value_info(result, TensorProto.FLOAT, [batch, classes]))
    graph = helper.make_graph(
        [node for g in graphs for node in g[0]] + nodes,
        "tritonforge_fan_in",
        list(inputs.values()),
        outputs,
        initializer=[init for g in graphs for init in g[1]] + inits,
    )
    merged = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())]
    )
    merged.ir_version = ir_version
    onnx.checker.check_model(merged)
    onnx.save(merged, str(target))
    return True


def _combine_function() -> Any:
    """The combiner block's own ``combine`` (``models/combiner.py``), without its Triton imports."""
    from tritonforge.ensemble.blocks import model_file

    source = model_file("combiner").read_text()
    tree = ast.parse(source)
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "combine")
    namespace: dict[str, Any] = {"np": np}
    exec(compile(ast.Module(body=[function], type_ignores=[]), "combiner.py", "exec"), namespace)
    return namespace["combine"]


def check_fan_in(
    members: Sequence[Member],
    method: str,
    weights: np.ndarray,
    fused: Path,
    feeds: Mapping[str, np.ndarray],
    want: set[str],
) -> float:
    """Largest |fused - (members one by one + the block's combine)| over every output; inf on a mismatch
    of labels or shapes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1

    def session(path: Path) -> Any:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    expected: dict[str, np.ndarray] = {}
    probs = []
    for member in members:
        run = session(member.path)
        fed = {name: feeds[fused_name] for name, fused_name in member.inputs.items()}
        got = run.run([member.output], fed)
        probs.append(np.asarray(got[0], dtype=np.float32))
        if member.exposed:
            expected[member.exposed] = probs[-1]
    combined, label = _combine_function()(np.stack(probs), method, weights)
    expected[COMBINED] = np.asarray(combined, dtype=np.float32)
    expected[LABEL] = np.asarray(label, dtype=np.int64)[:, None]
    names = [name for name in expected if name in want or name not in (COMBINED, LABEL)]
    answers = dict(zip(names, session(fused).run(names, dict(feeds)), strict=True))
    worst = 0.0
    for name in names:
        got, exp = answers[name], expected[name]
        if got.shape != exp.shape or (name == LABEL and not np.array_equal(got, exp)):
            return float("inf")
        worst = max(worst, float(np.abs(got.astype(np.float64) - exp).max(initial=0.0)))
    return worst


def fan_in(
    steps: list[StepSpec],
    combine: StepSpec,
    block: BlockModelSpec,
    resolved: Resolved,
    repo: Path,
    scratch: Path,
) -> tuple[FusedModel, StepSpec, list[StepSpec]] | None:
    """The fused model replacing ``combine`` and the ONNX members feeding it, with its step and the steps
    it replaces; None when they can't be fused exactly (they then compile as written)."""
    options = block.options
    count, classes = int(options.get("inputs", 0)), int(options.get("classes", 0))
    slots = [combine.inputs.get(f"PROBS_{k}") for k in range(count)]
    if count < 2 or len(combine.inputs) != count or not set(combine.outputs) <= {COMBINED, LABEL}:
        return None
    pipeline_outputs = {t.name for t in resolved.outputs}
    parts: list[StepSpec] = []
    members: list[Member] = []
    configs: list[tuple[ModelConfig, int, Path]] = []
    inputs: dict[str, TensorSpec] = {}
    for k, tensor in enumerate(slots):
        producers = [s for s in steps if tensor is not None and tensor in s.outputs.values()]
        if len(producers) != 1 or len(producers[0].outputs) != 1 or producers[0] in parts:
            return None
        step = producers[0]
        source = onnx_source(step, repo)
        if source is None:
            return None
        config = source[0]
        output = next(iter(step.outputs))
        specs = {t.name: t for t in config.inputs}
        out_spec = next((t for t in config.outputs if t.name == output), None)
        if out_spec is None or out_spec.dtype != DataType.FP32 or set(step.inputs) != set(specs):
            return None
        for name, fed in step.inputs.items():
            spec = specs[name]
            if spec.dtype != DataType.FP32 or any(d < 1 for d in spec.dims) or fed in (COMBINED, LABEL):
                return None  # the check batch is random FP32 of known shape
            renamed = dataclasses.replace(spec, name=fed)
            if inputs.setdefault(fed, renamed) != renamed:
                return None
        others = [s for s in steps if tensor in s.inputs.values() and s is not combine]
        exposed = f"PROBS_{k}" if others or tensor in pipeline_outputs else None
        parts.append(step)
        configs.append(source)
        members.append(Member(path=source[2], inputs=dict(step.inputs), output=output, exposed=exposed))
    produced = {t for s in (*parts, combine) for t in s.outputs.values()}
    if produced & set(inputs) or set(inputs) & {m.exposed for m in members}:
        return None  # a member reads another's output: not side by side
    name = f"{resolved.spec.name}__{combine.name}_fused"
    if len(name) > 100:
        name = f"{resolved.spec.name[:40]}_fused_{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    if not name_free(repo, name):
        return None
    method = str(options.get("method", "average"))
    raw = np.asarray(options.get("weights") or [1.0] * count, dtype=np.float64)
    weights = (raw / raw.sum()).astype(np.float32)  # as the block normalises them
    want = set(combine.outputs)
    folder = scratch / name
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.onnx"
    rng = np.random.default_rng(0)
    feeds = {fed: rng.normal(size=(16, *spec.dims)).astype(np.float32) for fed, spec in inputs.items()}
    try:
        if not write_fan_in(members, method, weights, classes, want, target):
            return None
        difference = check_fan_in(members, method, weights, target, feeds, want)
    except Exception:  # a graph onnx or onnxruntime can't take apart or run here: compiled unfused
        return None
    if not difference <= FUSE_TOLERANCE:
        return None
    outputs = [TensorSpec(name=COMBINED, dtype=DataType.FP32, dims=[classes])] if COMBINED in want else []
    if LABEL in want:
        outputs.append(TensorSpec(name=LABEL, dtype=DataType.INT64, dims=[1]))
    outputs += [TensorSpec(name=m.exposed, dtype=DataType.FP32, dims=[classes]) for m in members if m.exposed]
    first = configs[0][0]
    sources: list[dict[str, Any]] = [
        {"model": s.model, "version": version, "sha256": file_sha256(path)}
        for s, (_, version, path) in zip(parts, configs, strict=True)
    ]
    fused_config = first.replace(
        name=name,
        max_batch_size=min(config.max_batch_size for config, _, _ in configs),
        inputs=list(inputs.values()),
        outputs=outputs,
        version_policy=None,
        default_model_filename=None,
        parameters={
            **first.parameters,
            GENERATED_MARK: "fused:"
            + "+".join(f"{s['model']}:{s['version']}" for s in sources)
            + f"+{combine.model}",
        },
    )
    record: dict[str, Any] = {
        "block": "fused",
        "variant": "fused",
        "source": {"path": str(configs[0][2].resolve()), "sha256": sources[0]["sha256"]},
        "artifact": {"bytes": target.stat().st_size},
        "pipeline": resolved.spec.name,
        "fused": {
            "steps": [s.name for s in (*parts, combine)],
            "from": [*sources, {"model": combine.model, "block": "combiner", "options": dict(options)}],
            "appended": f"the combiner's {method} over the members' outputs, side by side in one graph",
            "max_abs_diff_vs_unfused": difference,
            "why": f"one model instead of {len(parts) + 1}: no Python-backend hop, one request per row "
            "for all members",
        },
    }
    layouts = [layout for _, _, path in configs if (layout := measured_layout(path)) is not None]
    if len(layouts) == len(configs):  # the members' own measurements: the widest of them
        instances = max(int(layout["instances"]) for layout in layouts)
        threads = max(int(layout["intra_op_threads"]) for layout in layouts)
        fused_config = with_layout(fused_config, instances, threads)
        record["layout"] = {
            "instances": instances,
            "intra_op_threads": threads,
            "reused_from": ", ".join(f"{s['model']} version {s['version']}" for s in sources),
        }
    step = StepSpec(
        name="+".join(s.name for s in (*parts, combine)),
        model=name,
        inputs={fed: fed for fed in inputs},
        outputs={
            **combine.outputs,
            **{m.exposed: tensor for m, tensor in zip(members, slots, strict=True) if m.exposed and tensor},
        },
        version=1,
    )
    return FusedModel(config=fused_config, source=target, manifest=record), step, [*parts, combine]
