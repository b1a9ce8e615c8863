"""The client finds every replica behind a ``dns:///`` name: real servers on 127.0.0.1, .2 and .3 appear and
disappear (as pods behind a headless Service do) while both faces run steady load, and no call fails."""

from __future__ import annotations

import asyncio
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tiny_models
from client_fixtures import FACES, make_client, stop_all
from tiny_models import spec
from tritonforge.client import ClientEvent, Discovery, DnsTarget
from tritonforge.config import DataType, ModelConfig
from tritonforge.errors import ClientError, Unavailable
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer

NAME = "dns:///triton-headless.ns.svc.cluster.local:8001"
REFRESH_S = 0.1
X = {"x": np.ones((1, 8), np.float32)}
#: answers once the file RELEASE exists (the test creates it when it has seen what it waits for), at the
#: latest after 60 s: a call stays in flight as long as the test needs, however slow the machine
SLOW_PY = textwrap.dedent("""
    import os
    import time
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            deadline = time.monotonic() + 60
            while not os.path.exists(RELEASE) and time.monotonic() < deadline:
                time.sleep(0.01)
            out = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", x)]))
            return out
""")


def release(repo: Path) -> Path:
    """The file whose existence lets the slow model answer."""
    return repo.parent / "release"


@pytest.fixture(scope="module")
def mlp_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dns")
    repo = root / "repo"
    add_model(repo, "mlp", tiny_models.mlp_onnx(root / "mlp.onnx"), max_batch_size=8)
    slow_file = root / "slow" / "model.py"
    slow_file.parent.mkdir()
    slow_file.write_text(SLOW_PY.replace("RELEASE", repr(str(release(repo)))))
    slow = ModelConfig(
        name="slow",
        backend="python",
        max_batch_size=0,
        inputs=(spec("x", DataType.FP32, (1,)),),
        outputs=(spec("y", DataType.FP32, (1,)),),
    )
    add_model(repo, "slow", slow_file, slow)
    return repo


@pytest.fixture(scope="module")
def replicas(mlp_repo: Path) -> Iterator[list[EmbeddedServer]]:
    """Two replicas that keep running, on 127.0.0.1 and 127.0.0.2 (the third one each test starts)."""
    running = [EmbeddedServer(mlp_repo, host=f"127.0.0.{i}") for i in (1, 2)]
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(EmbeddedServer.start, running))
        yield running
    finally:
        stop_all(running)


class Listing:
    """What the name resolves to right now (the test's stand-in for the cluster's DNS)."""

    def __init__(self, *urls: str) -> None:
        self.urls = frozenset(urls)
        self.lookups = 0

    def set(self, *urls: str) -> None:
        self.urls = frozenset(urls)

    def __call__(self, target: DnsTarget) -> frozenset[str]:
        self.lookups += 1
        return self.urls


class Load:
    """Steady concurrent calls through either face, counting which server answered each and every failure."""

    def __init__(self, client: Any, face: str, workers: int = 3) -> None:
        self.client, self.face, self.workers = client, face, workers
        self.answered: Counter[str] = Counter()
        self.failures: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        client.add_hook(self._record)

    def _record(self, event: ClientEvent) -> None:
        if event.kind == "request" and event.error is None and event.endpoint is not None:
            with self._lock:
                self.answered[event.endpoint] += 1

    def _call_sync(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.infer("mlp", X)
            except ClientError as exc:
                self.failures.append(exc)

    async def _call_async(self) -> None:
        while not self._stop.is_set():
            try:
                await self.client.client.infer("mlp", X)
            except ClientError as exc:
                self.failures.append(exc)

    async def _all_async(self) -> None:
        await asyncio.gather(*(self._call_async() for _ in range(self.workers)))

    def __enter__(self) -> Load:
        if self.face == "sync":
            self._threads = [threading.Thread(target=self._call_sync) for _ in range(self.workers)]
        else:  # one event loop, in a thread of its own, running every caller and the re-resolution task
            self._threads = [threading.Thread(target=self.client.run, args=(self._all_async(),))]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def count(self, url: str) -> int:
        with self._lock:
            return self.answered[url]

    def wait_for_answers(self, url: str, more: int = 15, timeout_s: float = 60.0) -> None:
        """Until ``url`` has answered ``more`` calls than now (it is being picked)."""
        target = self.count(url) + more
        wait_until(lambda: self.count(url) >= target, f"{url} to answer {more} calls", timeout_s)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def picked(client: Any) -> set[str]:
    return {status.url for status in client.endpoints}


@pytest.mark.slow
@pytest.mark.parametrize("face", FACES)
def test_client_follows_replicas_that_appear_and_disappear_under_load_and_no_call_fails(
    face: str, mlp_repo: Path, replicas: list[EmbeddedServer]
) -> None:
    one, two = (server.grpc_url for server in replicas)
    listing = Listing(one)
    client = make_client(face, NAME, discovery=Discovery(refresh_s=REFRESH_S, resolver=listing), deadline=30)
    try:
        with Load(client, face) as load:
            load.wait_for_answers(one)
            third_pod = EmbeddedServer(
                mlp_repo, host="127.0.0.3", model_control="explicit", load_models=["mlp"]
            )
            with third_pod as third:  # a pod starts, becomes ready ...
                three = third.grpc_url
                listing.set(one, three)  # ... and the name lists it
                load.wait_for_answers(three)
                listing.set(one, two, three)
                load.wait_for_answers(two)

                listing.set(two, three)  # scale-in: one is no longer listed (its server runs on)
                wait_until(lambda: one not in picked(client), f"{one} to leave the pool")
                # its calls in flight finished and its channel is closed: the client holds it no more
                wait_until(lambda: one not in {e.url for e in client._pool.every_endpoint()}, f"{one} closed")
                left_at = load.count(one)
                load.wait_for_answers(two)
                load.wait_for_answers(three)
                assert load.count(one) == left_at  # a removed replica gets no new call

                # a pod terminates: unlisted, then stopped once clients have left it (its preStop sleep)
                listing.set(two)
                wait_until(lambda: three not in picked(client), f"{three} to leave the pool")
                load.wait_for_answers(two)
            load.wait_for_answers(two)  # and on, after it stopped
            assert picked(client) == {two}

            listing.set(one, two)  # a replica comes back
            load.wait_for_answers(one)
            assert picked(client) == {one, two}
        assert load.failures == []
        assert listing.lookups > 10  # re-resolved all along, not once
    finally:
        client.close()


@pytest.mark.parametrize("face", FACES)
def test_a_call_in_flight_on_a_replica_that_leaves_the_name_gets_its_answer(
    face: str, mlp_repo: Path, replicas: list[EmbeddedServer]
) -> None:
    one, two = (server.grpc_url for server in replicas)
    release(mlp_repo).unlink(missing_ok=True)
    listing = Listing(one)
    client = make_client(face, NAME, discovery=Discovery(refresh_s=REFRESH_S, resolver=listing))
    seen: dict[str, Any] = {}

    def outstanding_on_one() -> int:
        return sum(s.outstanding for s in client.endpoints if s.url == one)

    def leave_while_in_flight() -> None:  # runs while the slow call is in flight on `one`
        try:
            wait_until(lambda: outstanding_on_one() == 1, f"the slow call to be in flight on {one}")
            listing.set(two)
            wait_until(lambda: picked(client) == {two}, f"{one} to leave the pool")
            seen["draining"] = [(e.url, e.outstanding) for e in client._pool.draining]
        finally:
            release(mlp_repo).touch()  # the slow call may answer now

    x = {"x": np.array([7.0], np.float32)}
    try:
        if face == "sync":
            leaving = threading.Thread(target=leave_while_in_flight)
            leaving.start()
            out = client.infer("slow", x)
            leaving.join()
        else:  # the flip runs in a thread while the client's loop drives the call

            async def call_while_leaving() -> Any:
                flip = asyncio.create_task(asyncio.to_thread(leave_while_in_flight))
                answer = await client.client.infer("slow", x)
                await flip
                return answer

            out = client.run(call_while_leaving())
        assert seen["draining"] == [(one, 1)]  # left the pick set, its call still counted in flight
        np.testing.assert_array_equal(out["y"], x["x"])  # ... and answered by the server that left
        closed = lambda: client._pool.every_endpoint() == client._pool.endpoints  # noqa: E731
        if face == "sync":
            wait_until(closed, f"{one} closed")
        else:  # the re-resolution task runs on the client's loop: let it run until then

            async def until_closed() -> None:
                while not closed():
                    await asyncio.sleep(0.02)

            client.run(asyncio.wait_for(until_closed(), 60))
        assert picked(client) == {two}
    finally:
        client.close()
        release(mlp_repo).unlink(missing_ok=True)


@pytest.mark.parametrize("face", FACES)
def test_client_resolves_dns_urls_beside_plain_ones_with_the_system_resolver(
    face: str, replicas: list[EmbeddedServer]
) -> None:
    one, two = replicas
    with make_client(face, [one.grpc_url, f"dns:///127.0.0.2:{two.grpc_port}"]) as client:
        assert picked(client) == {one.grpc_url, two.grpc_url}
        outs = [client.infer("mlp", X)["probs"] for _ in range(4)]
        assert all(out.shape == (1, 3) for out in outs)


@pytest.mark.parametrize("face", FACES)
def test_client_raises_unavailable_naming_the_name_when_the_first_lookup_fails(face: str) -> None:
    def down(target: DnsTarget) -> frozenset[str]:
        raise Unavailable(f"no such host {target.host}", endpoint=str(target))

    with pytest.raises(Unavailable) as caught:
        make_client(face, NAME, discovery=Discovery(resolver=down))
    assert caught.value.endpoint == NAME


@pytest.mark.parametrize("face", FACES)
def test_client_raises_value_error_for_a_dns_url_naming_a_dns_server(face: str) -> None:
    with pytest.raises(ValueError, match="three slashes"):
        make_client(face, "dns://8.8.8.8/triton:8001")


@pytest.mark.parametrize("face", FACES)
def test_client_close_stops_re_resolving_and_leaves_no_thread_or_task_behind(face: str) -> None:
    listing = Listing("127.0.0.9:1")
    client = make_client(face, NAME, discovery=Discovery(refresh_s=0.01, resolver=listing))
    if face == "sync":
        wait_until(lambda: listing.lookups >= 3, "three look-ups")
        thread = client._discovery_thread
        assert thread is not None and thread.is_alive() and thread.daemon
    else:  # the re-resolution task lives on the client's loop, which runs while the client is in use

        async def run_a_while() -> asyncio.Task[None]:
            client.client._open()
            while listing.lookups < 3:
                await asyncio.sleep(0.01)
            return client.client._discovery_task

        task = client.run(run_a_while())
        assert task is not None and not task.done()
    client.close()
    if face == "sync":
        assert not thread.is_alive()
    else:
        assert task.done()
    stopped_at = listing.lookups
    time.sleep(0.1)
    assert listing.lookups == stopped_at
