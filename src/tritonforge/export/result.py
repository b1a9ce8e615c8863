"""What an export or quantization hands back (defined beside the figures it carries)."""

from __future__ import annotations

from tritonforge.verify import Artifact

__all__ = ["Artifact"]
