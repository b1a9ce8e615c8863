"""Renamed options keep working for one release, through the real CLI: the old spelling does what the new
one does and says so in one line on stderr. The ``--json`` results and the tables that must keep a long
model name whole in a pipe are checked on the same runs.
"""

from __future__ import annotations

import json
import re
import signal
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import tiny_models
from cli_runner import run_tritonforge, tritonforge_process
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer

LONG = "a_model_whose_name_is_long_enough_to_fold_at_eighty_columns_zz"
QUICK_SWEEP = ["--concurrency", "1", "--window-s", "0.3", "--max-windows", "3"]


def deprecations(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("deprecated: ")]


def said(stderr: str, *pairs: tuple[str, str]) -> bool:
    """Each (old, new) pair has its deprecation line, and there is no other."""
    lines = deprecations(stderr)
    return len(lines) == len(pairs) and all(
        any(f"{old}` is now `{new}`" in line for line in lines) for old, new in pairs
    )


def mlp_repo(root: Path, name: str = "mlp", versions: int = 1) -> Path:
    repo = root / "repo"
    for _ in range(versions):
        add_model(repo, name, tiny_models.mlp_onnx(root / "m.onnx"), max_batch_size=8)
    return repo


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


# -- serve ---------------------------------------------------------------------------------------------


def test_serve_passes_its_old_spellings_to_tritonserver_as_the_new_ones(tmp_path: Path) -> None:
    repo = mlp_repo(tmp_path)
    old = ["--model-control-mode", "poll", "--repository-poll-secs", "2", "--exit-timeout-secs", "3"]
    with tritonforge_process("serve", str(repo), *old) as process:
        assert process.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("Ctrl-C stops" in line for line in seen):
            seen.append(process.stdout.readline())
        assert any("Ctrl-C stops" in line for line in seen), "".join(seen)
        servers = [
            p for p in psutil.Process(process.pid).children(recursive=True) if p.name() == "tritonserver"
        ]
        assert servers, "serve started no tritonserver"
        argv = servers[0].cmdline()
        assert {"--model-control-mode=poll", "--repository-poll-secs=2", "--exit-timeout-secs=3"} <= set(argv)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    assert said(
        "".join(seen),
        ("--model-control-mode", "--model-control"),
        ("--repository-poll-secs", "--poll-s"),
        ("--exit-timeout-secs", "--exit-timeout-s"),
    )


def test_serve_reads_the_old_mutual_tls_flag_as_mtls(tmp_path: Path) -> None:
    done = run_tritonforge("serve", str(mlp_repo(tmp_path)), "--grpc-use-ssl-mutual", timeout=60)
    assert done.returncode == 1
    assert said(done.stderr, ("--grpc-use-ssl-mutual", "--mtls"))
    # the flag reached mutual TLS, which needs the server's certificate and key
    assert "grpc_mutual_tls need grpc_server_cert" in done.stderr


# -- bench and tune ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_old_spellings_sweep_and_its_table_keeps_a_long_model_name_whole_in_a_pipe(
    tmp_path: Path,
) -> None:
    repo = mlp_repo(tmp_path, LONG)
    out = tmp_path / "bench"
    old = ["--repository", str(repo), "--output", str(out), "--batch", "3"]
    done = run_tritonforge("bench", LONG, *old, *QUICK_SWEEP, timeout=300, columns=80)
    assert done.returncode in (0, 1), done.stderr  # 1: a level not stable within 3 windows, still measured
    assert said(done.stderr, ("--repository", "--repo"), ("--output", "--out"), ("--batch", "--batch-size"))
    sweep = json.loads((out / "sweep.json").read_text())["sweeps"][0]
    assert sweep["levels"][0]["server"][LONG]["mean_batch"] == 3.0  # --batch was --batch-size
    assert lines_with(done.stdout, f"{LONG} (as served)"), done.stdout  # the title, whole on one line
    assert "…" not in done.stdout


@pytest.mark.slow
def test_bench_json_prints_the_sweep_document_it_wrote(tmp_path: Path) -> None:
    repo = mlp_repo(tmp_path, LONG)
    out = tmp_path / "bench"
    args = ["--repo", str(repo), "-o", str(out), "--batch-size", "2", "--json"]
    done = run_tritonforge("bench", LONG, *args, *QUICK_SWEEP, timeout=300)
    assert done.returncode in (0, 1), done.stderr
    assert not deprecations(done.stderr)
    assert json.loads(done.stdout) == json.loads((out / "sweep.json").read_text())


@pytest.mark.slow
def test_tune_old_spellings_tune_and_json_prints_the_tune_document(tmp_path: Path) -> None:
    repo = mlp_repo(tmp_path, LONG)
    out = tmp_path / "tune"
    space = ["--max-batch-size", "8", "--max-queue-delay-us", "0", "--instances", "1", "--preferred", "none"]
    space += ["--intra-op-threads", "1", "--refine", "0"]
    old = ["--repository", str(repo), "--output", str(out)]
    done = run_tritonforge("tune", LONG, "--p99-budget-ms", "1000", *old, *space, *QUICK_SWEEP, "--json")
    assert done.returncode == 0, done.stderr
    assert said(done.stderr, ("--repository", "--repo"), ("--output", "--out"))
    document = json.loads(done.stdout)
    assert document == json.loads((out / "tune.json").read_text())
    assert document["tune"]["model"] == LONG


# -- monitor, batch-infer, evaluate: against a running server ------------------------------------------


def test_monitor_reads_positional_endpoints_grpc_and_interval_as_the_new_options(
    server: EmbeddedServer,
) -> None:
    old = [server.metrics_url, "--grpc", server.grpc_url, "--interval", "0.5"]
    done = run_tritonforge("monitor", *old, "--once", "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    assert said(
        done.stderr, ("URL...", "--metrics-url URL"), ("--grpc", "--url"), ("--interval", "--interval-s")
    )
    data = json.loads(done.stdout)
    assert 0.5 <= data["interval_s"] < 2.0  # measured: at least the 0.5 s asked for, not the default 2 s
    assert list(data["servers"]) == [server.metrics_url]
    assert list(data["batch_sizes"]) == [server.metrics_url]  # read over gRPC: --grpc was --url


def test_batch_infer_reads_output_and_outputs_as_out_and_output_name(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    pytest.importorskip("pyarrow")
    from tritonforge.batch import read_outputs

    rows = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.save(tmp_path / "x.npy", rows)
    out = tmp_path / "out"
    old = ["--output", str(out), "--outputs", "total"]
    done = run_tritonforge(
        "batch-infer", "two_outputs", "--url", server.grpc_url, "--input", str(tmp_path / "x.npy"), *old
    )
    assert done.returncode == 0, done.stderr
    assert said(done.stderr, ("--output", "--out"), ("--outputs", "--output-name"))
    table = read_outputs(out)
    assert table.column_names == ["row_id", "total"]  # only the output named
    np.testing.assert_allclose(np.stack(table.column("total").to_pylist()).ravel(), rows.sum(axis=1))


def test_evaluate_reads_output_as_output_name_and_prints_json(tmp_path: Path) -> None:
    repo = mlp_repo(tmp_path)
    x = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    np.savez(tmp_path / "holdout.npz", x=x, labels=np.zeros(32, dtype=np.int64))
    with EmbeddedServer(repo) as running:
        args = ["--repo", str(repo), "--url", running.grpc_url, "--data", str(tmp_path / "holdout.npz")]
        done = run_tritonforge("evaluate", "mlp", *args, "--output", "probs", "--json", timeout=120)
        assert done.returncode == 0, done.stderr
        assert said(done.stderr, ("--output", "--output-name"))
        result = json.loads(done.stdout)
        assert result["model"] == "mlp" and result["version"] == 1 and "accuracy" in result["figures"]
        wrong = run_tritonforge("evaluate", "mlp", *args, "--output", "nosuch", timeout=120)
    assert wrong.returncode == 1 and "'mlp' has no output 'nosuch'" in wrong.stderr


# -- --json on the verbs that work on a repository's files, and the build table in a pipe ---------------


def test_repository_verbs_print_json_results(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    onnx = tiny_models.mlp_onnx(tmp_path / "m.onnx")
    for _ in range(2):
        added = run_tritonforge("add-model", str(repo), "mlp", str(onnx), "--max-batch-size", "4", "--json")
        assert added.returncode == 0, added.stderr
    assert (
        json.loads(added.stdout)["version"] == 2 and "max_batch_size: 4" in json.loads(added.stdout)["config"]
    )
    listed = json.loads(run_tritonforge("models", str(repo), "--json").stdout)
    assert [(m["model"], m["version"]) for m in listed] == [("mlp", 1), ("mlp", 2)]
    checked = run_tritonforge("validate", str(repo), "--json")
    assert checked.returncode == 0 and json.loads(checked.stdout)["ok"] is True
    promoted = run_tritonforge("promote", str(repo), "mlp", "1", "--json")
    assert promoted.returncode == 0, promoted.stderr
    assert json.loads(promoted.stdout)["to"] == [1]
    rolled = run_tritonforge("rollback", str(repo), "mlp", "--json")
    assert rolled.returncode == 0, rolled.stderr
    assert json.loads(rolled.stdout)["from"] == [1]
    (repo / "mlp" / "2" / "model.onnx").unlink()
    broken = run_tritonforge("validate", str(repo), "--json")
    assert broken.returncode == 1 and json.loads(broken.stdout)["ok"] is False
    assert any("model.onnx" in p["message"] for p in json.loads(broken.stdout)["problems"])


def test_ensemble_check_and_compile_print_json_results(tmp_path: Path) -> None:
    repo = mlp_repo(tmp_path)
    spec = tmp_path / "p.yaml"
    spec.write_text(
        textwrap.dedent("""
        name: scored
        inputs: [{name: x, dtype: FP32, dims: [8]}]
        outputs: [probs]
        steps: [{name: score, model: mlp, inputs: [x], outputs: [probs]}]
        """)
    )
    checked = run_tritonforge("ensemble", "check", str(spec), "--repo", str(repo), "--json")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["pipelines"][0]["name"] == "scored"
    compiled = run_tritonforge("ensemble", "compile", str(spec), "--repo", str(repo), "--json")
    assert compiled.returncode == 0, compiled.stderr
    assert any(Path(p).name == "scored" or "scored" in p for p in json.loads(compiled.stdout)["written"])
    spec.write_text(spec.read_text().replace("model: mlp", f"model: {LONG}"))
    failed = run_tritonforge("ensemble", "check", str(spec), "--repo", str(repo), "--json")
    assert failed.returncode == 1 and json.loads(failed.stdout)["problems"][0]["step"] == "score"


def test_build_table_keeps_a_long_model_name_whole_in_a_pipe(tmp_path: Path) -> None:
    onnx = tiny_models.mlp_onnx(tmp_path / "m.onnx")
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "build_long.py").write_text(
        textwrap.dedent(f"""
        import sys
        from tritonforge.repository import add_model
        add_model(sys.argv[sys.argv.index("--repo") + 1], {LONG!r}, {str(onnx)!r}, max_batch_size=4)
        """)
    )
    (tmp_path / "no_specs").mkdir()
    args = [
        "--tools",
        str(tools),
        "--ensembles",
        str(tmp_path / "no_specs"),
        "--repo",
        str(tmp_path / "repo"),
    ]
    done = run_tritonforge("build", *args, timeout=120, columns=80)
    assert done.returncode == 0, done.stdout + done.stderr
    [row] = [line for line in lines_with(done.stdout, LONG) if "onnxruntime_onnx" in line]
    assert re.search(rf"{LONG}\s+│\s+1\s+│", row), row
    assert "…" not in done.stdout


def test_export_and_quantize_print_json_and_refuse_a_value_outside_their_enum(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    import pickle

    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 8)).astype(np.float32)
    (tmp_path / "clf.pkl").write_bytes(pickle.dumps(LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))))
    np.save(tmp_path / "x.npy", x)
    repo = tmp_path / "repo"
    args = ["-o", str(tmp_path / "clf.onnx"), "--sample", str(tmp_path / "x.npy"), "--format", "onnx"]
    args += ["--repo", str(repo), "--name", "clf", "--json"]
    exported = run_tritonforge("export", str(tmp_path / "clf.pkl"), *args)
    assert exported.returncode == 0, exported.stderr
    document = json.loads(exported.stdout)
    assert document["passed"] is True and document["registered"] == str(repo / "clf" / "1")
    assert set(document["reports"]) >= {"label", "probabilities"}
    source = tiny_models.mlp_onnx(tmp_path / "mlp.onnx")
    np.savez(tmp_path / "hold.npz", x=x)
    args = ["-o", str(tmp_path / "half.onnx"), "--holdout", str(tmp_path / "hold.npz"), "--mode", "fp16"]
    quantized = run_tritonforge("quantize", str(source), *args, "--json")
    assert quantized.returncode == 0, quantized.stderr
    document = json.loads(quantized.stdout)
    assert document["passed"] is True and document["registered"] is None
    assert document["reports"]["probs"]["cosine_min"] > 0.99
    for verb, option in (("export", "--format"), ("quantize", "--mode")):
        refused = run_tritonforge(verb, str(source), "-o", str(tmp_path / "x.onnx"), option, "int4")
        assert refused.returncode == 2
        assert f"Invalid value for '{option}'" in refused.stderr and "int4" in refused.stderr


def test_a_repeated_old_spelling_is_said_once_and_each_of_its_values_kept() -> None:
    grpc = ["--grpc", "127.0.0.1:1", "--grpc=127.0.0.1:2"]
    done = run_tritonforge("monitor", *grpc, "--metrics-url", "127.0.0.1:1", "--once", timeout=60)
    assert done.returncode == 1
    assert said(done.stderr, ("--grpc", "--url"))
    assert "2 --url for 1 --metrics-url" in done.stderr  # both values (either form) reached --url


def test_tune_refuses_an_unknown_kind_of_preferred_sizes_before_it_starts() -> None:
    done = run_tritonforge("tune", "m", "--p99-budget-ms", "5", "--preferred", "none,bogus", timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: --preferred 'bogus' is not one of none, max, half (a comma list, e.g. none,max)"
    )
