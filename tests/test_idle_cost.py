"""What keeps an idle model cheap on the embedded server, through the real server: one stub process per model
instance (no auto-completion stub unless a model needs one), a stub that loads only what serving needs, and
thread pools as the config names them — while the model still batches and answers as before."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import pytest
import tritonclient.grpc as grpcclient

import tiny_models
from conftest import triton_infer
from triton_stats import counted_since, counts
from tritonforge.errors import ModelLoadError
from tritonforge.server import EmbeddedServer
from tritonforge.server.install import TritonInstall, auto_complete_flags, bls_pool_flags, needs_auto_complete
from tritonforge.server.runtime import available_cpus

CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [{{ name: "x" data_type: TYPE_FP32 dims: [8] }}]
output [{{ name: "probs" data_type: TYPE_FP32 dims: [3] }}]
dynamic_batching {{ max_queue_delay_microseconds: 20000 }}
instance_group [{{ count: {instances} kind: KIND_CPU }}]
parameters {{ key: "intra_op_thread_count" value {{ string_value: "{threads}" }} }}
parameters {{ key: "inter_op_thread_count" value {{ string_value: "1" }} }}
"""

AUTO_COMPLETED = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config):
        config.add_input({"name": "X", "data_type": "TYPE_FP32", "dims": [2]})
        config.add_output({"name": "Y", "data_type": "TYPE_FP32", "dims": [2]})
        return config

    def execute(self, requests):
        get = pb_utils.get_input_tensor_by_name
        out = [get(r, "X").as_numpy() + 1 for r in requests]
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", y)]) for y in out]
"""


def _onnx_repository(root: Path, models: dict[str, tuple[int, int]]) -> tuple[Path, Path]:
    """``{name: (instances, intra-op threads)}`` of one small MLP; the repository and the ONNX file."""
    source = tiny_models.mlp_onnx(root / "mlp.onnx")
    repo = root / "repo"
    for name, (instances, threads) in models.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").write_bytes(source.read_bytes())
        (repo / name / "config.pbtxt").write_text(
            CONFIG.format(name=name, instances=instances, threads=threads)
        )
    return repo, source


def _stubs(server: EmbeddedServer) -> dict[str, psutil.Process]:
    """The server's stub processes by instance name (``one_0_1``), read from their command lines."""
    assert server.pid is not None
    found = {}
    for proc in psutil.Process(server.pid).children(recursive=True):
        instance = [arg for arg in proc.cmdline() if re.fullmatch(r"\w+_\d+_\d+", arg)]
        found[instance[0]] = proc
    return found


def _answers(server: EmbeddedServer) -> bool:
    """Model "one" of :func:`_onnx_repository` answers a request with its output's shape."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        out = triton_infer(client, "one", {"x": np.ones((1, 8), dtype=np.float32)})["probs"]
    finally:
        client.close()
    return out.shape == (1, 3)


def test_a_repository_of_complete_configs_starts_one_stub_per_instance_that_still_batches(tmp_path: Path):
    repo, source = _onnx_repository(tmp_path, {"one": (2, 1), "three": (1, 3)})
    x = tiny_models.RNG.standard_normal((32, 8)).astype(np.float32)
    with EmbeddedServer(repo, log_verbose=1) as server:
        # Triton starts a stub per instance and none to ask a model to auto-complete its config
        assert server.log.count("Starting Python backend stub") == 3
        stubs = _stubs(server)
        assert sorted(stubs) == ["one_0_0", "one_0_1", "three_0_0"]
        # a loaded stub holds the engine, not the server's launcher (subprocess) or the client's TLS (ssl)
        maps = Path(f"/proc/{stubs['one_0_0'].pid}/maps").read_text()
        assert "onnxruntime" in maps
        assert "_posixsubprocess" not in maps and "/_ssl." not in maps
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            before = counts(server.grpc_url, "one")
            with ThreadPoolExecutor(16) as pool:
                outs = list(
                    pool.map(lambda i: triton_infer(client, "one", {"x": x[i : i + 1]})["probs"], range(32))
                )
            triton_infer(client, "three", {"x": x[:2]})
            executions = counted_since(server.grpc_url, "one", before, 32).executions
        finally:
            client.close()
        assert 0 < executions < 32, "no batching"
        # nor once it has answered: Triton's stub asks asyncio whether execute returned a coroutine after
        # every execute, and our backends' list is answered without importing asyncio (nor, with it,
        # socket, ssl and subprocess: ~3.3 MiB a stub)
        # nor numpy's random module (its extensions, and OpenSSL's libcrypto through hashlib), fft, ma, or
        # the pickle numpy imports for saving arrays
        for stub in stubs.values():
            maps = Path(f"/proc/{stub.pid}/maps").read_text()
            assert "/_asyncio." not in maps and "/_ssl." not in maps and "_posixsubprocess" not in maps
            assert "/mtrand." not in maps and "/_pocketfft_internal." not in maps and "libcrypto" not in maps
            assert "/_pickle." not in maps
        expected = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
            0
        ]
        np.testing.assert_allclose(np.concatenate(outs), expected, rtol=1e-5, atol=1e-6)
        # the config's intra-op threads are in effect: a pool of 3 runs 2 worker threads beside the caller
        assert stubs["three_0_0"].num_threads() - stubs["one_0_0"].num_threads() == 2


def test_a_server_that_can_only_serve_framework_models_keeps_no_bls_thread_pool_per_instance(tmp_path: Path):
    # Triton's Python backend keeps 32 threads per instance in the server for BLS calls and decoupled
    # responses, which our backends never make
    repo, _ = _onnx_repository(tmp_path, {"one": (2, 1)})
    threads = {}
    for args in ((), ("--backend-config=python,thread-pool-size=32",)):  # the second: Triton's default
        with EmbeddedServer(repo, extra_args=args) as server:
            assert server.pid is not None
            threads[args] = psutil.Process(server.pid).num_threads()
            assert _answers(server)
    assert threads[("--backend-config=python,thread-pool-size=32",)] - threads[()] == 2 * 31, threads


def test_the_bls_pool_stays_wherever_a_python_model_could_run(tmp_path: Path):
    repo, _ = _onnx_repository(tmp_path, {"one": (1, 1)})
    (repo / "ens").mkdir()
    (repo / "ens" / "config.pbtxt").write_text('name: "ens"\nplatform: "ensemble"\n')
    wheel = TritonInstall(binary=Path("tritonserver"), library_dirs=(), backend_dir=None)
    full = TritonInstall(binary=Path("tritonserver"), library_dirs=(), backend_dir=Path("backends"))
    lowered = ["--backend-config=python,thread-pool-size=1"]
    assert bls_pool_flags(wheel, [repo], "none") == lowered
    assert bls_pool_flags(wheel, [repo], "explicit") == []  # a Python model may be loaded later
    assert bls_pool_flags(wheel, [repo], "poll") == []
    assert bls_pool_flags(full, [repo], "none") == []  # its C++ backends serve these models
    assert bls_pool_flags(wheel, [repo, "s3://bucket/models"], "none") == []  # can't be read here
    assert bls_pool_flags(wheel, [repo], "none", ["--backend-config=python,thread-pool-size=8"]) == []
    (repo / "py" / "1").mkdir(parents=True)
    (repo / "py" / "config.pbtxt").write_text('name: "py"\nbackend: "python"\n')
    assert bls_pool_flags(wheel, [repo], "none") == []
    (repo / "py" / "config.pbtxt").write_text('name: "py"\nplatform: "onnxruntime_onnx"\n')
    assert bls_pool_flags(wheel, [repo], "none") == lowered
    (repo / "py" / "1" / "model.py").write_text("class TritonPythonModel:\n    pass\n")
    assert bls_pool_flags(wheel, [repo], "none") == []  # a Python file beside it
    (repo / "py" / "1" / "model.py").unlink()
    (repo / "py" / "config.pbtxt").unlink()
    assert bls_pool_flags(wheel, [repo], "none") == []  # auto-completion decides what it is


def test_a_stub_starts_no_openblas_threads_unless_the_server_environment_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # numpy's OpenBLAS starts a thread per CPU (up to 64) at import, in every stub; nothing there calls BLAS
    if available_cpus() < 2:
        pytest.skip("OpenBLAS starts no thread of its own on one CPU")
    repo, _ = _onnx_repository(tmp_path, {"one": (1, 1)})  # one intra-op thread: onnxruntime adds no pool
    threads = {}
    for told in (None, "2"):
        if told is None:
            monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OPENBLAS_NUM_THREADS", told)
        with EmbeddedServer(repo) as server:
            threads[told] = _stubs(server)["one_0_0"].num_threads()
    assert threads["2"] - threads[None] == 1, threads


def test_the_asyncio_stand_in_answers_a_list_alone_and_hands_anything_else_to_asyncio():
    code = textwrap.dedent(
        """
        import sys, types
        from tritonforge.server.stub_modules import AsyncioOnDemand, defer_asyncio
        assert "asyncio" not in sys.modules
        defer_asyncio()
        import asyncio
        assert isinstance(asyncio, AsyncioOnDemand) and asyncio.iscoroutine([]) is False
        assert "asyncio.events" not in sys.modules

        async def execute():
            return []

        if sys.argv[1] == "coroutine":
            coroutine = execute()
            assert asyncio.iscoroutine(coroutine) is True  # not a list: the real asyncio answers
            coroutine.close()
            import asyncio
        else:  # a submodule or any other name loads the real one too
            from asyncio import events
            assert events.get_event_loop_policy()
        assert type(sys.modules["asyncio"]) is types.ModuleType and asyncio.run(execute()) == []
        print("ok")
        """
    )
    for case in ("coroutine", "submodule"):
        done = subprocess.run([sys.executable, "-c", code, case], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "ok"


def test_numpy_submodules_a_stub_never_uses_load_on_first_use_and_then_are_numpys_own():
    code = textwrap.dedent(
        """
        import sys
        from tritonforge.server.stub_modules import NUMPY_ON_DEMAND, OnDemandModule, defer_numpy_extras
        defer_numpy_extras()
        import numpy as np
        assert all(type(sys.modules[name]) is OnDemandModule for name in NUMPY_ON_DEMAND)
        assert "_pickle" not in sys.modules
        import ast, pickle, textwrap  # the standard library's, on first use
        assert ast.literal_eval("[1, 2]") == [1, 2] and textwrap.dedent("  a") == "a"
        assert "numpy.random.mtrand" not in sys.modules and "numpy.ma.core" not in sys.modules
        assert float(np.ones(3).sum()) == 3.0  # numpy itself as usual
        # each loads when used, by attribute or by import, and is then numpy's own
        rng = np.random.default_rng(0)
        assert sys.modules["numpy.random"] is np.random and type(np.random) is not OnDemandModule
        assert pickle.loads(pickle.dumps(rng)).random() == rng.random()
        from numpy.fft import fft
        assert abs(fft(np.ones(4))[0] - 4) < 1e-12
        import numpy.ma as ma  # a name bound to the stand-in before it loaded keeps forwarding to numpy's
        assert ma.masked_array([1, 2], mask=[0, 1]).sum() == 1 and ma.MaskedArray is np.ma.MaskedArray
        assert np.ma is sys.modules["numpy.ma"] and type(np.ma) is not OnDemandModule
        assert np.polynomial.Polynomial([1, 2])(2) == 5
        assert np.ctypeslib.as_array(np.ctypeslib.as_ctypes(np.arange(3))).tolist() == [0, 1, 2]
        assert not any(type(sys.modules[name]) is OnDemandModule for name in NUMPY_ON_DEMAND)
        before = dict(sys.modules)
        defer_numpy_extras()  # numpy is imported: nothing changes
        assert sys.modules == before
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_a_model_added_after_start_that_needs_auto_completion_loads_when_it_is_turned_back_on(tmp_path: Path):
    repo, _ = _onnx_repository(tmp_path, {"one": (1, 1)})
    late = repo / "late" / "1"

    def add_late() -> None:
        late.mkdir(parents=True, exist_ok=True)
        (late / "model.py").write_text(textwrap.dedent(AUTO_COMPLETED).lstrip())

    with EmbeddedServer(repo, model_control="explicit", load_models=["one"]) as server:
        add_late()  # config-less: only auto-completion can give it inputs and outputs
        with pytest.raises(ModelLoadError, match="late"):
            server.load_model("late")
    (repo / "late").rename(tmp_path / "late-aside")
    with EmbeddedServer(
        repo, model_control="explicit", load_models=["one"], extra_args=["--strict-model-config=false"]
    ) as server:
        add_late()
        server.load_model("late")
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            out = triton_infer(client, "late", {"X": np.array([1.0, 2.0], dtype=np.float32)})["Y"]
        finally:
            client.close()
        np.testing.assert_array_equal(out, [2.0, 3.0])


def test_needs_auto_complete_only_for_a_model_that_relies_on_it(tmp_path: Path):
    repo, _ = _onnx_repository(tmp_path, {"one": (1, 1)})
    (repo / "notes.txt").write_text("a file beside the models is not a model")
    assert not needs_auto_complete([repo], "explicit")
    assert not needs_auto_complete([repo], "none")
    wheel = TritonInstall(binary=Path("tritonserver"), library_dirs=(), backend_dir=None)
    full = TritonInstall(binary=Path("tritonserver"), library_dirs=(), backend_dir=Path("backends"))
    assert auto_complete_flags(wheel, [repo], "none") == ["--disable-auto-complete-config"]
    assert auto_complete_flags(full, [repo], "none") == []  # its C++ backends complete ONNX configs
    assert auto_complete_flags(wheel, [repo], "none", ["--strict-model-config=false"]) == []  # the user's
    assert needs_auto_complete([repo], "poll")  # models may appear while it runs
    assert needs_auto_complete([repo, "s3://bucket/models"], "none")  # can't be read here
    (repo / "python_model" / "1").mkdir(parents=True)
    (repo / "python_model" / "1" / "model.py").write_text(AUTO_COMPLETED)
    assert needs_auto_complete([repo], "none")  # no config.pbtxt
    (repo / "python_model" / "config.pbtxt").write_text('name: "python_model"\nbackend: "python"\n')
    assert needs_auto_complete([repo], "none")  # a config, but it defines auto_complete_config
    (repo / "python_model" / "1" / "model.py").write_text("class TritonPythonModel:\n    pass\n")
    assert not needs_auto_complete([repo], "none")


def test_a_backend_file_loads_no_framework_and_no_launcher():
    backend = Path(__file__).resolve().parents[1] / "src" / "tritonforge" / "server" / "backends"
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        import numpy  # in every stub (Triton's utilities import it)
        for kind in ("onnxruntime", "pytorch"):
            path = {str(backend)!r} + f"/{{kind}}/model.py"
            spec = importlib.util.spec_from_file_location("model_" + kind, path)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        assert "tritonforge.server.runtime" in sys.modules
        # the framework loads when a model is initialized; the server's launcher and the client never
        unwanted = [m for m in ("onnxruntime", "torch", "subprocess", "urllib.request", "ssl", "yaml",
                                "tritonforge.server.embedded", "tritonforge.config", "tritonforge.client")
                    if m in sys.modules]
        assert not unwanted, f"a backend's model.py loaded {{unwanted}}"
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
