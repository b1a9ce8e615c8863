"""Compile-time fusion of an ONNX encoder and the mean pooling after it (tritonforge.ensemble.fuse).

The tiny Gather "encoder" of test_ensemble stands in for MiniLM (the real one is covered in
test_ensemble_examples): the fused pipeline must answer exactly as the chain of its original models,
through the real server, and fusion must step aside whenever it could change an answer or a user's model.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient

import tiny_models
from conftest import triton_infer
from test_ensemble import GOOD_SPECS, build_models, encoder_graph, tiny_encoder_onnx, write_specs
from triton_stats import counted_since, counts, counts_when
from tritonforge.config import (
    DataType,
    DynamicBatching,
    InstanceGroup,
    InstanceKind,
    ModelConfig,
    TensorSpec,
    read_config,
    write_config,
)
from tritonforge.ensemble import check_specs, compile_specs
from tritonforge.ensemble.blocks import GENERATED_MARK
from tritonforge.ensemble.fuse import fuse_pipeline
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer

FUSED = "tiny_encoder_v1__tiny_pool"
TEXT = "text_tiny__tokenize_encode"
BLS = "text_tiny__tokenize_encode_bls"
TEXT_SPEC = {"text_tiny.yaml": GOOD_SPECS["text_tiny.yaml"]}


@pytest.fixture(scope="module")
def models_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models(tmp_path_factory.mktemp("fuse_models"))


@pytest.fixture()
def repo(models_repo: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(models_repo, copy)
    return copy


def steps_of(repo: Path, pipeline: str) -> list[str]:
    return [s.model_name for s in read_config(repo / pipeline / "config.pbtxt").ensemble_steps or ()]


def test_compile_fuses_the_encoder_and_its_mean_pooling_into_one_plain_onnx_model(
    repo: Path, tmp_path: Path
) -> None:
    compile_specs([write_specs(tmp_path / "specs", TEXT_SPEC)], repo)
    assert steps_of(repo, "text_tiny") == [TEXT]
    config = read_config(repo / FUSED / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx"  # NVIDIA's C++ onnxruntime backend serves it as is
    assert [(t.name, t.dims) for t in config.inputs] == [("input_ids", (-1,)), ("attention_mask", (-1,))]
    assert [(t.name, t.dims) for t in config.outputs] == [("EMBEDDING", (4,))]
    assert config.parameters[GENERATED_MARK] == "fused:tiny_encoder:1+tiny_pool"
    model = onnx.load(str(repo / FUSED / "1" / "model.onnx"))
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}  # no custom operators
    fused = json.loads((repo / FUSED / "1" / "manifest.json").read_text())["fused"]
    source = repo / "tiny_encoder" / "1" / "model.onnx"
    assert fused["from"][0] == {
        "model": "tiny_encoder",
        "version": 1,
        "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
    }
    assert fused["from"][1]["block"] == "mean_pooling" and fused["max_abs_diff_vs_unfused"] <= 1e-6
    # the fused graph cuts padding no row attends to, so the pipeline's tokenizer runs it on each batch of
    # texts it pads: one model, TEXT in, EMBEDDING out, the same graph beside it
    assert fused["trims_padding"] is True
    text = read_config(repo / TEXT / "config.pbtxt")
    assert (
        text.backend == "python"
        and text.parameters[GENERATED_MARK] == f"tokenize_encode:tiny_tokenizer+{FUSED}"
    )
    assert [(t.name, t.dims) for t in text.inputs] == [("TEXT", (1,))]
    assert [(t.name, t.dims) for t in text.outputs] == [("EMBEDDING", (4,))]
    assert json.loads(text.parameters["encoder_inputs"]) == {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
    }
    assert (text.parameters["encoder_output"], text.parameters["encoder_model"]) == ("EMBEDDING", FUSED)
    graph = (repo / TEXT / "1" / "model.onnx").read_bytes()
    assert graph == (repo / FUSED / "1" / "model.onnx").read_bytes()
    variant = json.loads((repo / TEXT / "1" / "manifest.json").read_text())
    assert (variant["variant"], variant["from"], variant["pipeline"]) == (
        "tokenize_encode",
        {"tokenizer": "tiny_tokenizer", "encoder": FUSED},
        "text_tiny",
    )
    assert variant["encoder"]["sha256"] == hashlib.sha256(graph).hexdigest()
    # the models a client calls one by one stay in the repository, as the spec declares them
    assert (repo / "tiny_pool" / "config.pbtxt").is_file() and (repo / "tiny_encoder" / "1").is_dir()
    assert "padding" not in read_config(repo / "tiny_tokenizer" / "config.pbtxt").parameters


def test_compile_without_fuse_keeps_the_three_steps_as_written(repo: Path, tmp_path: Path) -> None:
    compile_specs([write_specs(tmp_path / "specs", TEXT_SPEC)], repo, fuse=False)
    assert steps_of(repo, "text_tiny") == ["tiny_pool", "tiny_tokenizer", "tiny_encoder"]
    assert not (repo / FUSED).exists()


def test_fusion_steps_aside_when_the_token_embeddings_are_also_a_pipeline_output(
    repo: Path, tmp_path: Path
) -> None:
    spec = GOOD_SPECS["text_tiny.yaml"].replace("outputs: [EMBEDDING]\n", "outputs: [EMBEDDING, tokens]\n", 1)
    resolved, issues = check_specs([write_specs(tmp_path / "specs", {"t.yaml": spec})], repo)
    assert issues == []
    unchanged, fused = fuse_pipeline(resolved[0], repo, tmp_path / "scratch")
    assert fused == [] and unchanged is resolved[0]


@pytest.mark.parametrize(
    ("taken", "steps"),
    [
        pytest.param(FUSED, ["tiny_pool", "tiny_tokenizer", "tiny_encoder"], id="fused-name"),
        pytest.param(TEXT, ["tiny_tokenizer", FUSED], id="tokenize-encode-name"),
    ],
)
def test_fusion_never_overwrites_a_model_that_a_user_added_under_a_name_it_would_write(
    repo: Path, tmp_path: Path, taken: str, steps: list[str]
) -> None:
    add_model(repo, taken, tiny_encoder_onnx(tmp_path / "mine.onnx"), max_batch_size=4)
    before = (repo / taken / "config.pbtxt").read_text()
    compile_specs([write_specs(tmp_path / "specs", TEXT_SPEC)], repo)
    assert (repo / taken / "config.pbtxt").read_text() == before
    assert steps_of(repo, "text_tiny") == steps  # the rest compiles as if that step could not be made


def test_a_fused_encoder_on_gpus_is_called_there_by_its_tokenizer(repo: Path, tmp_path: Path) -> None:
    # the encoder laid out on a GPU (validated offline: this machine has none): the fused model keeps its
    # config's GPU instances, and the tokenizer running it sends its batches there instead of onnxruntime
    config = read_config(repo / "tiny_encoder" / "config.pbtxt")
    gpu = (InstanceGroup(count=1, kind=InstanceKind.GPU, gpus=(0,)),)
    write_config(config.replace(instance_groups=gpu), repo / "tiny_encoder" / "config.pbtxt")
    compile_specs([write_specs(tmp_path / "specs", TEXT_SPEC)], repo)
    assert steps_of(repo, "text_tiny") == [TEXT]
    assert read_config(repo / FUSED / "config.pbtxt").instance_groups[0].kind == InstanceKind.GPU
    text = read_config(repo / TEXT / "config.pbtxt")
    assert text.parameters["encoder_in_process"] == "no"
    assert [g.kind for g in text.instance_groups] == [InstanceKind.CPU]  # tokenising is CPU work
    record = json.loads((repo / TEXT / "1" / "manifest.json").read_text())
    assert record["encoder"]["runs"].startswith(f"through BLS to '{FUSED}'")


@pytest.fixture(scope="module")
def served(models_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    compile_specs([write_specs(tmp_path_factory.mktemp("fuse_specs"), TEXT_SPEC)], models_repo)
    assert steps_of(models_repo, "text_tiny") == [TEXT]
    # the same model made to call the fused model through BLS, as on NVIDIA's container (no onnxruntime
    # in its Python): the tokenizer's other way to run its encoder
    bls = read_config(models_repo / TEXT / "config.pbtxt")
    shutil.copytree(models_repo / TEXT, models_repo / BLS)
    write_config(
        bls.replace(name=BLS, parameters={**bls.parameters, "encoder_in_process": "no"}),
        models_repo / BLS / "config.pbtxt",
    )
    with EmbeddedServer(models_repo) as server:
        yield server


def test_an_encoder_that_reads_padding_is_fused_without_the_cut_and_its_tokenizer_is_left_as_written(
    repo: Path, tmp_path: Path
) -> None:
    shutil.rmtree(repo / "tiny_encoder")
    add_model(
        repo,
        "tiny_encoder",
        tiny_encoder_onnx(tmp_path / "reads.onnx", reads_padding=True),
        max_batch_size=16,
    )
    compile_specs([write_specs(tmp_path / "specs", TEXT_SPEC)], repo)
    assert steps_of(repo, "text_tiny") == ["tiny_tokenizer", FUSED]
    fused = json.loads((repo / FUSED / "1" / "manifest.json").read_text())["fused"]
    assert fused["trims_padding"] is False and fused["max_abs_diff_vs_unfused"] <= 1e-6
    assert not (repo / TEXT).exists()
    graph = onnx.load(str(repo / FUSED / "1" / "model.onnx")).graph
    assert not any(node.name.startswith("tritonforge_trim/") for node in graph.node)


def test_the_tokenizer_keeps_its_own_model_when_its_answer_goes_anywhere_but_the_fused_step(
    repo: Path, tmp_path: Path
) -> None:
    spec = GOOD_SPECS["text_tiny.yaml"].replace("outputs: [EMBEDDING]\n", "outputs: [EMBEDDING, mask]\n", 1)
    assert spec != GOOD_SPECS["text_tiny.yaml"]
    compile_specs([write_specs(tmp_path / "specs", {"t.yaml": spec})], repo)
    # (a tensor that is a pipeline output and read by a step is copied out by a passthrough step)
    assert steps_of(repo, "text_tiny")[:2] == ["tiny_tokenizer", FUSED]
    assert not (repo / TEXT).exists()


@pytest.mark.slow
@pytest.mark.parametrize("model", [TEXT, BLS])
def test_texts_of_any_length_batch_in_the_tokenizer_with_its_encoder_and_answer_as_each_alone(
    served: EmbeddedServer, model: str
) -> None:
    """Concurrent requests of different lengths are batched by Triton (their shape is the text's, [1]),
    padded together and run at once; each answers as the fused model on its own exact-length arrays. The
    BLS way (the fused model called through Triton) answers the same."""
    from concurrent.futures import ThreadPoolExecutor

    sentences = ["hi", "a cat sat on the mat today", "Triton serves many models at once, fast, " * 3]
    url = served.grpc_url
    client = grpcclient.InferenceServerClient(url)
    try:
        before, fused_before = counts(url, model), counts(url, FUSED)
        want = [
            triton_infer(client, FUSED, triton_infer(client, "tiny_tokenizer", {"TEXT": text}))["EMBEDDING"]
            for text in (np.array([[s.encode()]], dtype=np.object_) for s in sentences)
        ]
        # (every one of these counted before the concurrent calls start: a count read at once may be short)
        fused_before = counts_when(url, FUSED, rows=fused_before.rows + len(sentences))
        texts = [np.array([[s.encode()]], dtype=np.object_) for s in sentences * 8]

        def one(text: np.ndarray) -> np.ndarray:
            own = grpcclient.InferenceServerClient(url)
            try:
                return triton_infer(own, model, {"TEXT": text})["EMBEDDING"]
            finally:
                own.close()

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(one, texts))
        for i, answer in enumerate(got):
            np.testing.assert_allclose(answer, want[i % len(sentences)], atol=1e-6)
        assert counted_since(url, model, before, len(texts)).rows == len(texts)
        # the fused model ran these requests only when the tokenizer called it through BLS
        expected = len(texts) if model == BLS else 0
        assert counted_since(url, FUSED, fused_before, expected).rows == expected
    finally:
        client.close()


def assert_pipeline_answers_as_its_chain(client: Any, sentences: list[str], atol: float) -> None:
    """text_tiny on ``sentences`` (one request) == tokenizer, encoder and pooling called one by one."""
    text = np.array([[s.encode()] for s in sentences], dtype=np.object_)
    got = triton_infer(client, "text_tiny", {"TEXT": text})["EMBEDDING"]
    tokens = triton_infer(client, "tiny_tokenizer", {"TEXT": text})
    hidden = triton_infer(client, "tiny_encoder", tokens)["last_hidden_state"]
    chain = triton_infer(
        client,
        "tiny_pool",
        {"TOKEN_EMBEDDINGS": hidden, "ATTENTION_MASK": tokens["attention_mask"]},
    )["EMBEDDING"]
    assert got.shape == chain.shape == (len(sentences), 4)
    np.testing.assert_allclose(got, chain, atol=atol)


@pytest.mark.slow
def test_fused_pipeline_answers_as_the_chain_of_its_original_three_models(served: EmbeddedServer) -> None:
    client = grpcclient.InferenceServerClient(served.grpc_url)
    try:
        for sentences in (["hi"], ["a cat sat on the mat", "Triton serves many models at once, fast.", "x"]):
            assert_pipeline_answers_as_its_chain(client, sentences, atol=1e-6)
    finally:
        client.close()


def test_cli_compile_no_fuse_writes_the_steps_as_declared(repo: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tritonforge.cli import app

    specs = write_specs(tmp_path / "specs", TEXT_SPEC)
    result = CliRunner().invoke(app, ["ensemble", "compile", str(specs), "--repo", str(repo), "--no-fuse"])
    assert result.exit_code == 0, result.output
    assert steps_of(repo, "text_tiny") == ["tiny_pool", "tiny_tokenizer", "tiny_encoder"]
    result = CliRunner().invoke(app, ["ensemble", "compile", str(specs), "--repo", str(repo)])
    assert result.exit_code == 0, result.output
    assert steps_of(repo, "text_tiny") == [TEXT]
    assert f"wrote {repo / FUSED}" in result.output.replace("\n", "")


# ------------------------------------------------------------------ fan-in: ONNX members + combiner

VOTE_ALL = """
    name: {name}
    max_batch_size: 16
    models:
      - {{name: {block}, block: combiner, options: {{inputs: 3, classes: 3, method: {method}{weights}}}}}
    inputs: [{{name: x, dtype: FP32, dims: [8]}}]
    outputs: [{outputs}]
    steps:
      - {{name: a, model: {first}, inputs: [x], outputs: {{probs: pa}}}}
      - {{name: b, model: clf_b, inputs: [x], outputs: {{probs: pb}}}}
      - {{name: c, model: clf_c, inputs: [x], outputs: {{probs: pc}}}}
      - name: mix
        model: {block}
        inputs: {{PROBS_0: pa, PROBS_1: pb, PROBS_2: pc}}
        outputs: {{LABEL: LABEL, PROBABILITIES: COMBINED}}
"""
FAN_IN = {
    # the members' probabilities are outputs too, as in the example digits_vote
    "vote": dict(method="vote", weights="", outputs="LABEL, COMBINED, pa, pb, pc"),
    "average": dict(method="average", weights="", outputs="COMBINED, LABEL"),
    "weighted": dict(method="weighted", weights=", weights: [3, 1, 1]", outputs="LABEL, COMBINED, pb"),
}


def fan_in_spec(method: str, name: str, first: str = "clf_a") -> str:
    return VOTE_ALL.format(name=name, block=f"{name}_mix", first=first, **FAN_IN[method])


def test_compile_fuses_onnx_members_and_their_combiner_into_one_plain_onnx_model(
    repo: Path, tmp_path: Path
) -> None:
    compile_specs([write_specs(tmp_path / "specs", {"v.yaml": fan_in_spec("vote", "fan")})], repo)
    (step,) = read_config(repo / "fan" / "config.pbtxt").ensemble_steps
    assert step.model_name == "fan__mix_fused" and step.model_version == 1
    # the members' probabilities come out of the fused model itself: no combiner echo, no passthrough
    assert step.output_map == {
        "LABEL": "LABEL",
        "PROBABILITIES": "COMBINED",
        "PROBS_0": "pa",
        "PROBS_1": "pb",
        "PROBS_2": "pc",
    }
    config = read_config(repo / "fan__mix_fused" / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 32
    assert [(t.name, t.dims) for t in config.inputs] == [("x", (8,))]
    assert [(t.name, t.dtype, t.dims) for t in config.outputs] == [
        ("PROBABILITIES", DataType.FP32, (3,)),
        ("LABEL", DataType.INT64, (1,)),
        *((f"PROBS_{k}", DataType.FP32, (3,)) for k in range(3)),
    ]
    assert config.parameters[GENERATED_MARK] == "fused:clf_a:1+clf_b:1+clf_c:1+fan_mix"
    model = onnx.load(str(repo / "fan__mix_fused" / "1" / "model.onnx"))
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    fused = json.loads((repo / "fan__mix_fused" / "1" / "manifest.json").read_text())["fused"]
    assert [f.get("model") for f in fused["from"]] == ["clf_a", "clf_b", "clf_c", "fan_mix"]
    assert fused["steps"] == ["a", "b", "c", "mix"] and fused["max_abs_diff_vs_unfused"] <= 1e-6
    # the models a client calls one by one stay in the repository
    assert (repo / "fan_mix" / "config.pbtxt").is_file() and (repo / "clf_a" / "1").is_dir()


def test_fan_in_fusion_steps_aside_when_a_member_is_not_an_onnx_model(repo: Path, tmp_path: Path) -> None:
    config = ModelConfig(
        name="py_clf",
        backend="python",
        max_batch_size=16,
        inputs=(TensorSpec(name="x", dtype=DataType.FP32, dims=(8,)),),
        outputs=(TensorSpec(name="probs", dtype=DataType.FP32, dims=(3,)),),
        dynamic_batching=DynamicBatching(),
    )
    tiny_models.python_model(repo, tmp_path / "work", config, "class TritonPythonModel:\n    pass\n")
    spec = fan_in_spec("vote", "fan_py", first="py_clf")
    compile_specs([write_specs(tmp_path / "specs", {"v.yaml": spec})], repo)
    assert steps_of(repo, "fan_py") == ["py_clf", "clf_b", "clf_c", "fan_py_mix"]
    assert not (repo / "fan_py__mix_fused").exists()


@pytest.fixture(scope="module")
def fan_in_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """Each fan-in pipeline twice in one server: fused, and as written (``<name>_plain``)."""
    repo = build_models(tmp_path_factory.mktemp("fan_in_models"))
    specs = tmp_path_factory.mktemp("fan_in_specs")
    fused = {f"{m}.yaml": fan_in_spec(m, f"fan_{m}") for m in FAN_IN}
    plain = {f"{m}_plain.yaml": fan_in_spec(m, f"fan_{m}_plain") for m in FAN_IN}
    compile_specs([write_specs(specs / "fused", fused)], repo)
    compile_specs([write_specs(specs / "plain", plain)], repo, fuse=False)
    for method in FAN_IN:
        assert steps_of(repo, f"fan_{method}") == [f"fan_{method}__mix_fused"]
        assert len(steps_of(repo, f"fan_{method}_plain")) == 4
    with EmbeddedServer(repo) as server:
        yield server


@pytest.mark.slow
@pytest.mark.parametrize("method", list(FAN_IN))
def test_fused_fan_in_answers_every_output_subset_as_the_pipeline_as_written(
    fan_in_served: EmbeddedServer, method: str
) -> None:
    outputs = [n.strip() for n in FAN_IN[method]["outputs"].split(",")]
    x = np.random.default_rng(11).standard_normal((13, 8)).astype(np.float32)
    client = grpcclient.InferenceServerClient(fan_in_served.grpc_url)
    try:
        for size in range(1, len(outputs) + 1):
            for subset in itertools.combinations(outputs, size):
                asked = [grpcclient.InferRequestedOutput(n) for n in subset]
                got = triton_infer(client, f"fan_{method}", {"x": x}, outputs=asked)
                want = triton_infer(client, f"fan_{method}_plain", {"x": x}, outputs=asked)
                assert sorted(got) == sorted(want) == sorted(subset)
                for name in subset:
                    assert got[name].shape == want[name].shape, (method, name)
                    if name == "LABEL":
                        np.testing.assert_array_equal(got[name], want[name])
                    else:
                        np.testing.assert_allclose(got[name], want[name], atol=1e-6)
    finally:
        client.close()


def test_a_batching_fused_model_measures_its_layout_on_shared_batches_and_reuses_it_next_compile(
    repo: Path, tmp_path: Path
) -> None:
    # as `tritonforge build` leaves it: the encoder version's manifest holds a layout measured for requests
    # of one; the fused model, run on the batches the tokenizer gets, is measured anew for batches
    manifest = repo / "tiny_encoder" / "1" / "manifest.json"
    record = json.loads(manifest.read_text()) if manifest.is_file() else {}
    manifest.write_text(
        json.dumps({**record, "layout": {"instances": 1, "intra_op_threads": 1, "why": "test"}})
    )
    specs = write_specs(tmp_path / "specs", TEXT_SPEC)
    compile_specs([specs], repo)
    layout = json.loads((repo / FUSED / "1" / "manifest.json").read_text())["layout"]
    assert "reused_from" not in layout and "waiting at once, shared by the instances" in layout["workload"]
    assert layout["key"]["queued"] >= 4 and layout["key"]["tokens"] == 16
    assert set(layout["measured_rows_per_s"]) >= {"1 x 1 thread"}
    config = read_config(repo / FUSED / "config.pbtxt")
    assert config.instance_groups[0].count == layout["instances"]
    assert config.parameters["intra_op_thread_count"] == str(layout["intra_op_threads"])
    text = read_config(repo / TEXT / "config.pbtxt")  # the tokenizer running it: the same layout
    assert text.instance_groups[0].count == layout["instances"]
    assert text.parameters["intra_op_thread_count"] == str(layout["intra_op_threads"])
    compile_specs([specs], repo)  # unchanged: the figures recorded are kept, not measured again
    again = json.loads((repo / FUSED / "1" / "manifest.json").read_text())["layout"]
    assert again["measured_rows_per_s"] == layout["measured_rows_per_s"]
    # compiled without the tokenizer running it, the fused model takes the encoder's layout as recorded
    spec = GOOD_SPECS["text_tiny.yaml"].replace("outputs: [EMBEDDING]\n", "outputs: [EMBEDDING, mask]\n", 1)
    compile_specs([write_specs(tmp_path / "other", {"t.yaml": spec})], repo)
    plain = json.loads((repo / FUSED / "1" / "manifest.json").read_text())["layout"]
    assert plain["reused_from"] == "tiny_encoder version 1" and plain["why"] == "test"


def attention_encoder_onnx(path: Path, hidden: int = 4, heads: int = 2) -> Path:
    """Two transformer layers written as onnxruntime's BERT optimizer writes MiniLM (com.microsoft
    Attention, SkipLayerNormalization, BiasGelu between MatMuls by 2-D weights), random weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(9)

    def weight(name: str, *shape: int) -> Any:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.5).astype(np.float32), name)

    inits = [weight("table", 30522, hidden), weight("gamma", hidden), weight("beta", hidden)]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["h0"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["mask32"], to=TensorProto.INT32),
    ]
    state = "h0"
    for layer in range(2):
        p = f"l{layer}_"
        inits += [
            weight(p + "qkv", hidden, 3 * hidden),
            weight(p + "qkv_b", 3 * hidden),
            weight(p + "out", hidden, hidden),
            weight(p + "out_b", hidden),
            weight(p + "up", hidden, 4 * hidden),
            weight(p + "up_b", 4 * hidden),
            weight(p + "down", 4 * hidden, hidden),
            weight(p + "down_b", hidden),
        ]
        ms = "com.microsoft"
        nodes += [
            helper.make_node(
                "Attention", [state, p + "qkv", p + "qkv_b", "mask32"], [p + "a"], domain=ms, num_heads=heads
            ),
            helper.make_node("MatMul", [p + "a", p + "out"], [p + "o"]),
            helper.make_node(
                "SkipLayerNormalization",
                [p + "o", state, "gamma", "beta", p + "out_b"],
                [p + "s1"],
                domain=ms,
            ),
            helper.make_node("MatMul", [p + "s1", p + "up"], [p + "u"]),
            helper.make_node("BiasGelu", [p + "u", p + "up_b"], [p + "g"], domain=ms),
            helper.make_node("MatMul", [p + "g", p + "down"], [p + "d"]),
            helper.make_node(
                "SkipLayerNormalization",
                [p + "d", p + "s1", "gamma", "beta", p + "down_b"],
                ["last_hidden_state" if layer == 1 else p + "s2"],
                domain=ms,
            ),
        ]
        state = p + "s2"
    graph = encoder_graph(nodes, "attention_encoder", hidden, inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", tiny_models.OPSET), helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.mark.slow
def test_a_transformer_encoder_runs_its_token_wise_layers_on_real_tokens_and_answers_as_the_chain(
    models_repo: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(models_repo, repo, ignore=shutil.ignore_patterns("text_tiny", FUSED, TEXT, BLS))
    shutil.rmtree(repo / "tiny_encoder")
    add_model(repo, "tiny_encoder", attention_encoder_onnx(tmp_path / "bert.onnx"), max_batch_size=16)
    compile_specs([write_specs(tmp_path / "specs", TEXT_SPEC)], repo)
    assert steps_of(repo, "text_tiny") == [TEXT]
    fused = json.loads((repo / FUSED / "1" / "manifest.json").read_text())["fused"]
    assert fused["packs_tokens"] is True and fused["trims_padding"] is True
    assert fused["max_abs_diff_vs_unfused"] <= 1e-5
    nodes = onnx.load(str(repo / FUSED / "1" / "model.onnx")).graph.node
    packed_matmuls = [
        n for n in nodes if n.op_type == "MatMul" and n.input[0].startswith("tritonforge_pack/")
    ]
    assert len(packed_matmuls) == 2  # each layer's first token-wise MatMul reads the packed attention output
    sentences = ["hi", "a cat sat on the mat", "Triton serves many models at once, fast, and well."]
    with EmbeddedServer(
        repo,
        model_control="explicit",
        load_models=["text_tiny", "tiny_tokenizer", "tiny_encoder", "tiny_pool"],
    ) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            for chunk in [*([s] for s in sentences), sentences]:  # alone, and padded together
                assert_pipeline_answers_as_its_chain(client, chunk, atol=1e-5)
        finally:
            client.close()
