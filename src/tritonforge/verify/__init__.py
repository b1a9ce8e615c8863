"""Comparing an artifact with its source: tolerances, per-output reports, the artifact record.

A neutral layer below ``export`` and ``quantize`` (both verify what they produce with it).
"""

from tritonforge.verify.compare import Artifact, Report, Tolerance, compare, merge_reports

__all__ = ["Artifact", "Report", "Tolerance", "compare", "merge_reports"]
