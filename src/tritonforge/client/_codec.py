"""numpy <-> Triton's gRPC messages, built for speed, and the input checks against a model's metadata.

A request is ``header + raw_input_contents``: the header (model, version, input names/dtypes/shapes,
requested outputs) is serialized once per distinct input signature and cached; each call then only appends
its tensors' bytes as protobuf field 7, so no per-call message objects are built at all.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import deserialize_bytes_tensor

from tritonforge.errors import InvalidRequestError

__all__ = [
    "ModelMetadata",
    "TensorMetadata",
    "bytes_tensor",
    "decode_response",
    "numpy_dtype",
    "request_header",
    "triton_dtype",
]

_NUMPY_OF: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
_DTYPE_OF: dict[np.dtype[Any], str] = {np.dtype(t): name for name, t in _NUMPY_OF.items()}
_RAW_TAG = b"\x3a"  # field 7 (raw_input_contents), wire type 2 (length-delimited)
_ID_TAG = b"\x1a"  # field 3 (id), wire type 2: protobuf takes fields in any order, so it follows the header


def triton_dtype(dtype: np.dtype[Any]) -> str:
    """Triton's wire name for a numpy dtype (``BYTES`` for object/bytes/str arrays)."""
    name = _DTYPE_OF.get(dtype)
    if name is not None:
        return name
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    if dtype.byteorder == ">":
        return triton_dtype(dtype.newbyteorder("<"))
    raise InvalidRequestError(
        f"numpy dtype {dtype} has no Triton data type; cast to one of "
        f"{sorted(_NUMPY_OF)} or use an object array of bytes for BYTES"
    )


def numpy_dtype(datatype: str) -> Any:
    """The numpy type of a Triton wire name (``np.object_`` for BYTES).

    Raises:
        InvalidRequestError: a name with no numpy type (BF16).
    """
    if datatype == "BYTES":
        return np.object_
    found = _NUMPY_OF.get(datatype)
    if found is None:
        raise InvalidRequestError(f"Triton data type {datatype} has no numpy type here")
    return found


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """A model's metadata as the server reports it (``-1`` marks a variable dim, the batch dim included)."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]

    @classmethod
    def from_proto(cls, msg: pb.ModelMetadataResponse) -> ModelMetadata:
        def tensors(items: Iterable[pb.ModelMetadataResponse.TensorMetadata]) -> tuple[TensorMetadata, ...]:
            return tuple(TensorMetadata(t.name, t.datatype, tuple(t.shape)) for t in items)

        return cls(msg.name, tuple(msg.versions), msg.platform, tensors(msg.inputs), tensors(msg.outputs))

    def check_inputs(
        self, signature: Sequence[tuple[str, str, tuple[int, ...]]], version: str | None, endpoint: str | None
    ) -> None:
        """Raise a clear :class:`InvalidRequestError` for a wrong input name, dtype or shape.

        Inputs the model lacks are errors; inputs the caller leaves out are too, unless the model marks none
        required (metadata doesn't say which are optional, so a missing one is left to the server).
        """
        expected = {t.name: t for t in self.inputs}

        def fail(message: str) -> InvalidRequestError:
            wants = ", ".join(f"{t.name}: {t.datatype}{list(t.shape)}" for t in self.inputs)
            return InvalidRequestError(
                f"model {self.name!r}: {message}; the model takes {wants}",
                model=self.name,
                version=version,
                endpoint=endpoint,
            )

        for name, datatype, shape in signature:
            spec = expected.get(name)
            if spec is None:
                raise fail(f"unknown input {name!r}")
            if datatype != spec.datatype:
                raise fail(f"input {name!r} is {datatype} but must be {spec.datatype}")
            fits = len(shape) == len(spec.shape) and all(
                w in (-1, s) for w, s in zip(spec.shape, shape, strict=True)
            )
            if not fits:
                raise fail(f"input {name!r} has shape {list(shape)}, which does not fit {list(spec.shape)}")
        missing = set(expected) - {name for name, _, _ in signature}
        if missing and len(missing) == len(expected):
            raise fail(f"missing inputs {sorted(missing)}")


_SMALL_VARINTS = tuple(bytes((n,)) for n in range(0x80))  # lengths under 128 are one byte: no loop


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def request_header(
    model: str,
    version: str | None,
    signature: Sequence[tuple[str, str, tuple[int, ...]]],
    outputs: Sequence[str] | None,
    shm: Sequence[tuple[str, int, int]] | None = None,
) -> bytes:
    """A serialized ``ModelInferRequest`` without raw contents (``shm``: region, offset, size per input)."""
    request = pb.ModelInferRequest(model_name=model, model_version=version or "")
    for i, (name, datatype, shape) in enumerate(signature):
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if shm is not None:
            region, offset, size = shm[i]
            tensor.parameters["shared_memory_region"].string_param = region
            tensor.parameters["shared_memory_offset"].int64_param = offset
            tensor.parameters["shared_memory_byte_size"].int64_param = size
    for name in outputs or ():
        request.outputs.add(name=name)
    return request.SerializeToString()


def tensor_bytes(array: np.ndarray, datatype: str) -> Any:
    """The tensor's bytes as Triton expects them (a zero-copy view where the array allows).

    Raises:
        InvalidRequestError: a BYTES element that is not bytes, ``np.bytes_``, bytearray or str (named with
            its position and type), or a str that can't be UTF-8 (a lone surrogate).
    """
    if datatype == "BYTES":
        return bytes_tensor(array)
    if not array.flags.c_contiguous or array.dtype.byteorder == ">":
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return array.data.cast("B") if array.ndim and array.size else array.tobytes()


_LENGTH = struct.Struct("<I")


def bytes_tensor(array: np.ndarray) -> bytes:
    """A BYTES tensor as Triton lays it out: each element, in row-major order, as its 4-byte little-endian
    length and its bytes. ``bytes`` (``np.bytes_`` included) and ``bytearray`` go as they are, ``str`` as
    UTF-8; anything else is refused by name rather than sent as its ``str()`` (tritonclient's
    ``serialize_byte_tensor`` sends ``np.bytes_(b"xy")`` as ``b"b'xy'"``).

    Raises:
        InvalidRequestError: an element of another type, or a str that is not valid UTF-8.
    """
    parts: list[bytes] = []
    pack = _LENGTH.pack
    for index, element in enumerate(array.reshape(-1).tolist() if array.dtype.kind != "O" else array.flat):
        if isinstance(element, (bytes, bytearray)):
            data = bytes(element)
        elif isinstance(element, str):
            try:
                data = element.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidRequestError(
                    f"BYTES element {_position(array, index)} is a str that isn't valid UTF-8 ({exc.reason} "
                    f"at character {exc.start}); send bytes instead"
                ) from None
        else:
            raise InvalidRequestError(
                f"BYTES element {_position(array, index)} is {type(element).__name__} "
                f"({repr(element)[:40]}); BYTES inputs take bytes, numpy.bytes_, bytearray or str "
                "elements (encode other values first, e.g. str(value).encode())"
            )
        parts.append(pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _position(array: np.ndarray, flat_index: int) -> str:
    return str(list(np.unravel_index(flat_index, array.shape))) if array.ndim else "[]"


def frame(header: bytes, raws: Sequence[Any], request_id: str = "") -> bytes:
    """``header``, the request's ``id`` (when given), then each raw tensor as a ``raw_input_contents`` entry.

    The cached header carries no id; appending field 3 after it is valid protobuf (fields may come in any
    order), so a per-call id costs a few bytes and no re-serialization.
    """
    parts: list[Any] = [header]
    if request_id:
        encoded = request_id.encode()
        parts += (_ID_TAG, _varint(len(encoded)), encoded)
    for raw in raws:
        parts += (_RAW_TAG, _varint(len(raw)), raw)
    return b"".join(parts)


def decode_response(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """``{name: ndarray}`` from a ``ModelInferResponse`` (numeric arrays are read-only views of its bytes)."""
    result: dict[str, np.ndarray] = {}
    raws = response.raw_output_contents
    for output, raw in zip(response.outputs, raws, strict=False):
        datatype = output.datatype
        array = (
            deserialize_bytes_tensor(raw) if datatype == "BYTES" else np.frombuffer(raw, _NUMPY_OF[datatype])
        )
        array.shape = output.shape  # in place: no second array object as reshape() makes
        result[output.name] = array
    return result


def as_array(name: str, value: Any, model: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except Exception as exc:  # numpy raises many kinds for ragged input
        raise InvalidRequestError(
            f"input {name!r} for model {model!r} is not array-like: {exc}", model=model
        ) from exc


def signature_of(inputs: Mapping[str, np.ndarray]) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    return tuple((name, triton_dtype(array.dtype), array.shape) for name, array in inputs.items())
