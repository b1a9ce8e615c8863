"""Triton model configs as frozen dataclasses, to and from protobuf and config.pbtxt.

Build a config, check it as Triton would, and write it::

    from tritonforge.config import DynamicBatching, ModelConfig, TensorSpec, write_config

    cfg = ModelConfig(
        name="resnet",
        platform="onnxruntime_onnx",
        max_batch_size=8,
        inputs=[TensorSpec(name="x", dtype="FP32", dims=[3, 224, 224])],
        outputs=[TensorSpec(name="y", dtype="FP32", dims=[1000])],
        dynamic_batching=DynamicBatching(preferred_batch_sizes=[4, 8]),
    )
    write_config(cfg, "model_repository/resnet")

or infer it from a model file with ``onnx_signature`` / ``torchscript_signature`` and
``config_from_signature``. Everything invalid raises ``ConfigError`` (``SignatureError`` for model files).
"""

from __future__ import annotations

from tritonforge.config.composing import ComposingWalk
from tritonforge.config.enums import ControlKind, DataType, InstanceKind, TimeoutAction
from tritonforge.config.model import ModelConfig
from tritonforge.config.parts import (
    CustomAccelerator,
    DynamicBatching,
    EnsembleStep,
    InstanceGroup,
    ModelWarmup,
    OpenVINOAccelerator,
    Optimization,
    QueuePolicy,
    RepositoryAgent,
    TensorRTAccelerator,
    TensorSpec,
    VersionPolicy,
    WarmupInput,
)
from tritonforge.config.pbtxt import read_config, read_model_dir, write_config
from tritonforge.config.sequence import (
    ControlInput,
    DirectStrategy,
    InitialState,
    OldestStrategy,
    SequenceBatching,
    SequenceControl,
    SequenceState,
)
from tritonforge.config.signature import (
    DEFAULT_MAX_BATCH_SIZE,
    Signature,
    check_signature,
    config_from_signature,
    onnx_signature,
    torchscript_signature,
)
from tritonforge.config.validate import BACKEND_OF_PLATFORM

__all__ = [
    "BACKEND_OF_PLATFORM",
    "DEFAULT_MAX_BATCH_SIZE",
    "ComposingWalk",
    "ControlInput",
    "ControlKind",
    "CustomAccelerator",
    "DataType",
    "DirectStrategy",
    "DynamicBatching",
    "EnsembleStep",
    "InitialState",
    "InstanceGroup",
    "InstanceKind",
    "ModelConfig",
    "ModelWarmup",
    "OldestStrategy",
    "OpenVINOAccelerator",
    "Optimization",
    "QueuePolicy",
    "RepositoryAgent",
    "SequenceBatching",
    "SequenceControl",
    "SequenceState",
    "Signature",
    "TensorRTAccelerator",
    "TensorSpec",
    "TimeoutAction",
    "VersionPolicy",
    "WarmupInput",
    "check_signature",
    "config_from_signature",
    "onnx_signature",
    "read_config",
    "read_model_dir",
    "torchscript_signature",
    "write_config",
]
