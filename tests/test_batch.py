"""Batch inference over datasets (tritonforge.batch, `batch-infer`) through two real Triton servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("sklearn")

from batch_fixtures import build_batch_repository  # noqa: E402
from client_fixtures import servers, silent_http2_server  # noqa: E402
from test_build import load_tool  # noqa: E402
from tritonforge.batch import (  # noqa: E402
    EXIT_FAILED_ROWS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TOO_MANY_FAILURES,
    open_dataset,
    plan_inputs,
    read_errors,
    read_outputs,
    run_batch,
)
from tritonforge.client import TensorMetadata  # noqa: E402
from tritonforge.errors import BatchError  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits_tool():
    return load_tool("build_digits")


@pytest.fixture(scope="module")
def batch_repo(tmp_path_factory, digits_tool) -> Path:
    return build_batch_repository(tmp_path_factory.mktemp("batch"), digits_tool)


@pytest.fixture(scope="module")
def urls(batch_repo):
    with servers(batch_repo, 2) as running:
        yield [s.grpc_url for s in running]


@pytest.fixture(scope="module")
def digits(digits_tool):
    """The digits test split repeated to 900 rows, and the in-process (onnxruntime) answers for them."""
    _, x_test, _, _ = digits_tool.digits_split()
    x = np.concatenate([x_test, x_test])[:900].astype(np.float32)
    return x


def in_process(repo: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(repo / "digits_logreg" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"input": x}), strict=True))


def digits_table(x: np.ndarray, *, as_columns: bool = False) -> pa.Table:
    if as_columns:
        return pa.table({f"pixel_{i}": x[:, i] for i in range(x.shape[1])})
    return pa.table({"input": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64)})


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tritonforge", "batch-infer", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PROJECT_ROOT,
        **kwargs,
    )


def popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tritonforge", "batch-infer", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=PROJECT_ROOT,
    )


def finished_shards(out: Path) -> int:
    try:
        return len(json.loads((out / "_manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


# -- results equal to in-process ---------------------------------------------------------------------------


def test_batch_run_outputs_equal_in_process_onnxruntime_for_every_row(tmp_path, batch_repo, urls, digits):
    pq.write_table(digits_table(digits[:500]), tmp_path / "a.parquet", row_group_size=128)
    pq.write_table(digits_table(digits[500:]), tmp_path / "b.parquet")
    result = run_batch(
        "digits_logreg", urls, tmp_path / "*.parquet", tmp_path / "out", shard_rows=256, concurrency=4
    )
    assert result.status == "complete" and result.exit_code == EXIT_OK
    assert (result.rows_ok, result.rows_failed, result.shards_total) == (900, 0, 4)
    table = read_outputs(tmp_path / "out")
    assert table.column("row_id").to_pylist() == list(range(900))
    want = in_process(batch_repo, digits)
    np.testing.assert_array_equal(table.column("label").to_numpy(), want["label"])
    probs = np.stack(table.column("probabilities").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(probs, want["probabilities"], rtol=1e-5, atol=1e-6)
    assert result.server and result.server[0].model == "digits_logreg"
    assert result.server[0].inferences == 900  # Triton saw every row once, over both servers
    assert result.latencies_ms["p99"] >= result.latencies_ms["p50"] > 0


def test_lanes_send_on_streams_of_their_own_and_answer_like_client_calls(tmp_path, urls, digits):
    pq.write_table(digits_table(digits), tmp_path / "d.parquet")
    kwargs = {"shard_rows": 300, "concurrency": 4, "batch_size": 16}
    on = run_batch("digits_logreg", urls, tmp_path / "d.parquet", tmp_path / "on", **kwargs)
    off = run_batch("digits_logreg", urls, tmp_path / "d.parquet", tmp_path / "off", streams=False, **kwargs)
    assert on.exit_code == off.exit_code == EXIT_OK and on.requests == off.requests == 57
    # the first requests of each shape (16 rows, and a shard's last 12; at most one per lane before the
    # first answer) go through the client, which checks them against the model's metadata; the rest on
    # the lanes' streams
    assert on.requests - 2 * 4 <= on.requests_streamed < on.requests and off.requests_streamed == 0
    assert read_outputs(tmp_path / "on").equals(read_outputs(tmp_path / "off"))
    # shared memory asked for: the client's calls carry it, so no streams
    shm = run_batch(
        "digits_logreg",
        urls,
        tmp_path / "d.parquet",
        tmp_path / "shm",
        client_options={"shared_memory": "system"},
        **kwargs,
    )
    assert shm.requests_streamed == 0 and read_outputs(tmp_path / "shm").equals(read_outputs(tmp_path / "on"))


def test_batch_cli_reads_csv_columns_and_numpy_and_answers_like_parquet(tmp_path, batch_repo, urls, digits):
    x = digits[:300]
    import pyarrow.csv as pcsv

    pcsv.write_csv(digits_table(x, as_columns=True), tmp_path / "digits.csv")
    np.save(tmp_path / "digits.npy", x)
    want = in_process(batch_repo, x)["label"]
    for source, extra in (("digits.csv", ["--map", "input=pixel_*"]), ("digits.npy", ["--no-streams"])):
        out = tmp_path / f"out-{source}"
        done = cli(
            "digits_logreg",
            *[arg for u in urls for arg in ("--url", u)],
            "--input",
            str(tmp_path / source),
            "--out",
            str(out),
            *extra,
        )
        assert done.returncode == 0, done.stderr
        assert "throughput" in done.stdout and "queue µs" in done.stdout  # the summary and Triton's split
        np.testing.assert_array_equal(read_outputs(out).column("label").to_numpy(), want)
    # a rerun on the same --out does nothing more; --json says so as one document on stdout
    again = cli(
        "digits_logreg",
        *[arg for u in urls for arg in ("--url", u)],
        "--input",
        str(tmp_path / "digits.npy"),
        "--out",
        str(tmp_path / "out-digits.npy"),
        "--json",
    )
    assert again.returncode == 0, again.stderr
    figures = json.loads(again.stdout)
    assert figures["status"] == "complete" and figures["rows_skipped"] == len(x) and figures["rows_ok"] == 0
    assert figures["exit_code"] == 0 and "throughput" not in again.stdout


def test_text_column_is_sent_to_a_bytes_input_as_utf8(tmp_path, urls):
    texts = ["hello", "", "naïve café", "Triton serves many models", "日本語"] * 20
    with open(tmp_path / "t.jsonl", "w") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    result = run_batch("textlen", urls, tmp_path / "t.jsonl", tmp_path / "out")
    assert result.exit_code == EXIT_OK
    assert read_outputs(tmp_path / "out").column("chars").to_pylist() == [len(t) for t in texts]


def test_an_ensemble_runs_like_any_model_and_its_steps_get_their_server_side_split(tmp_path, urls):
    x = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
    np.save(tmp_path / "x.npy", x)
    result = run_batch("double_twice", urls, tmp_path / "x.npy", tmp_path / "out")
    assert result.exit_code == EXIT_OK
    got = np.stack(read_outputs(tmp_path / "out").column("y").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(got, x * 4)
    split = {s.model: s for s in result.server}
    assert set(split) == {"double_twice", "double"}
    assert split["double"].inferences == 2 * 40  # two steps, every row


# -- failures ----------------------------------------------------------------------------------------------


def test_failing_rows_go_to_the_errors_file_with_reasons_and_the_rest_are_answered(tmp_path, urls):
    x = np.arange(200 * 4, dtype=np.float32).reshape(200, 4)
    x[[7, 90, 91, 150]] *= -1  # the model refuses negative values
    rows = [list(map(float, r)) for r in x]
    rows[33] = None  # a null: a bad value, never sent
    rows[120] = [1.0, 2.0]  # the wrong length
    pq.write_table(pa.table({"x": pa.array(rows, pa.list_(pa.float32()))}), tmp_path / "x.parquet")
    result = run_batch("double", urls, tmp_path / "x.parquet", tmp_path / "out", shard_rows=64)
    assert result.status == "complete" and result.exit_code == EXIT_FAILED_ROWS
    assert result.requests_streamed > 0  # the good requests went on streams, the failing ones to the client
    errors = read_errors(tmp_path / "out")
    assert [e["row_id"] for e in errors] == [7, 33, 90, 91, 120, 150]
    by_row = {e["row_id"]: e for e in errors}
    assert by_row[33]["stage"] == "input" and "null" in by_row[33]["error"]
    assert by_row[120]["stage"] == "input" and "shape [2]" in by_row[120]["error"]
    assert by_row[7]["stage"] == "model" and "negative input" in by_row[7]["error"]
    table = read_outputs(tmp_path / "out")
    good = [i for i in range(200) if i not in by_row]
    assert table.column("row_id").to_pylist() == good
    np.testing.assert_array_equal(np.stack(table.column("y").to_numpy(zero_copy_only=False)), x[good] * 2)


def test_rows_of_several_lengths_go_in_separate_requests_and_come_back_in_row_order(tmp_path, urls):
    rng = np.random.default_rng(2)
    ids = [rng.integers(0, 10, n).tolist() for n in rng.choice([1, 2, 3], size=300)]
    ids[5] = [99]  # past the model's table: fails when it runs (a model error), alone
    pq.write_table(pa.table({"ids": pa.array(ids, pa.list_(pa.int64()))}), tmp_path / "ids.parquet")
    result = run_batch("lookup", urls, tmp_path / "ids.parquet", tmp_path / "out", shard_rows=128)
    assert (result.rows_ok, result.rows_failed) == (299, 1)
    assert [e["row_id"] for e in read_errors(tmp_path / "out")] == [5]
    table = pq.read_table(tmp_path / "out")  # the shard files as they are, each in row order
    good = [i for i in range(300) if i != 5]
    assert table.column("row_id").to_pylist() == good
    values = np.arange(40, dtype=np.float32).reshape(10, 4)  # the model's table
    for row_id, vec in zip(good, table.column("vec").to_pylist(), strict=True):
        np.testing.assert_array_equal(np.array(vec, np.float32), values[ids[row_id]])


def test_run_stops_with_exit_4_past_max_errors_and_keeps_finished_shards(tmp_path, urls):
    x = np.ones((300, 4), dtype=np.float32)
    x[150:] = -1  # every row of the later shards fails
    pq.write_table(
        pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4)}), tmp_path / "x.parquet"
    )
    out = tmp_path / "out"
    done = cli(
        "double",
        "--url",
        urls[0],
        "--input",
        str(tmp_path / "x.parquet"),
        "--out",
        str(out),
        "--shard-rows",
        "50",
        "--max-errors",
        "10",
        "--concurrency",
        "1",
    )
    assert done.returncode == EXIT_TOO_MANY_FAILURES, done.stderr
    assert "--max-errors" in done.stderr
    # shards run concurrently, so the stop may come before every clean shard has committed; those that did
    # are kept, and the failing shards' rows never pass the limit by more than one shard
    assert finished_shards(out) >= 1
    assert len(read_errors(out)) <= 10 + 50


def test_cli_refuses_an_unknown_model_in_one_line_on_stderr(tmp_path, urls):
    np.save(tmp_path / "x.npy", np.zeros((3, 4), np.float32))
    done = cli("nope", "--url", urls[0], "--input", str(tmp_path / "x.npy"), "--out", str(tmp_path / "o"))
    assert done.returncode == 1
    assert done.stderr.startswith("error: model 'nope' at ") and done.stderr.count("\n") == 1


def test_plan_inputs_raises_batch_error_naming_the_columns_when_an_input_has_none():
    inputs = [TensorMetadata("input", "FP32", (-1, 64))]
    with pytest.raises(BatchError, match=r"input 'input' has no column.*\['a', 'b'\].*--map input=COLUMN"):
        plan_inputs(inputs, True, ["a", "b"])
    with pytest.raises(BatchError, match="takes \\[64\\] per row \\(64 values\\) but is mapped to 2 columns"):
        plan_inputs(inputs, True, ["a", "b"], {"input": "*"})
    assert plan_inputs(inputs, True, ["only"])[0].columns == ("only",)


def test_open_dataset_raises_batch_error_for_an_unknown_format_or_no_match(tmp_path):
    (tmp_path / "x.txt").write_text("1\n")
    with pytest.raises(BatchError, match=r"unknown input format '\.txt'"):
        open_dataset(tmp_path / "x.txt")
    with pytest.raises(BatchError, match="no file matches"):
        open_dataset(str(tmp_path / "*.parquet"))


def test_an_output_folder_holding_another_run_is_refused(tmp_path, urls):
    np.save(tmp_path / "x.npy", np.ones((10, 4), np.float32))
    run_batch("double", urls, tmp_path / "x.npy", tmp_path / "out")
    with pytest.raises(BatchError, match=r"holds a run with other settings \(.*shard_rows"):
        run_batch("double", urls, tmp_path / "x.npy", tmp_path / "out", shard_rows=5)


# -- sharing the work and resuming ------------------------------------------------------------------------


def test_shards_k_of_n_are_disjoint_and_together_cover_every_row_once(tmp_path, urls):
    x = np.arange(1000 * 4, dtype=np.float32).reshape(1000, 4)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    for k in range(3):
        r = run_batch("double", urls, tmp_path / "x.npy", out, shard_rows=100, shard=(k, 3))
        assert r.rows_total == sum(min(100, 1000 - i * 100) for i in range(10) if i % 3 == k)
    table = read_outputs(out)
    assert table.column("row_id").to_pylist() == list(range(1000))
    np.testing.assert_array_equal(np.stack(table.column("y").to_numpy(zero_copy_only=False)), x * 2)
    assert sorted(p.name for p in out.glob("_manifest*")) == [f"_manifest.{k}-of-3.json" for k in range(3)]


def test_a_finished_run_started_again_does_nothing(tmp_path, urls):
    np.save(tmp_path / "x.npy", np.ones((120, 4), np.float32))
    first = run_batch("double", urls, tmp_path / "x.npy", tmp_path / "out", shard_rows=50)
    again = run_batch("double", urls, tmp_path / "x.npy", tmp_path / "out", shard_rows=50)
    assert (first.rows_ok, again.rows_ok, again.rows_skipped, again.requests) == (120, 0, 120, 0)


def test_a_leftover_file_of_an_unfinished_shard_is_replaced_not_read(tmp_path, urls):
    x = np.ones((100, 4), np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    out.mkdir()
    # what a run killed between renaming shard 1's file and recording it leaves: a file no manifest lists
    pq.write_table(pa.table({"row_id": pa.array([50, 50], pa.int64())}), out / "part-000001.parquet")
    (out / ".part-000000.parquet.tmp-99999").write_bytes(b"half a file")
    with pytest.raises(BatchError):
        read_outputs(out)
    run_batch("double", urls, tmp_path / "x.npy", out, shard_rows=50)
    assert read_outputs(out).column("row_id").to_pylist() == list(range(100))
    assert not list(out.glob(".*.tmp-*"))


@pytest.mark.slow
def test_a_run_killed_twice_with_sigkill_then_restarted_writes_each_row_exactly_once(tmp_path, urls):
    n = 1500
    x = np.random.default_rng(0).random((n, 4), dtype=np.float32)
    pq.write_table(
        pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4)}), tmp_path / "x.parquet"
    )
    out = tmp_path / "out"
    args = (
        "double_slow",
        "--url",
        urls[0],
        "--url",
        urls[1],
        "--input",
        str(tmp_path / "x.parquet"),
        "--out",
        str(out),
        "--shard-rows",
        "50",
        "--batch-size",
        "5",
        "--concurrency",
        "2",
    )
    for kill_after in (3, 9):
        proc = popen(*args)
        deadline = time.monotonic() + 120
        while finished_shards(out) < kill_after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed; make it slower"
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.communicate()
        assert finished_shards(out) < n // 50
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "_manifest.json").read_text())
    assert len(manifest["shards"]) == n // 50
    table = read_outputs(out)
    ids = table.column("row_id").to_numpy()
    assert len(ids) == n and np.array_equal(np.sort(ids), np.arange(n))  # every row, exactly once
    np.testing.assert_array_equal(np.stack(table.column("y").to_numpy(zero_copy_only=False)), x * 2)
    assert read_errors(out) == []
    # and the files on disk are exactly the committed ones: nothing half-written left behind
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [
        f"part-{i:06d}.parquet" for i in range(n // 50)
    ]
    assert not list(out.rglob(".*"))


@pytest.mark.slow
def test_sigterm_stops_cleanly_within_the_grace_period_and_a_rerun_finishes(tmp_path, urls):
    n = 1500
    x = np.random.default_rng(1).random((n, 4), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    args = (
        "double_slow",
        "--url",
        urls[0],
        "--input",
        str(tmp_path / "x.npy"),
        "--out",
        str(out),
        "--shard-rows",
        "100",
        "--batch-size",
        "5",
        "--concurrency",
        "2",
        "--grace-s",
        "5",
    )
    proc = popen(*args)
    deadline = time.monotonic() + 120
    while finished_shards(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5 + 3
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "run again to resume" in stderr
    shards_then = finished_shards(out)
    assert 2 <= shards_then < n // 100
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    table = read_outputs(out)
    assert table.column("row_id").to_pylist() == list(range(n))
    np.testing.assert_array_equal(np.stack(table.column("y").to_numpy(zero_copy_only=False)), x * 2)


# -- Ray Data on a real local cluster ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    """A real Ray cluster on this machine: a head and one worker node (1 CPU each), loopback only, its
    files in a folder of its own; every process it started is gone afterwards."""
    # Ray turns 127.0.0.1 into the machine's outward address unless told the "cluster" is local-only;
    # read when ray is imported, so set first (the nodes and workers inherit it)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray = pytest.importorskip("ray")
    import shutil
    import tempfile

    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(
        prefix="tfray-", dir="/tmp"
    )  # short: Ray's socket paths must stay < 108 chars
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir  # all of Ray's files (and its address file) here, not in /tmp/ray
    node = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "object_store_memory": 80 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        assert cluster.address.startswith("127.0.0.1:")
        ray.init(
            address=cluster.address, _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=False
        )
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        import psutil

        left = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
        for p in left:  # only processes of this cluster (they name its folder)
            p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        assert left == []


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")  # Ray Data's own, about its own settings
def test_ray_data_map_batches_with_triton_predictor_on_a_local_cluster_equals_in_process(
    tmp_path, batch_repo, urls, digits, ray_cluster
):
    import ray

    from tritonforge.batch import TritonPredictor

    assert len(ray.nodes()) == 2 and all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())
    x = digits[:400].copy()
    x[5, 0] = np.nan  # refused by the client by default; answered once the client allows it
    table = pa.table(
        {
            "row": pa.array(np.arange(400)),
            "input": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64),
        }
    )
    ds = ray.data.from_arrow([table.slice(i, 100) for i in range(0, 400, 100)])  # four blocks
    out = ds.map_batches(
        TritonPredictor,
        fn_constructor_kwargs={
            "model": "digits_logreg",
            "urls": urls,
            "outputs": ["label"],
            "concurrency": 4,
            "client_options": {"allow_non_finite": True},
        },
        compute=ray.data.ActorPoolStrategy(size=2),  # two actors, one client each
        num_cpus=0.5,
        batch_size=64,
        batch_format="pyarrow",
    )
    result = out.to_arrow_refs()
    answered = pa.concat_tables(ray.get(result)).sort_by("row")
    assert answered.column("row").to_pylist() == list(range(400))
    assert set(answered.column("error").to_pylist()) == {""}
    want = in_process(batch_repo, x)["label"]
    np.testing.assert_array_equal(answered.column("label").to_numpy(), want)


def test_triton_predictor_marks_failed_rows_in_the_error_column_and_answers_the_rest(urls):
    from tritonforge.batch import TritonPredictor

    predictor = TritonPredictor("double", urls, batch_size=4)
    try:
        x = np.ones((10, 4), np.float32)
        x[3] = -1
        out = predictor({"x": x})
    finally:
        predictor.close()
    errors = out.column("error").to_pylist()
    assert [i for i, e in enumerate(errors) if e] == [3] and "negative input" in errors[3]
    y = np.stack(out.column("y").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(np.delete(y, 3, axis=0), np.delete(x, 3, axis=0) * 2)


# -- the lanes' streams (tritonforge.client._wire) ---------------------------------------------------------


def _double_request(x: np.ndarray) -> bytes:
    from tritonforge.client._codec import frame, request_header, tensor_bytes

    header = request_header("double", None, [("x", "FP32", x.shape)], ["y"])
    return frame(header, [tensor_bytes(x, "FP32")])


def _answer(raw: bytes) -> tuple[str, np.ndarray | None]:
    from tritonclient.grpc import service_pb2 as pb

    from tritonforge.client._codec import decode_response

    response = pb.ModelStreamInferResponse.FromString(raw)
    if response.error_message:
        return response.error_message, None
    return "", decode_response(response.infer_response)["y"]


def test_a_lane_stream_answers_requests_and_a_model_error_leaves_it_usable(urls):
    import asyncio

    from tritonforge.client._wire import Streams

    x = np.arange(64, dtype=np.float32).reshape(16, 4)

    async def go() -> list[tuple[str, np.ndarray | None]]:
        streams = Streams(urls, (), timeout_s=30.0)
        lanes = [streams.lane(i) for i in range(2)]  # one on each server
        try:
            answers = []
            for body in (_double_request(x), _double_request(-x[:2]), _double_request(x + 1)):
                for lane in lanes:
                    raw = await streams.send(lane, body)
                    assert raw is not None
                    answers.append(_answer(raw))
            assert [lane.breaks for lane in lanes] == [0, 0] and lanes[0].url != lanes[1].url
            return answers
        finally:
            await streams.aclose()

    answers = asyncio.run(go())
    for error, y in answers[:2] + answers[4:]:
        assert error == "" and y is not None
    np.testing.assert_array_equal(answers[0][1], x * 2)
    np.testing.assert_array_equal(answers[5][1], (x + 1) * 2)
    assert all("negative input" in error and y is None for error, y in answers[2:4])


def test_streams_hand_a_request_back_when_the_endpoint_refuses_connections():
    import asyncio

    from tritonforge.client._wire import Streams
    from tritonforge.server.embedded import free_port

    async def go() -> tuple[bytes | None, bool]:
        streams = Streams([f"127.0.0.1:{free_port()}"], (), timeout_s=5.0)
        lane = streams.lane(0)
        try:
            return await streams.send(lane, _double_request(np.ones((1, 4), np.float32))), lane.dead
        finally:
            await streams.aclose()

    assert asyncio.run(go()) == (None, True)  # None: the caller sends it through the client instead


def test_streams_give_up_on_an_answer_later_than_the_timeout():
    import asyncio

    from tritonforge.client._wire import Streams

    async def go() -> tuple[bytes | None, int, float]:
        async with silent_http2_server() as url:
            streams = Streams([url], (), timeout_s=0.2)
            lane = streams.lane(0)
            try:
                started = time.perf_counter()
                raw = await streams.send(lane, _double_request(np.ones((1, 4), np.float32)))
                return raw, lane.breaks, time.perf_counter() - started
            finally:
                await streams.aclose()

    raw, breaks, waited_s = asyncio.run(go())
    assert raw is None and breaks == 1 and 0.2 <= waited_s < 5


@pytest.mark.parametrize("uvloop_installed", [True, False])
def test_a_run_gets_uvloop_when_installed_and_asyncio_otherwise(uvloop_installed):
    if uvloop_installed:
        pytest.importorskip("uvloop")
    hide = "" if uvloop_installed else "sys.modules['uvloop'] = None\n"  # import uvloop raises ImportError
    code = (
        f"import asyncio, sys\n{hide}from tritonforge.batch.run import _run_loop\n"
        "async def kind():\n    return type(asyncio.get_running_loop()).__module__\n"
        "print(_run_loop(kind()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().split(".")[0] == ("uvloop" if uvloop_installed else "asyncio")


@pytest.mark.slow
def test_a_server_gone_mid_run_stops_it_with_an_error_keeping_the_finished_shards(tmp_path, batch_repo):
    import threading

    from tritonforge.client import RetryPolicy
    from tritonforge.server import EmbeddedServer

    x = np.arange(3000 * 4, dtype=np.float32).reshape(3000, 4)
    pq.write_table(
        pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4)}), tmp_path / "x.parquet"
    )
    server = EmbeddedServer(batch_repo, load_models=["double_slow"], model_control="explicit").start()
    stopper: list[threading.Thread] = []

    def on_event(kind: str, data: dict) -> None:
        if kind == "shard" and not stopper:  # the first shard is committed: the server goes away
            stopper.append(threading.Thread(target=server.stop))
            stopper[0].start()

    try:
        with pytest.raises(BatchError, match="run the same command again to resume"):
            run_batch(
                "double_slow",
                [server.grpc_url],
                tmp_path / "x.parquet",
                tmp_path / "out",
                shard_rows=160,
                concurrency=4,
                on_event=on_event,
                client_options={"retry": RetryPolicy(max_attempts=2, backoff_initial_s=0.05), "deadline": 10},
            )
    finally:
        for thread in stopper:
            thread.join()
        server.stop()
    done = json.loads((tmp_path / "out" / "_manifest.json").read_text())["shards"]
    assert 1 <= len(done) < 3000 // 160 + 1
    table = read_outputs(tmp_path / "out")
    np.testing.assert_array_equal(
        np.stack(table.column("y").to_numpy(zero_copy_only=False)), x[table.column("row_id").to_numpy()] * 2
    )
