"""config.pbtxt text in and out, through protobuf's text_format; reading and atomic writing of files."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb2

from tritonforge.config.model import ModelConfig
from tritonforge.errors import ConfigError

__all__ = ["pbtxt_to_proto", "proto_to_pbtxt", "read_config", "write_config"]

CONFIG_FILENAME = "config.pbtxt"


def _format_pinned_memory(message: Any, indent: int, as_one_line: bool) -> str | None:
    """Print ``enable: false`` inside ``input_pinned_memory {}``, which proto3 would leave out.

    An empty block means "disabled" to Triton but reads as "enabled" to people.
    """
    if message.DESCRIPTOR.name != "PinnedMemoryBuffer" or message.enable:
        return None
    out = io.StringIO()
    text_format.PrintField(message.DESCRIPTOR.fields_by_name["enable"], False, out, as_one_line=as_one_line)
    return out.getvalue().rstrip()


_PRINT_OPTIONS: dict[str, Any] = {
    # Declaration order puts name/platform/backend/max_batch_size first, as people write them.
    "use_index_order": True,
    # dims: [3, 224, 224] rather than one line per dimension, as in Triton's docs.
    "use_short_repeated_primitives": True,
    "message_formatter": _format_pinned_memory,
}


def proto_to_pbtxt(pb: Any) -> str:
    """Print a ``model_config_pb2.ModelConfig`` as config.pbtxt text.

    proto3 leaves fields at their default out, but ``max_batch_size: 0`` must be written: Triton's
    auto-complete would otherwise guess a batch size for some backends. It is printed by
    text_format's own field printer, between the fields declared before and after it.

    Example:
        >>> print(proto_to_pbtxt(pb2.ModelConfig(name="m", backend="python")), end="")
        name: "m"
        backend: "python"
        max_batch_size: 0
    """
    if pb.max_batch_size != 0:
        return text_format.MessageToString(pb, **_PRINT_OPTIONS)
    field = pb.DESCRIPTOR.fields_by_name["max_batch_size"]
    head, tail = type(pb)(), type(pb)()
    head.CopyFrom(pb)
    tail.CopyFrom(pb)
    before = True
    for each in pb.DESCRIPTOR.fields:  # declaration order, as use_index_order prints
        if each is field:
            before = False
            continue
        (tail if before else head).ClearField(each.name)
    out = io.StringIO()
    out.write(text_format.MessageToString(head, **_PRINT_OPTIONS))
    text_format.PrintField(field, 0, out, **_PRINT_OPTIONS)
    out.write(text_format.MessageToString(tail, **_PRINT_OPTIONS))
    return out.getvalue()


def pbtxt_to_proto(text: str, *, source: str | os.PathLike[str] | None = None) -> Any:
    """Parse config.pbtxt text into a ``model_config_pb2.ModelConfig``.

    Raises:
        ConfigError: naming ``source`` (when given), the line and the column of a syntax error.
    """
    pb = pb2.ModelConfig()
    try:
        text_format.Parse(text, pb)
    except text_format.ParseError as exc:
        where = f"{source}:" if source is not None else ""
        line, column = exc.GetLine(), exc.GetColumn()
        position = f"{line}:{column}: " if line is not None else ""
        # ParseError's message repeats "line:col :" at its start; keep only its explanation.
        message = str(exc).split(" : ", 1)[-1] if line is not None else str(exc)
        raise ConfigError(f"{where}{position}invalid config.pbtxt: {message}") from exc
    return pb


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    """Read a config.pbtxt file (or the model folder holding one).

    Example:
        >>> cfg = read_config("model_repository/resnet/config.pbtxt")  # doctest: +SKIP

    Raises:
        ConfigError: naming the file, for a missing file, a syntax error (with its line) or a
            config Triton would reject.
    """
    file = Path(path)
    if file.is_dir():
        file = file / CONFIG_FILENAME
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{file}: no such config file; write one with write_config()") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: can't read the config: {exc}") from exc
    return ModelConfig.from_pbtxt(text, source=file)


def write_config(config: ModelConfig, path: str | os.PathLike[str]) -> Path:
    """Write ``config`` as config.pbtxt at ``path`` (a file, or a model folder), atomically.

    The text goes to a temporary file in the same folder first and then replaces the target, so a
    server polling the repository never sees half a file.

    Example:
        >>> write_config(cfg, "model_repository/resnet")  # doctest: +SKIP
        PosixPath('model_repository/resnet/config.pbtxt')

    Returns:
        The path written.
    """
    file = Path(path)
    if file.is_dir():
        file = file / CONFIG_FILENAME
    text = config.to_pbtxt()
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file
