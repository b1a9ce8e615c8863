"""What the client's hooks see and what reaches Triton: request ids (the caller's or the client's own) sent
as the request's ``id``, the call's tensors on its ``request`` event, hooks that raise never failing a call,
and the traffic sampler as a plain hook. Each test runs on both faces (``face``: the sync ``Client`` and the
``AsyncClient`` driven through blocking calls, tests/client_fixtures.py).

One server for the module, with ``log_verbose=1`` (Triton then logs each request with its id) and a Python
model, ``whoami``, that answers every row with the id Triton's request carries.
"""

from __future__ import annotations

import io
import json
import textwrap
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import client_fixtures as cf
import tiny_models
from tiny_models import spec as _spec
from tritonforge.client import ClientEvent, Fallback, RetryPolicy, Shadow
from tritonforge.config import DataType, DynamicBatching, ModelConfig
from tritonforge.errors import InvalidRequestError, ModelNotFoundError
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer

X = np.arange(32, dtype=np.float32).reshape(4, 8) / 32

WHOAMI_PY = textwrap.dedent("""
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            out = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
                ids = np.array([[request.request_id().encode()]] * x.shape[0], dtype=np.object_)
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("id", ids)]))
            return out
""")


@pytest.fixture(scope="module")
def verbose_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    root = tmp_path_factory.mktemp("events")
    repo, work = root / "repo", root / "_src"
    add_model(repo, "mlp", tiny_models.mlp_onnx(work / "mlp.onnx"), max_batch_size=32, max_queue_delay_us=500)
    whoami = ModelConfig(
        name="whoami",
        backend="python",
        max_batch_size=32,
        inputs=(_spec("x", DataType.FP32, (8,)),),
        outputs=(_spec("id", DataType.STRING, (1,)),),
        dynamic_batching=DynamicBatching(),  # so the AsyncClient merges concurrent calls to it
    )
    tiny_models.python_model(repo, work, whoami, WHOAMI_PY)
    with EmbeddedServer(repo, log_verbose=1) as server:
        yield server


@pytest.fixture(params=cf.FACES)
def face(request: pytest.FixtureRequest) -> str:
    return request.param


def _ids(out: dict[str, np.ndarray]) -> set[str]:
    """The ids Triton's request carried, as the whoami model saw them (a merged request: several)."""
    return {i for row in out["id"].reshape(-1) for i in row.decode().split(",")}


# -- request ids -----------------------------------------------------------------------------------------


def test_client_sends_the_callers_request_id_to_triton_and_puts_it_on_the_event(
    face: str, verbose_server: EmbeddedServer
) -> None:
    events: list[ClientEvent] = []
    with cf.make_client(face, verbose_server.grpc_url, hooks=[events.append]) as c:
        out = c.infer("whoami", {"x": X}, request_id="order-4711")
        c.infer("mlp", {"x": X}, request_id="mlp-call-0815")
    assert [r.decode() for r in out["id"].reshape(-1)] == ["order-4711"] * 4
    assert [(e.kind, e.model, e.request_id) for e in events] == [
        ("request", "whoami", "order-4711"),
        ("request", "mlp", "mlp-call-0815"),
    ]
    # Triton's own log names the request by the same id
    assert "[request id: mlp-call-0815]" in verbose_server.log


def test_client_gives_each_call_its_own_request_id_when_the_caller_gives_none(
    face: str, verbose_server: EmbeddedServer
) -> None:
    events: list[ClientEvent] = []
    with cf.make_client(face, verbose_server.grpc_url, hooks=[events.append]) as c:
        seen = [_ids(c.infer("whoami", {"x": X})) for _ in range(3)]
    ids = [e.request_id for e in events]
    assert len(set(ids)) == 3 and all(isinstance(i, str) and i for i in ids)
    assert seen == [{i} for i in ids]  # what Triton got is what the hooks saw


def test_client_keeps_the_request_id_across_a_fallback(face: str, verbose_server: EmbeddedServer) -> None:
    events: list[ClientEvent] = []
    with cf.make_client(
        face, verbose_server.grpc_url, fallbacks={"nope": Fallback("whoami")}, hooks=[events.append]
    ) as c:
        out = c.infer("nope", {"x": X}, request_id="fb-1")
    assert _ids(out) == {"fb-1"}
    assert [(e.kind, e.request_id) for e in events] == [("fallback", "fb-1"), ("request", "fb-1")]


def test_infer_many_numbers_each_requests_id_after_the_given_prefix(
    face: str, verbose_server: EmbeddedServer
) -> None:
    with cf.make_client(face, verbose_server.grpc_url) as c:
        c.infer("whoami", {"x": X[:1]})  # metadata and config known: the async face merges from now on
        outs = c.infer_many(
            "whoami", [{"x": X[i : i + 1]} for i in range(4)], request_id="job", concurrency=4
        )
    for i, out in enumerate(outs):
        assert f"job-{i}" in _ids(out)
    if face == "async":  # concurrent calls went out merged: one request whose id names every call in it
        assert any(len(_ids(out)) > 1 for out in outs)


def test_a_shadow_call_is_sent_with_the_calls_request_id_and_a_shadow_suffix(
    face: str, verbose_server: EmbeddedServer
) -> None:
    events: list[ClientEvent] = []
    with cf.make_client(
        face, verbose_server.grpc_url, shadows={"mlp": Shadow("whoami")}, hooks=[events.append]
    ) as c:
        c.infer("mlp", {"x": X}, request_id="mirror-7")
        c.wait_shadows()
    shadow = next(e for e in events if e.kind == "shadow")
    assert shadow.request_id == "mirror-7.shadow"
    assert shadow.outputs is not None and _ids(dict(shadow.outputs)) == {"mirror-7.shadow"}


def test_client_raises_invalid_request_error_for_a_request_id_that_is_not_a_non_empty_string(
    face: str, verbose_server: EmbeddedServer
) -> None:
    with cf.make_client(face, verbose_server.grpc_url) as c:
        for bad in ("", 17, b"id"):
            with pytest.raises(InvalidRequestError, match="request_id"):
                c.infer("mlp", {"x": X}, request_id=bad)
        with pytest.raises(InvalidRequestError, match="request_id"):
            c.infer_many("mlp", [{"x": X}], request_id="")


def test_json_log_hook_logs_the_request_id_triton_got(face: str, verbose_server: EmbeddedServer) -> None:
    from tritonforge.observe.logs import JsonLogHook

    stream = io.StringIO()
    with cf.make_client(face, verbose_server.grpc_url, hooks=[JsonLogHook(stream)]) as c:
        given = c.infer("whoami", {"x": X}, request_id="log-me")
        made = c.infer("whoami", {"x": X})
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["log-me", _ids(made).pop()]
    assert _ids(given) == {"log-me"}


# -- tensors on events -----------------------------------------------------------------------------------


def test_request_events_carry_the_calls_input_and_output_arrays_not_copies(
    face: str, verbose_server: EmbeddedServer
) -> None:
    events: list[ClientEvent] = []
    with cf.make_client(face, verbose_server.grpc_url, hooks=[events.append], retry=RetryPolicy.none()) as c:
        out = c.infer("mlp", {"x": X})
        with pytest.raises(ModelNotFoundError):
            c.infer("nope", {"x": X})
    ok, failed = events
    assert ok.inputs is not None and ok.inputs["x"] is X
    assert ok.outputs is not None and ok.outputs["probs"] is out["probs"]
    assert failed.inputs is not None and failed.inputs["x"] is X and failed.outputs is None
    # events stay comparable, hashable and short to print with arrays on them
    assert ok == replace(ok) and hash(ok) == hash(replace(ok)) and "probs" not in repr(ok)


def test_retry_and_fallback_events_carry_no_tensors(face: str, verbose_server: EmbeddedServer) -> None:
    events: list[ClientEvent] = []
    with cf.make_client(
        face, verbose_server.grpc_url, fallbacks={"nope": Fallback("mlp")}, hooks=[events.append]
    ) as c:
        c.infer("nope", {"x": X})
    fallback, request = events
    assert fallback.kind == "fallback" and fallback.inputs is None and fallback.outputs is None
    assert request.inputs is not None and request.outputs is not None


# -- hooks that raise ------------------------------------------------------------------------------------


def test_a_raising_hook_never_fails_a_call_and_is_counted_and_warned_about_once(
    face: str, verbose_server: EmbeddedServer
) -> None:
    def broken_hook(event: ClientEvent) -> None:
        raise KeyError("no such column")

    events: list[ClientEvent] = []
    with cf.make_client(face, verbose_server.grpc_url, hooks=[broken_hook, events.append]) as c:
        with pytest.warns(RuntimeWarning, match="broken_hook raised KeyError") as caught:
            outs = [c.infer("mlp", {"x": X}) for _ in range(3)]
        assert c.hook_errors == 3
    assert all(out["probs"].shape == (4, 3) for out in outs)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert len(events) == 3  # the hooks after the broken one still get every event


def test_a_raising_hook_never_fails_a_call_even_when_warnings_are_errors(
    face: str, verbose_server: EmbeddedServer
) -> None:
    def broken_hook(event: ClientEvent) -> None:
        raise ValueError("bad")

    with cf.make_client(face, verbose_server.grpc_url, hooks=[broken_hook]) as c, warnings.catch_warnings():
        warnings.simplefilter("error")
        out = c.infer("mlp", {"x": X})
        assert c.hook_errors == 1
    assert out["probs"].shape == (4, 3)


# -- the sampler as a plain hook -------------------------------------------------------------------------


def test_sampler_as_a_client_hook_keeps_copies_of_the_calls_tensors(
    face: str, verbose_server: EmbeddedServer, tmp_path: Path
) -> None:
    from tritonforge.observe.sampler import Sampler, SampleStore

    x = X.copy()
    with Sampler(tmp_path, share=1.0, seed=0) as sampler:
        with cf.make_client(face, verbose_server.grpc_url, hooks=[sampler]) as c:
            outs = [c.infer("mlp", {"x": x}) for _ in range(3)]
            x[:] = -1.0  # the caller reuses its buffer: what was kept must not change
        sampler.flush()
    data = SampleStore(tmp_path).load("mlp")
    np.testing.assert_array_equal(data["x"], np.concatenate([X] * 3))
    np.testing.assert_allclose(data["probs"], np.concatenate([o["probs"] for o in outs]), rtol=1e-6)
    assert sampler.stats.kept == 3 and sampler.stats.errors == 0


def test_sampler_wrap_still_works_by_adding_the_hook_once(
    face: str, verbose_server: EmbeddedServer, tmp_path: Path
) -> None:
    from tritonforge.observe.sampler import Sampler

    with (
        Sampler(tmp_path, share=1.0, seed=0) as sampler,
        cf.make_client(face, verbose_server.grpc_url) as raw,
    ):
        with pytest.warns(DeprecationWarning, match="add_hook"):
            client = sampler.wrap(raw)
            assert sampler.wrap(client) is raw
        client.infer("mlp", {"x": X})
        assert [h for h in raw.hooks if h is sampler] == [sampler]
    assert sampler.stats.seen == 1 and sampler.stats.kept == 1


def test_sampler_wrap_raises_type_error_for_an_object_without_hooks(tmp_path: Path) -> None:
    from tritonforge.observe.sampler import Sampler

    with (
        Sampler(tmp_path) as sampler,
        pytest.warns(DeprecationWarning),
        pytest.raises(TypeError, match="hooks"),
    ):
        sampler.wrap(object())
