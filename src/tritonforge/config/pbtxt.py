"""config.pbtxt text in and out, through protobuf's text_format; reading and atomic writing of files."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as pb2

from tritonforge.atomic import write_atomic
from tritonforge.config.model import ModelConfig
from tritonforge.errors import ConfigError

__all__ = [
    "AUTO_COMPLETE_FILES",
    "pbtxt_to_proto",
    "proto_to_pbtxt",
    "read_config",
    "read_model_dir",
    "write_config",
]

CONFIG_FILENAME = "config.pbtxt"

#: The files from which Triton tells a model's backend when its config names none (or there is no
#: config.pbtxt at all), in the order Triton tries them; with the backend it picks.
AUTO_COMPLETE_FILES: tuple[tuple[str, str, str], ...] = (
    ("model.plan", "platform", "tensorrt_plan"),
    ("model.savedmodel", "platform", "tensorflow_savedmodel"),
    ("model.graphdef", "platform", "tensorflow_graphdef"),
    ("model.pt", "backend", "pytorch"),
    ("model.onnx", "backend", "onnxruntime"),
    ("model.py", "backend", "python"),
)


# Messages whose ``kind`` enum has a meaningful first value (CONTROL_SEQUENCE_START, BATCH_ELEMENT_COUNT)
# that proto3 would leave out, so that a reader could not tell which control or batch input it is.
_KIND_FIRST = (pb2.ModelSequenceBatching.Control, pb2.BatchInput, pb2.BatchOutput)


def _format_defaults(message: Message, indent: int, as_one_line: bool) -> str | None:
    """Print what proto3 leaves out but people need to read: ``enable: false`` inside
    ``input_pinned_memory {}`` (an empty block means "disabled" to Triton but reads as "enabled"), and a
    ``kind`` whose value is its enum's first one."""
    if isinstance(message, pb2.ModelOptimizationPolicy.PinnedMemoryBuffer) and not message.enable:
        out = io.StringIO()
        field = message.DESCRIPTOR.fields_by_name["enable"]
        text_format.PrintField(field, False, out, as_one_line=as_one_line)
        return out.getvalue().rstrip()
    if isinstance(message, _KIND_FIRST) and message.kind == 0:
        field = message.DESCRIPTOR.fields_by_name["kind"]
        lines = [f"kind: {field.enum_type.values_by_number[0].name}"]
        rest = text_format.MessageToString(
            message, use_index_order=True, use_short_repeated_primitives=True, as_one_line=as_one_line
        )
        lines += [line for line in rest.splitlines() if line.strip()]
        return (" " if as_one_line else "\n" + " " * indent).join(lines)
    return None


_PRINT_OPTIONS: dict[str, Any] = {
    # Declaration order puts name/platform/backend/max_batch_size first, as people write them.
    "use_index_order": True,
    # dims: [3, 224, 224] rather than one line per dimension, as in Triton's docs.
    "use_short_repeated_primitives": True,
    "message_formatter": _format_defaults,
}


def proto_to_pbtxt(pb: pb2.ModelConfig) -> str:
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


def pbtxt_to_proto(text: str, *, source: str | os.PathLike[str] | None = None) -> pb2.ModelConfig:
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
        if len(message) > 300:  # the parser may quote a whole (long) line
            message = message[:300] + " ..."
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


def read_model_dir(model_dir: str | os.PathLike[str]) -> ModelConfig:
    """The config Triton starts from for the model folder ``model_dir``, auto-completed as Triton does.

    Triton's auto-complete (on by default) fills in what a config.pbtxt leaves out: the name from the
    folder, the backend from the model file in a version folder (``model.py`` -> python, ``model.onnx``
    -> onnxruntime, ...), and for some backends the inputs and outputs from the model itself. So a
    folder with no config.pbtxt at all is valid when its version folders hold a file Triton recognises.
    What Triton accepts but looks wrong is in the result's ``warnings``.

    Example:
        >>> read_model_dir("model_repository/add_sub").backend  # doctest: +SKIP
        'python'

    Raises:
        ConfigError: naming the folder, for what Triton would refuse: a syntax error, an invalid config,
            or no config and no model file to auto-complete one from.
    """
    folder = Path(model_dir)
    file = folder / CONFIG_FILENAME
    if file.is_file():
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: can't read the config: {exc}") from exc
        pb = pbtxt_to_proto(text, source=file)
        source: Path = file
    else:
        pb = pb2.ModelConfig()
        source = folder
    if not pb.name:
        pb.name = folder.name
    if not pb.platform and not pb.backend:
        found = _auto_complete_backend(folder, pb.default_model_filename)
        if found is None:
            names = ", ".join(name for name, _, _ in AUTO_COMPLETE_FILES)
            what = (
                "its config.pbtxt sets neither platform nor backend" if file.is_file() else "no config.pbtxt"
            )
            raise ConfigError(
                f"{source}: {what}, and no version folder holds a model file Triton can tell the backend "
                f'from ({names}); set backend (e.g. backend: "python") or add the model file',
                model=pb.name,
            )
        setattr(pb, found[0], found[1])
    try:
        return ModelConfig.from_proto(pb)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.message}", model=exc.model) from exc


def _auto_complete_backend(folder: Path, default_filename: str) -> tuple[str, str] | None:
    """(field, value) for the backend Triton would pick from the files in ``folder``'s version folders."""
    version_dirs = (
        sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []
    )
    for version_dir in version_dirs:
        for name, field, value in AUTO_COMPLETE_FILES:
            if (version_dir / name).exists() or (default_filename and default_filename == name):
                return field, value
    return None


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
    return write_atomic(file, text)
