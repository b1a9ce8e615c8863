"""The ONNX graph surgery of the pooling fusion: the ``mean_pooling`` block as ONNX nodes appended to an
encoder's graph (:func:`write_fused`), the cut of a batch's trailing padding in front of it
(:func:`trim_padding`) and the token-wise layers run on real tokens only (:func:`pack_tokens`).

Standard operators only, so the result is a plain ONNX model any onnxruntime runs. Nothing here decides
whether the result is right: :mod:`tritonforge.ensemble._fuse_check` checks it against the unfused pair.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["mean_pooling_graph", "pack_tokens", "trim_padding", "write_fused"]


def mean_pooling_graph(
    tokens: str, mask: str, output: str, *, normalize: bool, prefix: str = "tritonforge_pool"
) -> tuple[list[Any], list[Any]]:
    """ONNX nodes (opset >= 13) and initializers computing the ``mean_pooling`` block's answer.

    ``output[n] = sum_t mask[n,t] * tokens[n,t,:] / max(sum_t mask[n,t], 1e-9)``, then divided by
    ``max(L2 norm, 1e-12)`` when ``normalize`` — the block's formula, as a batched MatMul.
    """
    from onnx import TensorProto, helper, numpy_helper

    def t(name: str) -> str:
        return f"{prefix}/{name}"

    inits = [
        numpy_helper.from_array(np.array([1], dtype=np.int64), t("axis1")),
        numpy_helper.from_array(np.array(1e-9, dtype=np.float32), t("eps_count")),
        numpy_helper.from_array(np.array(1e-12, dtype=np.float32), t("eps_norm")),
    ]
    nodes = [
        helper.make_node("Cast", [mask], [t("mask_f")], to=TensorProto.FLOAT, name=t("cast")),
        helper.make_node("Unsqueeze", [t("mask_f"), t("axis1")], [t("mask_row")], name=t("unsqueeze")),
        helper.make_node("MatMul", [t("mask_row"), tokens], [t("summed3")], name=t("matmul")),
        helper.make_node("Squeeze", [t("summed3"), t("axis1")], [t("summed")], name=t("squeeze")),
        helper.make_node(
            "ReduceSum", [t("mask_f"), t("axis1")], [t("count")], keepdims=1, name=t("count_sum")
        ),
        helper.make_node("Max", [t("count"), t("eps_count")], [t("count_c")], name=t("count_max")),
    ]
    mean = output if not normalize else t("mean")
    nodes.append(helper.make_node("Div", [t("summed"), t("count_c")], [mean], name=t("mean_div")))
    if normalize:
        nodes += [
            helper.make_node("Mul", [mean, mean], [t("sq")], name=t("sq")),
            helper.make_node("ReduceSum", [t("sq"), t("axis1")], [t("ss")], keepdims=1, name=t("ss")),
            helper.make_node("Sqrt", [t("ss")], [t("norm")], name=t("sqrt")),
            helper.make_node("Max", [t("norm"), t("eps_norm")], [t("norm_c")], name=t("norm_max")),
            helper.make_node("Div", [mean, t("norm_c")], [output], name=t("norm_div")),
        ]
    return nodes, inits


def write_fused(
    source: Path,
    target: Path,
    tokens: str,
    mask: str,
    output: str,
    normalize: bool,
    *,
    trim: bool = False,
    pack: bool = False,
) -> tuple[int, bool, bool] | None:
    """Write ``source`` with pooling appended to ``target``: the embedding dim (-1 if unknown), whether the
    graph trims trailing padding first (asked for with ``trim`` and possible) and whether its token-wise
    layers run on real tokens only (``pack``, on a trimmed graph); None when not fusable."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(source))
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    outs = {o.name: o for o in graph.output}
    ins = {i.name for i in graph.input}
    if opset < 13 or tokens not in outs or mask not in ins:
        return None
    token_type = outs[tokens].type.tensor_type
    if token_type.elem_type != TensorProto.FLOAT or len(token_type.shape.dim) != 3:
        return None
    last = token_type.shape.dim[2]
    dim = last.dim_value if last.HasField("dim_value") and last.dim_value > 0 else -1
    if model.ByteSize() > 1_900_000_000:
        return None  # a single-file ONNX model stops at 2 GB
    taken = {n for node in graph.node for n in (*node.input, *node.output)} | ins
    if output in taken:
        return None
    nodes, inits = mean_pooling_graph(tokens, mask, output, normalize=normalize)
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    cut_mask = trim_padding(graph, mask, opset) if trim else None
    trimmed = cut_mask is not None
    batch = token_type.shape.dim[0]
    out = helper.make_tensor_value_info(
        output, TensorProto.FLOAT, [batch.dim_param or (batch.dim_value or None), dim if dim > 0 else None]
    )
    del graph.output[:]
    graph.output.append(out)
    packed = cut_mask is not None and pack and pack_tokens(graph, cut_mask)
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return dim, trimmed, packed


def trim_padding(graph: Any, mask: str, opset: int, prefix: str = "tritonforge_trim") -> str | None:
    """Put in front of ``graph`` a cut of its [batch, sequence] inputs to the last column any row's ``mask``
    keeps (at least one); the cut mask's name if done, else None.

    Columns past every row's last token carry nothing a mask-respecting model reads, so a batch padded
    wider than its longest row (texts of different lengths batched together) costs
    only its longest row. Whether the model respects the mask is for the caller to check: done only when
    every graph input is 2-D with the mask's sequence dimension and no node holds a subgraph (whose
    references to the inputs would not be renamed).
    """
    from onnx import AttributeProto, TensorProto, helper, numpy_helper

    def t(name: str) -> str:
        return f"{prefix}/{name}"

    def seq_dim(value: Any) -> Any:
        dims = value.type.tensor_type.shape.dim
        return (dims[1].dim_param or dims[1].dim_value) if len(dims) == 2 else None

    inputs = {i.name: i for i in graph.input}
    initialized = {i.name for i in graph.initializer}
    names = [n for n in inputs if n not in initialized]
    if mask not in names or not seq_dim(inputs[mask]):
        return None
    if any(seq_dim(inputs[n]) != seq_dim(inputs[mask]) for n in names):
        return None
    if any(
        a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for node in graph.node for a in node.attribute
    ):
        return None
    reduce_rows = (
        helper.make_node("ReduceMax", [t("mask64"), t("axis0")], [t("any")], keepdims=0, name=t("rows"))
        if opset >= 18
        else helper.make_node("ReduceMax", [t("mask64")], [t("any")], axes=[0], keepdims=0, name=t("rows"))
    )
    nodes = [
        helper.make_node("Cast", [mask], [t("mask64")], to=TensorProto.INT64, name=t("cast")),
        reduce_rows,  # [sequence]: 1 where some row keeps the column
        helper.make_node("Shape", [mask], [t("shape")], name=t("shape")),
        helper.make_node("Gather", [t("shape"), t("one")], [t("width")], axis=0, name=t("width")),
        helper.make_node("Add", [t("width"), t("one")], [t("limit")], name=t("limit")),
        helper.make_node("Range", [t("one"), t("limit"), t("one")], [t("position")], name=t("range")),
        helper.make_node("Mul", [t("any"), t("position")], [t("kept")], name=t("kept")),
        helper.make_node("ReduceMax", [t("kept")], [t("last")], keepdims=1, name=t("last")),
        helper.make_node("Max", [t("last"), t("ones")], [t("end")], name=t("end")),
    ]
    inits = [
        *([numpy_helper.from_array(np.array([0], dtype=np.int64), t("axis0"))] if opset >= 18 else []),
        numpy_helper.from_array(np.array(1, dtype=np.int64), t("one")),
        numpy_helper.from_array(np.array([1], dtype=np.int64), t("ones")),
        numpy_helper.from_array(np.array([0], dtype=np.int64), t("zeros")),
    ]
    renamed = {name: t(f"cut/{name}") for name in names}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    for name in names:
        nodes.append(
            helper.make_node(
                "Slice", [name, t("zeros"), t("end"), t("ones")], [renamed[name]], name=t(f"cut/{name}")
            )
        )
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *body])
    graph.initializer.extend(inits)
    return renamed[mask]


def pack_tokens(graph: Any, mask: str, prefix: str = "tritonforge_pack") -> bool:
    """Run ``graph``'s token-wise layers on the real tokens of the batch only; True if any was moved.

    In a transformer only attention mixes tokens: the projections, the feed-forward layers, their
    activations and the residual layer norms are the same computation on every token, padding included.
    After each ``com.microsoft`` ``Attention`` node (onnxruntime's fused attention, as its BERT optimizer
    writes it) its output is packed to the rows ``mask`` keeps ([real tokens, 1, hidden]: one Gather of the
    flattened batch, a shape every token-wise node takes as batch x sequence 1), the token-wise nodes that
    follow run packed (``MatMul`` by a 2-D weight, ``BiasGelu`` / ``Gelu`` / ``FastGelu`` / ``Relu``,
    ``SkipLayerNormalization``), and a tensor that leaves them (the next attention's input, the pooling's
    token embeddings) is scattered back into a zero-padded batch. A batch padded to its longest row then
    costs the rows' own lengths in those layers (~3/4 of MiniLM's per-token work; in-process ~1.2x per
    sentence on batches of 4 to 8 of 5 to 14 tokens).
    Standard operators only (NonZero, Gather, ScatterND), so the C++ onnxruntime backend runs it too. The
    caller checks the answer; nodes of any other kind are left as they are.
    """
    from onnx import helper, numpy_helper

    def t(name: str) -> str:
        return f"{prefix}/{name}"

    constants = {i.name: i for i in graph.initializer}
    attentions = [n for n in graph.node if n.op_type == "Attention" and n.domain == "com.microsoft"]
    if not attentions:
        return False
    hidden = {n.input[0] for n in attentions} | {n.output[0] for n in attentions}
    reference = attentions[0].input[0]  # the first hidden state, [batch, sequence, hidden]
    packed: dict[str, str] = {}  # a hidden state -> its packed copy
    packed_only: set[str] = set()  # tensors that exist packed only
    unpacked: dict[str, str] = {}  # a packed-only tensor -> its scattered-back copy
    nodes: list[Any] = []

    # few nodes per hand-off (each costs a dispatch even when nothing is padded): [rows, 1, hidden] is what
    # a Gather by [kept, 1] indices gives and what a ScatterND into [rows, 1, hidden] zeros takes
    def pack(name: str) -> str:
        if name not in packed:
            out = t(f"packed/{name}")
            nodes.extend(
                [
                    helper.make_node("Reshape", [name, t("rows_shape")], [f"{out}/rows"]),
                    helper.make_node("Gather", [f"{out}/rows", t("kept")], [out], axis=0),
                ]
            )
            packed[name] = out
        return packed[name]

    def unpack(name: str) -> str:
        if name not in unpacked:
            out = t(f"unpacked/{name}")
            nodes.extend(
                [
                    helper.make_node("ScatterND", [t("zeros"), t("kept"), name], [f"{out}/rows"]),
                    helper.make_node("Reshape", [f"{out}/rows", t("batch_shape")], [out]),
                ]
            )
            unpacked[name] = out
        return unpacked[name]

    def tokenwise(node: Any) -> bool:
        moving = [name for name in node.input if name and name not in constants]
        if not moving or not all(name in packed_only or name in hidden for name in moving):
            return False
        params = [name for name in node.input[1:] if name]
        if node.op_type == "MatMul":
            return (
                len(node.input) == 2
                and node.input[1] in constants
                and len(constants[node.input[1]].dims) == 2
            )
        if node.op_type in ("BiasGelu", "Gelu", "FastGelu", "Relu"):
            return all(name in constants for name in params)
        if node.op_type == "SkipLayerNormalization":
            return all(name in constants for name in node.input[2:] if name)
        return False

    outputs = {value.name for value in graph.output}
    renamed: dict[str, str] = {}  # a graph output computed packed -> its packed name
    ready = False
    for original in graph.node:
        node = copy.deepcopy(original)  # the graph is changed only when the whole pass succeeds
        if not ready and reference in node.input:
            nodes.extend(  # where the kept tokens are, once the mask and the first hidden state exist
                [
                    helper.make_node("Reshape", [mask, t("minus1")], [t("mask_rows")]),
                    helper.make_node("NonZero", [t("mask_rows")], [t("nonzero")]),
                    helper.make_node("Transpose", [t("nonzero")], [t("kept")], perm=[1, 0]),  # [kept, 1]
                    helper.make_node("Shape", [reference], [t("batch_shape")]),
                    helper.make_node(
                        "Slice", [t("batch_shape"), t("axis0"), t("two"), t("axis0")], [t("b_l")]
                    ),
                    helper.make_node("ReduceProd", [t("b_l")], [t("all_rows")], keepdims=1),
                    helper.make_node(
                        "Slice", [t("batch_shape"), t("two"), t("three"), t("axis0")], [t("width")]
                    ),
                    helper.make_node(
                        "Concat", [t("all_rows"), t("one"), t("width")], [t("zeros_shape")], axis=0
                    ),
                    helper.make_node("ConstantOfShape", [t("zeros_shape")], [t("zeros")]),
                    helper.make_node("Concat", [t("minus1"), t("width")], [t("rows_shape")], axis=0),
                ]
            )
            ready = True
        if ready and node.op_type != "Attention" and tokenwise(node):
            for i, name in enumerate(node.input):
                if name and name not in constants and name not in packed_only:
                    node.input[i] = pack(name)
            for i, name in enumerate(node.output):
                if name in outputs:  # scattered back under its own name below
                    node.output[i] = renamed[name] = t(f"packed/{name}")
            nodes.append(node)
            packed_only.update(name for name in node.output if name)
            continue
        for i, name in enumerate(node.input):
            if name in packed_only:
                node.input[i] = unpack(name)
        nodes.append(node)
    if not packed_only:
        return False
    for name, packed_name in renamed.items():
        nodes.append(helper.make_node("Identity", [unpack(packed_name)], [name]))
    graph.initializer.extend(
        numpy_helper.from_array(np.array([value], dtype=np.int64), t(name))
        for name, value in (("minus1", -1), ("axis0", 0), ("one", 1), ("two", 2), ("three", 3))
    )
    del graph.node[:]
    graph.node.extend(nodes)
    return True
