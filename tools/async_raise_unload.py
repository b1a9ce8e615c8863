"""Does a Python model whose execute raises ever finish unloading once it is replaced? (Triton 2.51)

A two-instance Python model ``m`` is called non-stop by three threads while it is reloaded with a new
version, N times; after each reload the old version must leave ``UNLOADING`` within 8 s. Kinds of
``execute``: ``async-raise`` (a coroutine that raises), ``sync-raise`` (a plain one that raises),
``async-errors`` (a coroutine answering error responses). Seen here: both kinds that raise leave versions
stuck (a coroutine more often), because a request of an execute that raises is now and then never answered
nor released (its caller waits for its deadline); error responses never did. This is
why no Python model tritonforge runs or generates raises from execute (tritonforge.error_accounting).

    python tools/async_raise_unload.py async-raise 12
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from tritonforge.server import EmbeddedServer

EXECUTES = {
    "async-raise": "    async def execute(self, requests):\n"
    "        await asyncio.sleep(0.001)\n"
    "        raise pb_utils.TritonModelException('boom')\n",
    "sync-raise": "    def execute(self, requests):\n        raise pb_utils.TritonModelException('boom')\n",
    "async-errors": "    async def execute(self, requests):\n"
    "        await asyncio.sleep(0.001)\n"
    "        return [pb_utils.InferenceResponse(error=pb_utils.TritonError('boom')) for _ in requests]\n",
}


def _config(version: int) -> str:
    return (
        'name: "m"\nbackend: "python"\nmax_batch_size: 8\n'
        'input [{ name: "x" data_type: TYPE_FP32 dims: [2] }]\n'
        'output [{ name: "y" data_type: TYPE_FP32 dims: [2] }]\n'
        f"version_policy {{ specific {{ versions: [{version}] }} }}\n"
        "instance_group [{ count: 2 kind: KIND_CPU }]\ndynamic_batching {}\n"
    )


def run(kind: str, reloads: int) -> list[int]:
    """The versions left UNLOADING (out of ``reloads``)."""
    root = Path(tempfile.mkdtemp(prefix="async-raise-"))
    try:
        code = (
            "import asyncio\nimport triton_python_backend_utils as pb_utils\n\n\nclass TritonPythonModel:\n"
        )
        for version in range(1, reloads + 2):
            (root / "m" / str(version)).mkdir(parents=True)
            (root / "m" / str(version) / "model.py").write_text(code + EXECUTES[kind])
        (root / "m" / "config.pbtxt").write_text(_config(1))
        stuck: list[int] = []
        with EmbeddedServer(root, model_control="explicit", load_models=["m"]) as server:
            stop = threading.Event()

            def call() -> None:
                client = grpcclient.InferenceServerClient(server.grpc_url)
                x = grpcclient.InferInput("x", [1, 2], "FP32")
                x.set_data_from_numpy(np.zeros((1, 2), np.float32))
                while not stop.is_set():
                    with contextlib.suppress(Exception):  # every call fails by design
                        client.infer("m", [x], client_timeout=10)
                    time.sleep(0.005)
                client.close()

            threads = [threading.Thread(target=call) for _ in range(3)]
            for t in threads:
                t.start()
            for version in range(1, reloads + 1):
                time.sleep(1.5)
                (root / "m" / "config.pbtxt").write_text(_config(version + 1))
                server.load_model("m")
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline:
                    states = {
                        (m["name"], m.get("version")): m.get("state") for m in server.repository_index()
                    }
                    if states.get(("m", str(version))) == "UNAVAILABLE":
                        break
                    time.sleep(0.25)
                else:
                    stuck.append(version)
            stop.set()
            for t in threads:
                t.join()
            time.sleep(30)  # slow is not stuck: what is still UNLOADING 30 s after the last call stays so
            states = {(m["name"], m.get("version")): m.get("state") for m in server.repository_index()}
            return [v for v in stuck if states.get(("m", str(v))) == "UNLOADING"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in EXECUTES or not argv[1].isdigit():
        print(f"usage: python tools/async_raise_unload.py {{{'|'.join(EXECUTES)}}} RELOADS", file=sys.stderr)
        return 2
    stuck = run(argv[0], int(argv[1]))
    print(f"{argv[0]}: {len(stuck)} of {argv[1]} replaced versions left UNLOADING {stuck}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
