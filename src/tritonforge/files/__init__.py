"""Files from outside, read safely: regular files only, a stated size bound, YAML with bounds and unique keys.

Every file the tools read (model files, configs, specs, SLO files, drift profiles, the audit log, sample
arrays) goes through these helpers, so that a symlink to ``/dev/zero``, a FIFO, a folder, a huge file, an
alias bomb or a key written twice is one clear line at once, never a hang, an OOM kill or a silent choice.
"""

from tritonforge.files.reading import (
    MAX_DOCUMENT_BYTES,
    MAX_LINE_BYTES,
    MAX_MODEL_BYTES,
    MAX_ONNX_BYTES,
    ErrorFactory,
    Reason,
    check_regular,
    copy_file,
    copy_tree,
    file_kind,
    human_size,
    iter_lines,
    open_regular,
    read_bytes,
    read_text,
)
from tritonforge.files.yamltext import (
    MAX_YAML_NESTING,
    MAX_YAML_NODES,
    load_yaml,
    load_yaml_documents,
    read_yaml,
)

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_LINE_BYTES",
    "MAX_MODEL_BYTES",
    "MAX_ONNX_BYTES",
    "MAX_YAML_NESTING",
    "MAX_YAML_NODES",
    "ErrorFactory",
    "Reason",
    "check_regular",
    "copy_file",
    "copy_tree",
    "file_kind",
    "human_size",
    "iter_lines",
    "load_yaml",
    "load_yaml_documents",
    "open_regular",
    "read_bytes",
    "read_text",
    "read_yaml",
]
