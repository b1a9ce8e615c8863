"""GPUs that are used when they are paid for: the deployed repository's configs, rewritten for GPU pods.

A pod given ``nvidia.com/gpu`` runs its models on the GPU only when their instance groups say
``KIND_GPU``; Triton puts ``count`` instances on *each* GPU the pod sees, so the count stays per GPU. ONNX
Runtime models also get their execution accelerator (Triton's onnxruntime backend: CUDA is its default
provider, TensorRT an opt-in one, FP16 a further opt-in of TensorRT's). Python-backend models and
ensembles stay as they are: a Python model runs where its own code puts it, an ensemble runs no instance.

Every change goes through ``model_config_pb2`` (read, change the message, check, write), never text.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from tritonforge.config import ModelConfig
from tritonforge.deploy.models import read_configs
from tritonforge.errors import DeployError

__all__ = ["GPU_BACKENDS", "Accelerator", "gpu_capable_models", "rewrite_for_gpus"]

Accelerator = Literal["cuda", "tensorrt", "tensorrt-fp16"]
#: backends whose models run on a GPU given KIND_GPU (as Triton names them after platform resolution)
GPU_BACKENDS = ("onnxruntime", "pytorch", "tensorrt", "tensorflow", "openvino_gpu")
_PLATFORM_BACKENDS: Mapping[str, str] = {
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
    "tensorrt_plan": "tensorrt",
    "tensorflow_savedmodel": "tensorflow",
    "tensorflow_graphdef": "tensorflow",
}
#: TensorRT execution-provider workspace: 1 GiB, the onnxruntime backend's documented example value
TRT_WORKSPACE_BYTES = str(1 << 30)


def _backend(pb: object) -> str:
    platform = str(getattr(pb, "platform", ""))
    return _PLATFORM_BACKENDS.get(platform, str(getattr(pb, "backend", "")) or platform)


def gpu_capable_models(repository: Path, configs: Mapping[str, ModelConfig] | None = None) -> list[str]:
    """The models of ``repository`` whose backend runs them on a GPU (ensembles and Python models don't);
    ``configs``: its configs already read (by model name), else they are read here."""
    configs = read_configs(repository) if configs is None else configs
    return [name for name, config in configs.items() if _backend(config.to_proto()) in GPU_BACKENDS]


def rewrite_for_gpus(
    repository: Path, *, accelerator: Accelerator = "cuda", models: list[str] | None = None
) -> dict[str, str]:
    """Rewrite the configs of ``repository`` (a deploy copy, changed in place) for GPU pods: every
    GPU-capable model's instance groups become ``KIND_GPU`` with the same count per GPU, and ONNX Runtime
    models get ``accelerator``. Returns model -> what changed, for the notes.

    Raises:
        DeployError: an accelerator we don't know; a config that no longer checks after the change.
    """
    from tritonclient.grpc import model_config_pb2 as pb2

    from tritonforge.config import ModelConfig, read_config, write_config
    from tritonforge.errors import ConfigError

    if accelerator not in ("cuda", "tensorrt", "tensorrt-fp16"):
        raise DeployError(f"GPU accelerator {accelerator!r} is not one of cuda, tensorrt, tensorrt-fp16")
    changed: dict[str, str] = {}
    for name in models if models is not None else gpu_capable_models(repository):
        folder = repository / name
        pb = read_config(folder).to_proto()
        groups = list(pb.instance_group) or [pb2.ModelInstanceGroup(count=1)]
        del pb.instance_group[:]
        for group in groups:
            group.kind = pb2.ModelInstanceGroup.KIND_GPU
            del group.gpus[:]  # every GPU the pod is given, `count` instances on each
            pb.instance_group.append(group)
        what = f"KIND_GPU x{sum(g.count or 1 for g in groups)} per GPU"
        if _backend(pb) == "onnxruntime":
            accelerators = pb.optimization.execution_accelerators
            del accelerators.gpu_execution_accelerator[:]
            if accelerator != "cuda":  # CUDA is the backend's provider on a GPU instance already
                trt = accelerators.gpu_execution_accelerator.add(name="tensorrt")
                trt.parameters["max_workspace_size_bytes"] = TRT_WORKSPACE_BYTES
                trt.parameters["precision_mode"] = "FP16" if accelerator == "tensorrt-fp16" else "FP32"
                what += f", TensorRT execution provider ({trt.parameters['precision_mode']})"
            else:
                what += ", CUDA execution provider"
        try:
            write_config(ModelConfig.from_proto(pb), folder)
        except ConfigError as exc:
            raise DeployError(f"'{name}': its GPU config does not check: {exc.message}") from exc
        changed[name] = what
    return changed
