"""A miss on a server with a model cache: the model is not loaded, so ask the server's cache coordinator to
load it (one request naming the model, bounded by the call's remaining deadline). When to ask, and where
the call goes next (the same endpoint), is the call flow's decision (:func:`~tritonforge.client._flow.
call_flow`, its :class:`~tritonforge.client._flow.Load` step); this is the asking. No I/O here: the flow
yields the calls to make.

A server runs a cache when it serves the coordinator model (``tritonforge_cache``, see
:mod:`tritonforge.cache`); each endpoint is asked once, on its first miss, and the answer kept in its
:class:`Capabilities`. A server without one sees no extra call after that, and a loaded model's calls
never come here.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from tritonforge.client._codec import bytes_tensor, frame, request_header
from tritonforge.client._flow import Rpc
from tritonforge.client._options import Flow
from tritonforge.client._pool import Endpoint
from tritonforge.errors import (
    ClientError,
    DeadlineExceeded,
    ModelNotFoundError,
    TransportError,
    Unavailable,
)

__all__ = ["CACHE_MODEL", "cache_miss_flow"]

#: the coordinator's model name (the same as ``tritonforge.cache.CACHE_MODEL``)
CACHE_MODEL = "tritonforge_cache"
#: the longest a probe for the coordinator may take when the call has no deadline
_PROBE_TIMEOUT_S = 5.0


def load_request(model: str) -> bytes:
    """The coordinator's request for ``model`` (input ``MODEL``, BYTES [1])."""
    header = request_header(CACHE_MODEL, None, (("MODEL", "BYTES", (1,)),), ("STATE",))
    return frame(header, [bytes_tensor(np.array([model.encode()], dtype=np.object_))])


def cache_miss_flow(
    endpoint: Endpoint, miss: ModelNotFoundError, model: str, remaining_s: float | None
) -> Flow[Any]:
    """Have the cache of ``endpoint``, where the call missed with ``miss``, load ``model``; returns when it
    is loaded.

    Raises:
        ModelNotFoundError: ``miss`` itself when the endpoint runs no cache; or with the cache's reason
            when it could not load the model (not in its repositories, a broken model).
        DeadlineExceeded: the call's deadline passed before the model was loaded.
        TransportError: the server went away meanwhile (:class:`Unavailable` too when it did not say in
            time whether it runs a cache).
    """
    capabilities = endpoint.capabilities
    load_s = remaining_s
    try:
        if capabilities.model_cache is None:
            probe_s = _PROBE_TIMEOUT_S if remaining_s is None else min(remaining_s, _PROBE_TIMEOUT_S)
            asked = time.monotonic()
            try:
                answer = yield Rpc(endpoint, "ModelReady", pb.ModelReadyRequest(name=CACHE_MODEL), probe_s)
            except DeadlineExceeded as exc:
                if remaining_s is not None and probe_s >= remaining_s:
                    raise  # the call's own deadline (said below)
                raise Unavailable(  # too slow to say: the call goes on elsewhere
                    f"model {model!r} is not loaded at {endpoint.url}, and the server did not say within "
                    f"{probe_s:.3g} s whether it runs a model cache",
                    model=model,
                    endpoint=endpoint.url,
                ) from exc
            except TransportError:
                raise  # nothing learnt of its cache: the flow goes on as after any transport error
            except ClientError:
                answer = None
            capabilities.model_cache = bool(answer is not None and answer.ready)
            if load_s is not None:  # the probe's time comes off the load's
                load_s = max(0.0, load_s - (time.monotonic() - asked))
        if not capabilities.model_cache:
            raise miss
        yield Rpc(endpoint, "ModelInfer", load_request(model), load_s, CACHE_MODEL, None)
    except DeadlineExceeded as exc:
        if remaining_s is None:
            raise
        raise DeadlineExceeded(
            f"model {model!r} was not loaded by the server's cache within the call's deadline "
            f"({remaining_s:.3g} s left when it was asked); raise timeout_s for cold models",
            model=model,
            endpoint=endpoint.url,
        ) from exc
    except TransportError:
        raise
    except ClientError as exc:
        if exc is miss:  # no cache there
            raise
        reason = exc.message.split("failed: ", 1)[-1]
        raise ModelNotFoundError(
            f"model {model!r} is not loaded at {endpoint.url} and its cache could not load it: {reason}",
            model=model,
            endpoint=endpoint.url,
        ) from exc
