"""Model repositories: the one writer (atomic), and offline and live checks."""

from tritonforge.repository.checker import LiveResult, Problem, check_live, check_repository, sample_inputs
from tritonforge.repository.writer import (
    DEFAULT_MAX_BATCH_SIZE,
    MODEL_FILENAMES,
    add_model,
    file_sha256,
    infer_config,
    model_filename,
    next_version,
    versions,
)

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "MODEL_FILENAMES",
    "LiveResult",
    "Problem",
    "add_model",
    "check_live",
    "check_repository",
    "file_sha256",
    "infer_config",
    "model_filename",
    "next_version",
    "sample_inputs",
    "versions",
]
