"""What a sweep drives: one model on one server, its request payload, and its statistics source.

The sweep itself only needs ``send()``; this module builds it (and the statistics source) for a model
on a Triton server at ``host:port``, with inputs generated from the model's config or given by the caller.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tritonforge.errors import ModelNotFoundError, Unavailable
from tritonforge.loadtest.stats import TritonStats, composing_models
from tritonforge.loadtest.sweep import Send

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2 as pb2

    from tritonforge.client.policies import Auth

__all__ = ["Sender", "Target", "inputs_from_config", "open_target"]

Sender = Literal["tritonforge", "tritonclient"]


@dataclasses.dataclass
class Target:
    url: str
    model: str
    inputs: dict[str, np.ndarray]
    send: Send
    stats: TritonStats
    client: Any

    @property
    def models(self) -> tuple[str, ...]:
        return self.stats.models


def inputs_from_config(config: pb2.ModelConfig, *, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """One request's inputs for a model config as Triton returns it (``model_config_pb2.ModelConfig``).

    Built through :func:`tritonforge.repository.sample_inputs`, from the config's inputs only (the server
    adds fields to the config that our ModelConfig does not model).
    """
    from tritonclient.grpc import model_config_pb2

    from tritonforge.config import ModelConfig
    from tritonforge.repository import sample_inputs

    slim = model_config_pb2.ModelConfig(
        name=config.name, backend="python", max_batch_size=config.max_batch_size
    )
    slim.input.extend(config.input)
    slim.output.extend(config.output)
    return dict(sample_inputs(ModelConfig.from_proto(slim), batch=batch, seed=seed))


def _infer_inputs(arrays: Mapping[str, np.ndarray]) -> list[Any]:
    """tritonclient's ``InferInput`` per array; BYTES tensors serialized by the client's own
    :func:`~tritonforge.client.wire.bytes_tensor`, as every other sender here does.

    Raises:
        InvalidRequestError: a BYTES element that is not bytes, ``np.bytes_``, bytearray or str.
    """
    from tritonclient.grpc import InferInput
    from tritonclient.utils import np_to_triton_dtype

    from tritonforge.client.wire import bytes_tensor

    items = []
    for name, array in arrays.items():
        datatype = np_to_triton_dtype(array.dtype)
        item = InferInput(name, list(array.shape), datatype)
        if datatype == "BYTES":
            # tritonclient's set_data_from_numpy sends np.bytes_(b"xy") as b"b'xy'" and has no public
            # setter for a tensor's serialized bytes: its request is built from this attribute
            item._raw_content = bytes_tensor(array)
        else:
            item.set_data_from_numpy(array)
        items.append(item)
    return items


async def check_model(client: Any, url: str, model: str) -> None:
    """Raise ModelNotFoundError (listing what is there) unless ``model`` is ready on the server."""
    try:
        ready = await client.is_model_ready(model)
        if ready:
            return
        index = await client.get_model_repository_index()
    except Exception as exc:
        raise Unavailable(f"the server at {url} did not answer ({exc})", endpoint=url, model=model) from exc
    names = sorted({m.name for m in index.models if m.state == "READY"})
    raise ModelNotFoundError(
        f"model '{model}' is not ready on {url}; ready models: {', '.join(names) or 'none'}",
        model=model,
        endpoint=url,
    )


@contextlib.asynccontextmanager
async def open_target(
    url: str,
    model: str,
    *,
    inputs: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
    batch: int = 1,
    version: str = "",
    timeout_s: float = 30.0,
    client: Sender = "tritonforge",
    auth: Auth | None = None,
) -> AsyncIterator[Target]:
    """An asyncio gRPC connection to ``model`` at ``url`` and a ``send()`` for one request.

    ``inputs``: one request's arrays, or several (real samples; requests cycle through them). Without
    them, inputs are generated from the model's config (``batch`` rows).
    ``client``: what sends the requests — ``"tritonforge"`` (:class:`tritonforge.AsyncClient`, no
    retries, so failures are seen) or ``"tritonclient"`` (raw ``tritonclient.grpc.aio``, the least
    overhead per request). Statistics always come through raw tritonclient (Triton's protobuf counters).
    ``auth``: the keys and TLS a restricted server asks for (:class:`tritonforge.client.Auth`), for both.

    Raises:
        ModelNotFoundError: the model is not ready on the server (the message lists those that are).
        Unavailable: the server did not answer.
    """
    from tritonforge.client.interop import tritonclient_for

    if client not in ("tritonforge", "tritonclient"):
        raise ValueError(f"client must be 'tritonforge' or 'tritonclient', not {client!r}")
    raw = tritonclient_for(url, auth, aio=True)
    ours: Any = None
    try:
        await check_model(raw, url, model)
        config = (await raw.get_model_config(model)).config
        if inputs is None:
            payloads = [inputs_from_config(config, batch=batch)]
        elif isinstance(inputs, Mapping):
            payloads = [dict(inputs)]
        else:
            payloads = [dict(p) for p in inputs]
        if not payloads:
            raise ValueError("inputs: give at least one request's arrays")
        arrays = payloads[0]
        send: Send
        if client == "tritonclient":
            requests = itertools.cycle([_infer_inputs(p) for p in payloads])

            async def send() -> None:
                await raw.infer(model, next(requests), model_version=version, client_timeout=timeout_s)

        else:
            from tritonforge.client import AsyncClient, RetryPolicy

            # a load generator sends the requests it is asked to: no retries, no client-side batching
            ours = AsyncClient(
                url, retry=RetryPolicy.none(), metrics=False, shared_memory="off", coalesce=False, auth=auth
            )
            cycle = itertools.cycle(payloads)
            pinned = version or None

            async def send() -> None:
                await ours.infer(model, next(cycle), version=pinned, timeout_s=timeout_s)

        stats = TritonStats(raw, await composing_models(raw, model))
        yield Target(url=url, model=model, inputs=arrays, send=send, stats=stats, client=raw)
    finally:
        if ours is not None:
            await ours.aclose()
        await raw.close()
