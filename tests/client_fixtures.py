"""A repository and several embedded servers for the client tests (module-scoped fixtures import these).

Models, each tiny and real:
    mlp          x[N, 8] FP32 -> probs[N, 3]               (the shared conftest one, batched)
    scale        x[N, 4] FP32 -> y = x * v, versions 1 and 2 both served (which side answered is visible)
    broken       x[N, 8] FP32 -> probs[N, 3] that always fails at run time (a Gather out of range)
    echo_str     s[N, 1] BYTES -> s (strings round trip; a Python model)
    sleepy       x[N, 4] FP32 -> x after 0.4 s (a Python model, for deadlines)
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import inspect
import textwrap
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import CollectorRegistry

import tiny_models
from tiny_models import spec as _spec
from tritonforge.client import AsyncClient, Client
from tritonforge.config import DataType, DynamicBatching, ModelConfig, VersionPolicy
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer

SLEEP_S = 0.4


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def scale_onnx(path: Path, factor: float) -> Path:
    k = numpy_helper.from_array(np.array(factor, dtype=np.float32), "k")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[k],
    )
    return _save(graph, path)


def broken_onnx(path: Path) -> Path:
    """Same signature as mlp; every run fails (Gather index 99 of a 3-row table)."""
    table = numpy_helper.from_array(np.zeros((3, 3), dtype=np.float32), "table")
    idx = numpy_helper.from_array(np.array([99], dtype=np.int64), "idx")
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=1, noop_with_empty_axes=0),
        helper.make_node("Gather", ["table", "idx"], ["row"], axis=0),
        helper.make_node("Mul", ["s", "row"], ["probs"]),
    ]
    graph = helper.make_graph(
        nodes,
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        initializer=[table, idx],
    )
    return _save(graph, path)


SLEEPY_PY = textwrap.dedent(f"""
    import time
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            time.sleep({SLEEP_S})
            out = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", x)]))
            return out
""")


ECHO_PY = textwrap.dedent("""
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            out = []
            for request in requests:
                s = pb_utils.get_input_tensor_by_name(request, "s").as_numpy()
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("out", s.astype(np.object_))]))
            return out
""")


def build_client_repository(root: Path) -> Path:
    work, repo = root / "_src", root / "repo"
    add_model(repo, "mlp", tiny_models.mlp_onnx(work / "mlp.onnx"), max_batch_size=32, max_queue_delay_us=500)
    scale = ModelConfig(
        name="scale",
        platform="onnxruntime_onnx",
        max_batch_size=16,
        inputs=(_spec("x", DataType.FP32, (4,)),),
        outputs=(_spec("y", DataType.FP32, (4,)),),
        version_policy=VersionPolicy(kind="all"),
        dynamic_batching=DynamicBatching(),
    )
    add_model(repo, "scale", scale_onnx(work / "scale1.onnx", 1.0), scale, version=1)
    add_model(repo, "scale", scale_onnx(work / "scale2.onnx", 2.0), scale, version=2)
    broken = ModelConfig(
        name="broken",
        platform="onnxruntime_onnx",
        max_batch_size=32,
        inputs=(_spec("x", DataType.FP32, (8,)),),
        outputs=(_spec("probs", DataType.FP32, (3,)),),
    )
    add_model(repo, "broken", broken_onnx(work / "broken.onnx"), broken)
    echo = ModelConfig(
        name="echo_str",
        backend="python",
        max_batch_size=8,
        inputs=(_spec("s", DataType.STRING, (1,)),),
        outputs=(_spec("out", DataType.STRING, (1,)),),
    )
    tiny_models.python_model(repo, work, echo, ECHO_PY)
    sleepy = ModelConfig(
        name="sleepy",
        backend="python",
        max_batch_size=8,
        inputs=(_spec("x", DataType.FP32, (4,)),),
        outputs=(_spec("y", DataType.FP32, (4,)),),
    )
    tiny_models.python_model(repo, work, sleepy, SLEEPY_PY)
    add_model(repo, "dtypes", tiny_models.dtypes_onnx(work / "dtypes.onnx"), tiny_models.dtypes_config())
    return repo


@contextlib.contextmanager
def servers(repo: Path, count: int, **options: object) -> Iterator[list[EmbeddedServer]]:
    """``count`` servers on one repository, started in parallel, all stopped at the end."""
    started: list[EmbeddedServer] = [EmbeddedServer(repo, **options) for _ in range(count)]  # type: ignore[arg-type]
    try:
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(EmbeddedServer.start, started))
        yield started
    finally:
        stop_all(started)


def start_all(servers: list[EmbeddedServer]) -> list[EmbeddedServer]:
    """Start ``servers`` at once; if one fails, stop them all and raise."""
    try:
        with ThreadPoolExecutor(max(1, len(servers))) as pool:
            list(pool.map(EmbeddedServer.start, servers))
    except BaseException:
        stop_all(servers)
        raise
    return servers


def stop_all(running: list[EmbeddedServer]) -> None:
    with ThreadPoolExecutor(max(1, len(running))) as pool:
        list(pool.map(EmbeddedServer.stop, running))


def leftover_shm(prefix: str = "tfc_") -> list[str]:
    return glob.glob(f"/dev/shm/{prefix}*")


# -- one test, both faces ---------------------------------------------------------------------------------


class BlockingAsyncClient:
    """An :class:`AsyncClient` driven through blocking calls on an event loop of its own, so that one test
    body covers both faces: every coroutine method is run to completion, everything else is passed through.
    """

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.loop = asyncio.new_event_loop()  # not asyncio.Runner: Python 3.10 has none
        self.closed = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if inspect.iscoroutinefunction(attr):
            return lambda *args, **kwargs: self.run(attr(*args, **kwargs))
        return attr

    def run(self, coro: Any) -> Any:
        """Run a coroutine on the client's loop (after close: on a loop of its own)."""
        if self.closed:
            return asyncio.run(coro)
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.loop.run_until_complete(self.client.aclose())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()
            self.closed = True

    def __enter__(self) -> BlockingAsyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


FACES = ("sync", "async")


def make_client(face: str, urls: str | list[str], **options: Any) -> Any:
    """A :class:`Client` (``face="sync"``) or a blocking-driven :class:`AsyncClient` (``"async"``)."""
    options.setdefault("registry", CollectorRegistry())
    if face == "sync":
        return Client(urls, **options)
    return BlockingAsyncClient(AsyncClient(urls, **options))


@contextlib.asynccontextmanager
async def silent_http2_server() -> AsyncIterator[str]:
    """A server that answers a connection with an empty SETTINGS frame and then never again: its address."""
    peers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer)
        writer.write(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # an empty SETTINGS frame, then nothing
        await reader.read(-1)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for writer in peers:
            writer.close()
            await writer.wait_closed()
        server.close()
        await server.wait_closed()
