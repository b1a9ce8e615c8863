"""The examples, shipped in the wheel: the model builders, the example pipelines and the demo.

``pip install tritonforge[examples]`` then ``tritonforge build`` / ``tritonforge demo`` work from any folder;
``tools/build_*.py`` in a checkout are thin entry points to the builders here.

=====================  ==========================================================================
``build_digits``       three sklearn digits classifiers (ONNX), registered with their figures
``build_minilm``       all-MiniLM-L6-v2: ONNX FP32 (v1) and dynamic INT8 (v2), checked on real text
``ensembles/``         the example pipeline specs (``digits_vote``, ``digits_routed``, ``text_embedding``)
``demo``               the main job: build, serve the pipelines, ONNX vs TorchScript side by side
=====================  ==========================================================================
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUILDERS", "SPECS_DIR", "builder_module"]

#: the example pipeline specs (the project's ``ensembles/`` folder, shipped with the package)
SPECS_DIR = Path(__file__).resolve().parent / "ensembles"
#: the example model builders, in build order (``python -m tritonforge.examples.build_<name>``)
BUILDERS = ("digits", "minilm")


def builder_module(name: str) -> str:
    """The module that builds example ``name`` (one of :data:`BUILDERS`).

    Raises:
        ValueError: ``name`` is not an example builder.
    """
    if name not in BUILDERS:
        raise ValueError(f"no example builder '{name}'; the builders are {list(BUILDERS)}")
    return f"tritonforge.examples.build_{name}"
