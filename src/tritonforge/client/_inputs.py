"""A call's inputs checked and encoded, without I/O: whatever a caller passes gets a correct request or our
own :class:`InvalidRequestError` saying what to pass instead (property-tested in tests/test_client_inputs.py).
Also the split of a large input into batches that fit a server's message limit."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tritonforge.client._codec import as_array, tensor_bytes, triton_dtype
from tritonforge.errors import InvalidRequestError, RequestTooLarge

__all__ = [
    "MAX_NAME_BYTES",
    "MAX_REQUEST_ID_BYTES",
    "NonFinitePolicy",
    "PreparedCall",
    "as_version",
    "batches",
    "check_model_name",
    "check_name",
    "join_batches",
    "name_ok",
    "prepare",
    "smaller_limit",
    "split_batches",
]

NonFinitePolicy = bool | frozenset[str]  # True: allowed everywhere; names: "x" (any model) or "model/x"
_ROW_MARGIN = 0.9  # of a message limit, left for the request's header when splitting batches
#: The longest model, input or output name sent: a model is a folder of the repository, and no file system
#: takes a name over 255 bytes. Longer names never reach the server (whose error echoing one would be over
#: gRPC's 16 KiB metadata limit and come back as RESOURCE_EXHAUSTED, not as "no such model").
MAX_NAME_BYTES = 255
#: The longest request id sent (Triton echoes it in its logs, traces and error messages).
MAX_REQUEST_ID_BYTES = 1024


def _shown(value: str, room: int = 40) -> str:
    """``value`` as repr, cut to about ``room`` characters (a 20,000-character name stays one line)."""
    text = repr(value)
    return text if len(text) <= room else f"{text[: room - 4]}...' ({len(value)} characters)"


def check_model_name(value: Any) -> str:
    """``value`` once sure it can be sent as a model name: :func:`check_name`, and a folder name of a
    repository (no ``/``, not ``.`` or ``..``).

    Example:
        >>> check_model_name("digits_mlp")
        'digits_mlp'

    Raises:
        InvalidRequestError: what is wrong with it, naming it (cut when long).
    """
    # the common case in a few hundred ns: short printable text (63 characters are at most 252 bytes)
    if name_ok(value) and "/" not in value and value not in (".", ".."):
        return value
    check_name(value)
    if "/" in value or value in (".", ".."):
        raise InvalidRequestError(
            f"a model name {_shown(value)} is not a folder name of a model repository (no '/', not '.' "
            "or '..')"
        )
    return value


def name_ok(value: Any) -> bool:
    """Whether ``value`` passes :func:`check_name` at its default limit, cheaply for short names."""
    return type(value) is str and 0 < len(value) <= 63 and value.isprintable()


def check_name(value: Any, *, what: str = "a model name", limit: int = MAX_NAME_BYTES) -> str:
    """``value`` once sure it can be sent as a name: a non-empty string of printable characters (no NUL,
    control or format characters, no lone surrogates), at most ``limit`` bytes in UTF-8.

    Example:
        >>> check_name("x", what="an input name")
        'x'

    Raises:
        InvalidRequestError: what is wrong with it, naming it (cut when long).
    """
    if not isinstance(value, str) or not value:
        shown = _shown(value) if isinstance(value, str) else repr(value)[:60]
        raise InvalidRequestError(f"{what} is a non-empty string, not {shown}")
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        raise InvalidRequestError(
            f"{what} {_shown(value)} holds the unprintable character U+{ord(bad):04X}; names are printable "
            "text (a NUL would cut the name short on the server and reach another model)"
        )
    size = len(value.encode("utf-8"))
    if size > limit:
        raise InvalidRequestError(f"{what} {_shown(value)} is {size} bytes long; the limit is {limit} bytes")
    return value


@dataclass(slots=True)
class PreparedCall:
    """One call's inputs, encoded once whatever the number of attempts."""

    model: str
    signature: tuple[tuple[str, str, tuple[int, ...]], ...]
    raws: list[Any]
    outputs: tuple[str, ...] | None
    nbytes: int
    arrays: Mapping[str, np.ndarray]
    request_id: str = ""  # sent as the ModelInferRequest's ``id`` (Triton's logs and traces show it)

    def mirror(self, request_id: str = "") -> PreparedCall:
        """A copy for a shadow call: owns its bytes (the caller may reuse its buffers), no arrays."""
        return PreparedCall(
            self.model,
            self.signature,
            [bytes(r) for r in self.raws],
            self.outputs,
            self.nbytes,
            {},
            request_id,
        )


def as_version(version: str | int | None) -> str | None:
    """A model version as the protocol carries it (a string), or ``None`` for the server's choice.

    Raises:
        InvalidRequestError: a version that is neither a number nor a string.
    """
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, (str, int)):
        raise InvalidRequestError(f"a model version is a number or a string, not {repr(version)[:60]}")
    if isinstance(version, int):
        if version < 0:
            raise InvalidRequestError(f"a model version is a number >= 0, not {version}")
        return str(version)
    return check_name(version, what="a model version", limit=64) if version else version


def prepare(
    model: str,
    inputs: Mapping[str, Any],
    outputs: Sequence[str] | None,
    timeout_s: float | None,
    allow_non_finite: NonFinitePolicy,
) -> PreparedCall:
    """Check and encode one call's inputs.

    Raises:
        InvalidRequestError: a model name that isn't a string; inputs that aren't ``{name: array}``; an
            input that can't be a Triton tensor; NaN/±inf where ``allow_non_finite`` doesn't allow them;
            ``outputs`` that aren't a list of names; a ``timeout_s`` that isn't seconds >= 0.
    """
    check_model_name(model)
    if not isinstance(inputs, Mapping):
        raise InvalidRequestError(
            f"inputs for model {model!r} must be a mapping {{input name: array}}, not "
            f"{type(inputs).__name__}; e.g. client.infer({model!r}, {{'x': array}})",
            model=model,
        )
    if not inputs:
        raise InvalidRequestError(f"no inputs given for model {model!r}", model=model)
    if outputs is not None and (
        isinstance(outputs, (str, bytes))
        or not isinstance(outputs, (Sequence, Collection))
        or not all(isinstance(o, str) and o for o in outputs)
    ):
        raise InvalidRequestError(
            f"outputs for model {model!r} must be a list of output names, not {repr(outputs)[:80]}",
            model=model,
        )
    for o in outputs or ():
        if not name_ok(o):
            check_name(o, what=f"an output name of model {model!r}")
    if timeout_s is not None and (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or not timeout_s >= 0
        or math.isinf(timeout_s)
    ):
        raise InvalidRequestError(f"timeout_s must be a number of seconds >= 0, not {timeout_s!r}")
    arrays: dict[str, np.ndarray] = {}
    signature = []
    raws = []
    nbytes = 0
    for name, value in inputs.items():
        if not name_ok(name):
            check_name(name, what=f"an input name of model {model!r}")
        array = value if type(value) is np.ndarray else as_array(name, value, model)
        datatype, raw = _encode_tensor(model, name, array)
        if array.dtype.kind == "f" and not _non_finite_allowed(allow_non_finite, model, name):
            _check_finite(model, name, array)
        arrays[name] = array
        signature.append((name, datatype, array.shape))
        raws.append(raw)
        nbytes += len(raw)
    return PreparedCall(
        model, tuple(signature), raws, None if outputs is None else tuple(outputs), nbytes, arrays
    )


def _encode_tensor(model: str, name: str, array: np.ndarray) -> tuple[str, Any]:
    datatype = "BYTES"
    try:
        datatype = triton_dtype(array.dtype)
        return datatype, tensor_bytes(array, datatype)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"input {name!r} of model {model!r}: {exc}", model=model) from exc
    except Exception as exc:  # pragma: no cover - a numpy dtype tensor_bytes can't lay out
        raise InvalidRequestError(
            f"input {name!r} of model {model!r} can't be sent as {datatype}: {exc}", model=model
        ) from exc


def _non_finite_allowed(allowed: NonFinitePolicy, model: str, name: str) -> bool:
    if isinstance(allowed, bool):
        return allowed
    return name in allowed or f"{model}/{name}" in allowed


def _check_finite(model: str, name: str, array: np.ndarray) -> None:
    # x . x is finite exactly when every element is: NaN and ±inf carry through a sum of squares (which never
    # meets inf - inf). One dot product (BLAS where it can), no temporary bool array and, unlike matmul, no
    # floating-point warnings; an overflow of large finite values only sends us on to the exact check below.
    flat = array.ravel()
    if math.isfinite(np.dot(flat, flat)):
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    if array.ndim == 0:
        where = "its value"
    else:
        bad = np.flatnonzero(~finite.reshape(len(array), -1).all(axis=1))
        shown = ", ".join(map(str, bad[:10])) + (f", … ({len(bad)} rows)" if len(bad) > 10 else "")
        where = f"rows [{shown}]"
    raise InvalidRequestError(
        f"input {name!r} of model {model!r} has NaN or ±inf in {where}; clean or impute them, or send "
        f"them on purpose with allow_non_finite={{'{name}'}} (or True) on the client",
        model=model,
    )


# -- batches ------------------------------------------------------------------------------------------


def batches(
    model: str, inputs: Mapping[str, Any], batch_size: int, limit_bytes: int | None
) -> list[dict[str, np.ndarray]]:
    """``inputs`` split along axis 0 into batches of ``batch_size`` rows, fewer when a request of that many
    rows would be over ``limit_bytes`` (a server's message limit, when one is known).

    Raises:
        InvalidRequestError: inputs that aren't a mapping of arrays sharing their first dim.
        RequestTooLarge: a single row is over the limit.
        ValueError: a ``batch_size`` that isn't an int >= 1.
    """
    if not isinstance(inputs, Mapping) or not inputs:
        raise InvalidRequestError(
            f"inputs for model {model!r} must be a non-empty mapping {{input name: array}}", model=model
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, not {batch_size!r}")
    arrays = {name: as_array(str(name), value, model) for name, value in inputs.items()}
    if limit_bytes:
        rows = max((len(a) for a in arrays.values() if a.ndim), default=1) or 1
        total = sum(_wire_bytes(a) for a in arrays.values())
        per_row = max(1, -(-total // rows))
        fit = int(limit_bytes * _ROW_MARGIN) // per_row
        if fit < 1:
            error = RequestTooLarge(
                f"model {model!r}: one row of inputs is about {per_row} bytes, over the server's "
                f"message limit of {limit_bytes} bytes; use shared memory on the same host, or raise the "
                "server's limit",
                model=model,
            )
            error.limit_bytes = limit_bytes
            raise error
        batch_size = min(batch_size, fit)
    return split_batches(arrays, batch_size, model)


def _wire_bytes(array: np.ndarray) -> int:
    """About how many bytes the array takes in a request (BYTES: each element's length and 4 more)."""
    if array.dtype.kind not in "OSU":
        return int(array.nbytes)
    return sum(
        len(e.encode() if isinstance(e, str) else e) + 4 for e in array.flat if isinstance(e, (bytes, str))
    )


def smaller_limit(error: RequestTooLarge, limit_bytes: int | None) -> int:
    """The limit to split under after ``error`` refused a batch made under ``limit_bytes``.

    Raises:
        RequestTooLarge: ``error`` itself, when it names no limit.
    """
    if not error.limit_bytes:
        raise error
    if limit_bytes is None or error.limit_bytes < limit_bytes:
        return error.limit_bytes
    return limit_bytes // 2


def split_batches(
    inputs: Mapping[str, np.ndarray], batch_size: int, model: str | None = None
) -> list[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` rows (views) of inputs that share their first dim.

    Raises:
        InvalidRequestError: inputs without a first dim, or whose first dims differ.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    arrays = {k: np.asarray(a) for k, a in inputs.items()}
    lengths = {len(a) if a.ndim else None for a in arrays.values()}
    if len(lengths) != 1 or None in lengths:
        shown = sorted(str(n) for n in lengths)
        raise InvalidRequestError(
            f"inputs must share their first dim to be batched, got lengths {shown}", model=model
        )
    (n,) = lengths
    assert n is not None
    return [{k: a[i : i + batch_size] for k, a in arrays.items()} for i in range(0, n, batch_size)]


def join_batches(answers: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The batches' answers joined along the first dim, output by output."""
    if not answers:
        return {}
    return {name: np.concatenate([a[name] for a in answers]) for name in answers[0]}
