"""Entry point kept for a checkout; the builder ships as `tritonforge.examples.build_minilm`."""

from __future__ import annotations

import sys

from tritonforge.examples.build_minilm import build, main

__all__ = ["build", "main"]

if __name__ == "__main__":
    sys.exit(main())
