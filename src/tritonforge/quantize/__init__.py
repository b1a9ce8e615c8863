"""Quantization of ONNX models (INT8 dynamic / static, FP16) and the figures that verify them."""

from tritonforge.quantize.onnx import (
    DEFAULT_TOLERANCE,
    check_samples,
    quantize_dynamic,
    quantize_static,
    to_fp16,
    verify_onnx,
)
from tritonforge.verify import Report, Tolerance, compare

__all__ = [
    "DEFAULT_TOLERANCE",
    "Report",
    "Tolerance",
    "check_samples",
    "compare",
    "quantize_dynamic",
    "quantize_static",
    "to_fp16",
    "verify_onnx",
]
