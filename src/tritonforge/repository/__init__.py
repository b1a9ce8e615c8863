"""Model repositories: the one writer (atomic, staged outside the repository) and the offline checks."""

from tritonforge.repository.audit import AUDIT_LOG, record_event
from tritonforge.repository.checker import Problem, check_repository, sample_inputs
from tritonforge.repository.requirements import (
    ModelRequirements,
    model_requirements,
    python_requirements,
)
from tritonforge.repository.threads import (
    DEFAULT_INTRA_OP_THREADS,
    available_cpus,
    onnxruntime_thread_parameters,
    pytorch_thread_parameters,
    with_layout,
)
from tritonforge.repository.writer import (
    DEFAULT_MAX_BATCH_SIZE,
    MODEL_FILENAMES,
    RepositoryWrite,
    add_model,
    amend_version,
    file_sha256,
    infer_config,
    model_filename,
    next_version,
    versions,
)

__all__ = [
    "AUDIT_LOG",
    "DEFAULT_INTRA_OP_THREADS",
    "DEFAULT_MAX_BATCH_SIZE",
    "MODEL_FILENAMES",
    "ModelRequirements",
    "Problem",
    "RepositoryWrite",
    "add_model",
    "amend_version",
    "available_cpus",
    "check_repository",
    "file_sha256",
    "infer_config",
    "model_filename",
    "model_requirements",
    "next_version",
    "onnxruntime_thread_parameters",
    "python_requirements",
    "pytorch_thread_parameters",
    "record_event",
    "sample_inputs",
    "versions",
    "with_layout",
]
