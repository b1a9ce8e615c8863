"""Thread settings every generated config carries, so no model leaves a thread pool at its default.

A server hosts many models; each onnxruntime or libtorch instance left at its defaults sizes its intra-op
pool to every core and (onnxruntime) lets idle workers spin, so the models fight over the cores. The
parameter names are those of Triton's C++ backends (honoured by our Python-based ones too), so a
repository written here runs the same on NVIDIA's container.
"""

from __future__ import annotations

import os

from tritonforge.config import InstanceGroup, InstanceKind, ModelConfig

__all__ = [
    "DEFAULT_INTRA_OP_THREADS",
    "available_cpus",
    "onnxruntime_thread_parameters",
    "pytorch_thread_parameters",
    "with_layout",
]

#: intra-op threads per instance: one serves batch-1 traffic best when several models share the cores;
#: a model that needs more (a large encoder) gets it by measurement (``tune --write``) or by hand
DEFAULT_INTRA_OP_THREADS = 1


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _count(value: int, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return str(value)


def onnxruntime_thread_parameters(
    intra_op_threads: int = DEFAULT_INTRA_OP_THREADS, inter_op_threads: int = 1, *, spinning: bool = False
) -> dict[str, str]:
    """Config parameters for an ``onnxruntime_onnx`` model: explicit thread counts, spinning off.

    Example:
        >>> onnxruntime_thread_parameters(2)["intra_op_thread_count"]
        '2'

    Raises:
        ValueError: a thread count is not a positive integer.
    """
    spin = "1" if spinning else "0"
    return {
        "intra_op_thread_count": _count(intra_op_threads, "intra_op_threads"),
        "inter_op_thread_count": _count(inter_op_threads, "inter_op_threads"),
        "session.intra_op.allow_spinning": spin,
        "session.inter_op.allow_spinning": spin,
    }


def pytorch_thread_parameters(
    intra_op_threads: int = DEFAULT_INTRA_OP_THREADS, inter_op_threads: int = 1
) -> dict[str, str]:
    """Config parameters for a ``pytorch_libtorch`` model (Triton's pytorch backend keys).

    Raises:
        ValueError: a thread count is not a positive integer.
    """
    return {
        "INTRA_OP_THREAD_COUNT": _count(intra_op_threads, "intra_op_threads"),
        "INTER_OP_THREAD_COUNT": _count(inter_op_threads, "inter_op_threads"),
    }


def with_layout(config: ModelConfig, instances: int, intra_op_threads: int) -> ModelConfig:
    """``config`` served as ``instances`` instances (of its first group's kind) of ``intra_op_threads``
    intra-op threads each: the thread parameters of its platform (ONNX: spinning off), others kept.

    Raises:
        ValueError: a count is not a positive integer, or the platform is not threaded by our backends.
    """
    _count(instances, "instances")
    kind = config.instance_groups[0].kind if config.instance_groups else InstanceKind.CPU
    platform = config.platform or config.backend or ""
    if platform in ("onnxruntime_onnx", "onnxruntime"):
        threads = onnxruntime_thread_parameters(intra_op_threads)
    elif platform in ("pytorch_libtorch", "pytorch"):
        threads = pytorch_thread_parameters(intra_op_threads)
    else:
        raise ValueError(
            f"model '{config.name}' ({platform or 'no platform'}) has no intra-op threads to set"
        )
    return config.replace(
        instance_groups=(InstanceGroup(count=instances, kind=kind),),
        parameters={**config.parameters, **threads},
    )
