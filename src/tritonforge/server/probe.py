"""One request to a loaded model, whatever its kind: plain, stateful (sequence batching) or decoupled.

The live check of a repository sends every model one request built from its config. A stateful model
needs a sequence id with start and end flags, and a decoupled model answers only on a stream, with any
number of responses and a final flag; a plain ``infer`` call would be refused by both.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from tritonforge.config import ModelConfig
from tritonforge.errors import ConfigError, TritonForgeError

if TYPE_CHECKING:
    from tritonclient.grpc import InferenceServerClient, InferInput

__all__ = ["fetch_config", "infer_once"]

# Correlation id for the one-request sequence of a live check.
_SEQUENCE_ID = 1


def fetch_config(client: InferenceServerClient, name: str, *, timeout_s: float = 60.0) -> ModelConfig:
    """The config the server runs ``name`` with, auto-completed fields included.

    Raises:
        ConfigError: when the server's config can't be read (naming the model).
    """
    response = client.get_model_config(name, client_timeout=timeout_s)
    try:
        return ModelConfig.from_proto(response.config)
    except ConfigError as exc:
        raise ConfigError(f"the server's config of '{name}': {exc.message}", model=name) from exc


def infer_once(
    client: InferenceServerClient,
    name: str,
    config: ModelConfig,
    arrays: Mapping[str, np.ndarray],
    *,
    timeout_s: float = 60.0,
) -> dict[str, np.ndarray]:
    """Send ``arrays`` to model ``name`` once through ``client`` (a ``tritonclient.grpc`` client) and return
    the outputs it answered with (for a decoupled model: the last value of each output over all responses).

    Raises:
        TritonForgeError: when the server reports an error or a decoupled model sends no final response
            within ``timeout_s``.
        tritonclient.utils.InferenceServerException: from a plain call the server refused.
    """
    import tritonclient.grpc as grpcclient

    inputs = []
    for tensor in config.inputs:
        array = arrays[tensor.name]
        item = grpcclient.InferInput(tensor.name, list(array.shape), tensor.dtype.triton_name)
        item.set_data_from_numpy(array)
        inputs.append(item)
    sequence: dict[str, Any] = {}
    if config.sequence_batching is not None:
        sequence = {"sequence_id": _SEQUENCE_ID, "sequence_start": True, "sequence_end": True}
    names = [tensor.name for tensor in config.outputs]
    if not config.decoupled:
        response = client.infer(name, inputs, client_timeout=timeout_s, **sequence)
        return {n: value for n in names if (value := response.as_numpy(n)) is not None}
    return _stream_once(client, name, inputs, names, sequence, timeout_s)


def _stream_once(
    client: InferenceServerClient,
    name: str,
    inputs: list[InferInput],
    names: list[str],
    sequence: dict[str, Any],
    timeout_s: float,
) -> dict[str, np.ndarray]:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=timeout_s)
    outputs: dict[str, np.ndarray] = {}
    try:
        client.async_stream_infer(name, inputs, enable_empty_final_response=True, **sequence)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                result, error = answers.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TritonForgeError(
                    f"decoupled model '{name}' sent no final response within {timeout_s:.0f} s", model=name
                ) from None
            if error is not None:
                raise TritonForgeError(f"decoupled model '{name}' failed: {error}", model=name)
            for output in names:
                value = result.as_numpy(output)
                if value is not None:
                    outputs[output] = value
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return outputs
    finally:
        client.stop_stream()
