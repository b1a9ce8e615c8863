"""The ``extra`` bookkeeping of the config conversion: which proto fields the dataclasses model.

``_MODELLED`` lists, per message, the fields that have a dataclass field of their own; ``_residual`` cuts a
message down to the rest (kept as config.pbtxt text in ``extra``), ``_merge_extra`` puts it back, and
``check_extras`` refuses an ``extra`` that sets a modelled field. ``proto.py`` converts with these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from google.protobuf import text_format
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as pb2

from tritonforge.errors import ConfigError

if TYPE_CHECKING:
    from tritonforge.config.model import ModelConfig

FULL, PARTIAL, ITEM = "full", "partial", "item"

# Per message: the fields the dataclasses model. FULL: converted with every sub-field. PARTIAL: a singular
# message of which only some sub-fields are modelled (the rest stay in the parent's ``extra``). ITEM: a
# repeated message whose items each keep their own ``extra``. Any field not listed goes to ``extra``.
_MODELLED: dict[str, dict[str, str]] = {
    "ModelConfig": {
        "name": FULL,
        "platform": FULL,
        "backend": FULL,
        "version_policy": FULL,
        "max_batch_size": FULL,
        "input": ITEM,
        "output": ITEM,
        "optimization": PARTIAL,
        "dynamic_batching": FULL,
        "sequence_batching": FULL,
        "ensemble_scheduling": PARTIAL,
        "instance_group": ITEM,
        "default_model_filename": FULL,
        "parameters": FULL,
        "model_warmup": FULL,
        "model_transaction_policy": FULL,
        "model_repository_agents": FULL,
        "response_cache": FULL,
    },
    "ModelInput": {
        name: FULL
        for name in (
            "name",
            "data_type",
            "dims",
            "reshape",
            "is_shape_tensor",
            "allow_ragged_batch",
            "optional",
        )
    },
    "ModelOutput": {name: FULL for name in ("name", "data_type", "dims", "reshape", "is_shape_tensor")},
    "ModelInstanceGroup": {name: FULL for name in ("name", "kind", "count", "gpus")},
    "Step": {name: FULL for name in ("model_name", "model_version", "input_map", "output_map")},
    "ModelEnsembling": {"step": ITEM},
    "ModelOptimizationPolicy": {
        "cuda": PARTIAL,
        "execution_accelerators": FULL,
        "input_pinned_memory": FULL,
        "output_pinned_memory": FULL,
    },
    "Cuda": {"graphs": FULL},
}


def _residual(message: Message) -> Message:
    """A copy of ``message`` holding only the fields no dataclass field models."""
    rest = type(message)()
    rest.CopyFrom(message)
    modelled = _MODELLED.get(message.DESCRIPTOR.name, {})
    for field, value in message.ListFields():
        how = modelled.get(field.name)
        if how is None:
            continue
        if how == PARTIAL:
            inner = _residual(value)
            # An empty block that was written stays (it may mean something); one emptied by us goes.
            if inner.ByteSize() == 0 and value.ByteSize() != 0:
                rest.ClearField(field.name)
            else:
                getattr(rest, field.name).CopyFrom(inner)
        else:
            rest.ClearField(field.name)
    return rest


def _to_text(message: Message) -> str:
    return text_format.MessageToString(message, as_one_line=True).strip()


def _parse_extra(text: str, message_type: type[Message], where: str) -> Message:
    message = message_type()
    text_format.Parse(text, message)  # the dataclasses keep only text that parses
    leftover = _residual(message)
    if leftover != message:
        modelled = sorted(
            f.name for f, _ in message.ListFields() if f.name in _MODELLED.get(message.DESCRIPTOR.name, {})
        )
        # A PARTIAL block may sit in extra for its unmodelled part; name only what is modelled in it.
        raise ConfigError(
            f"{where}: extra sets {', '.join(modelled)}, which tritonforge models as fields; set them "
            "through the dataclass's own keywords instead"
        )
    return message


def check_extras(config: ModelConfig) -> None:
    """Check that every ``extra`` parses and sets only fields without a dataclass field of their own.

    Raises:
        ConfigError: naming the model and the part whose ``extra`` is wrong.
    """
    owner = f"model {config.name!r}"
    if config.extra:
        extra = _parse_extra(config.extra, pb2.ModelConfig, owner)
        if extra.HasField("ensemble_scheduling") and config.ensemble_steps is None:
            raise ConfigError(f"{owner}: extra has ensemble_scheduling but the model has no ensemble_steps")
    for kind, tensors, message_type in (
        ("input", config.inputs, pb2.ModelInput),
        ("output", config.outputs, pb2.ModelOutput),
    ):
        for tensor in tensors:
            if tensor.extra:
                where = f"{owner}: {kind} {tensor.name!r}"
                try:
                    _parse_extra(tensor.extra, message_type, where)
                except text_format.ParseError as exc:
                    raise ConfigError(f"{where}: extra is not valid {kind} text: {exc}") from exc
    for group in config.instance_groups:
        if group.extra:
            _parse_extra(group.extra, pb2.ModelInstanceGroup, f"{owner}: instance group {group.name!r}")
    for step in config.ensemble_steps or ():
        if step.extra:
            _parse_extra(step.extra, pb2.ModelEnsembling.Step, f"{owner}: ensemble step {step.model_name!r}")


def _merge_extra(pb: Message, extra: str) -> None:
    if extra:
        text_format.Merge(extra, pb)
