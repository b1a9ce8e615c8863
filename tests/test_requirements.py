"""What Python models import beyond NVIDIA's image: found offline, pinned, declared, checked by validate."""

from __future__ import annotations

import importlib.metadata
import textwrap
from pathlib import Path

import pytest

from cli_runner import run_tritonforge
from tritonforge import error_accounting
from tritonforge.config import DataType, ModelConfig, TensorSpec
from tritonforge.repository import add_model, amend_version
from tritonforge.repository.requirements import (
    DEFAULT_TARGET,
    REQUIREMENTS_FILE,
    declared_requirements,
    model_requirements,
    module_imports,
    python_requirements,
    stdlib_modules,
    target_python,
)

TOKENIZERS = f"tokenizers=={importlib.metadata.version('tokenizers')}"
ONNXRUNTIME = f"onnxruntime=={importlib.metadata.version('onnxruntime')}"


def python_model(repo: Path, name: str, source: str, *, beside: dict[str, str] | None = None) -> Path:
    """A Python model: ``source`` as model.py (and modules ``beside`` it), written by add_model."""
    work = repo.parent / f"_{name}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "model.py").write_text(textwrap.dedent(source))
    extra = []
    for filename, text in (beside or {}).items():
        (work / filename).write_text(textwrap.dedent(text))
        extra.append(work / filename)
    config = ModelConfig(
        name=name,
        backend="python",
        max_batch_size=8,
        inputs=[TensorSpec(name="IN", dtype=DataType.FP32, dims=[1])],
        outputs=[TensorSpec(name="OUT", dtype=DataType.FP32, dims=[1])],
    )
    return add_model(repo, name, work / "model.py", config, extra_files=extra)


def test_target_python_reads_nvidia_tags_and_python_versions() -> None:
    assert target_python(DEFAULT_TARGET) == (3, 10)
    assert target_python("nvcr.io/nvidia/tritonserver:24.12-py3") == (3, 12)
    assert target_python("25.01") == (3, 12)
    assert target_python("nvcr.io/nvidia/tritonserver:22.12-py3") == (3, 8)
    assert target_python("python3.11") == (3, 11)
    with pytest.raises(ValueError, match="neither NVIDIA's image tag"):
        target_python("ubuntu:latest")


def test_stdlib_modules_follow_the_target_python() -> None:
    assert {"json", "asyncio", "os"} <= stdlib_modules((3, 10))
    assert "tomllib" not in stdlib_modules((3, 10)) and "tomllib" in stdlib_modules((3, 12))
    assert "distutils" in stdlib_modules((3, 10)) and "distutils" not in stdlib_modules((3, 12))
    assert "numpy" not in stdlib_modules((3, 12))


def test_module_imports_marks_guarded_imports_optional(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(
        textwrap.dedent(
            """
            import json, os.path
            from typing import TYPE_CHECKING
            import tokenizers.models
            from . import sibling
            if TYPE_CHECKING:
                import torch
            try:
                import onnxruntime as ort
            except ImportError:
                ort = None
            try:
                import scipy
            except ImportError:
                raise
            def lazy():
                import sklearn
                return importlib.import_module("pandas")
            """
        )
    )
    found = {(i.module, i.optional) for i in module_imports(path)}
    assert found == {
        ("json", False),
        ("os", False),
        ("typing", False),
        ("tokenizers", False),
        ("onnxruntime", True),
        ("scipy", False),  # its handler only re-raises: no fallback
        ("sklearn", False),  # lazy, but without a fallback it fails when it runs
        ("pandas", False),
    }


def test_python_requirements_pins_third_party_imports_and_skips_the_image(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    python_model(
        repo,
        "needs",
        """
        import json
        import numpy as np
        import triton_python_backend_utils as pb_utils
        from tokenizers import Tokenizer
        import helper
        try:
            import onnxruntime
        except ImportError:
            onnxruntime = None
        """,
        beside={"helper.py": "import tokenizers.models\nimport asyncio\n"},
    )
    python_model(repo, "plain", "import json\nimport numpy as np\n")
    found = python_requirements(repo)
    assert found["plain"] == []
    assert found["needs"][0] == TOKENIZERS
    assert found["needs"][1].startswith(f"# {ONNXRUNTIME}  # optional: model.py:")
    assert len(found["needs"]) == 2


def test_writer_declares_a_python_models_requirements_beside_it(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    version = python_model(repo, "needs", "from tokenizers import Tokenizer\n")
    text = (version / REQUIREMENTS_FILE).read_text()
    assert TOKENIZERS in text.splitlines()
    assert declared_requirements(version / REQUIREMENTS_FILE) == {"tokenizers"}
    (model,) = model_requirements(repo)
    assert model.undeclared == ()
    plain = python_model(repo, "plain", "import json\n")
    assert not (plain / REQUIREMENTS_FILE).exists()


def test_writer_ships_our_error_accounting_beside_the_code_that_imports_it_where_it_is_local(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    version = python_model(repo, "counted", f"from {error_accounting.SHIPPED_AS} import settle_errors\n")
    shipped = version / f"{error_accounting.SHIPPED_AS}.py"
    assert shipped.read_bytes() == Path(error_accounting.__file__).read_bytes()
    assert python_requirements(repo) == {"counted": []}  # beside the model: local, nothing to declare
    assert not (version / REQUIREMENTS_FILE).exists()
    plain = python_model(repo, "plain", "import json\n")
    assert not (plain / shipped.name).exists()
    # an amend follows the code: a file that imports it brings it, dropping that code takes it away
    amend_version(repo, "plain", 1, add_files={"model.py": version / "model.py"})
    assert (plain / shipped.name).read_bytes() == shipped.read_bytes()
    amend_version(repo, "plain", 1, add_files={"model.py": tmp_path / "_plain" / "model.py"})
    assert not (plain / shipped.name).exists()
    assert shipped.is_file()  # another model's copy is its own


def test_an_import_nothing_here_provides_stays_unpinned(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    python_model(repo, "odd", "import tritonforge_no_such_package\n")
    (model,) = model_requirements(repo)
    assert model.required[0].distribution is None
    assert model.lines() == [
        "tritonforge_no_such_package  # not installed where this was built: pin it by hand"
    ]


def test_validate_target_lists_each_python_models_needs_and_strict_fails_on_undeclared(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    version = python_model(repo, "needs", "from tokenizers import Tokenizer\n")
    python_model(repo, "plain", "import json\n")
    ok = run_tritonforge("validate", str(repo), "--target", DEFAULT_TARGET, "--strict")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"needs: {TOKENIZERS} (declared)" in ok.stdout
    assert "plain: nothing beyond the image" in ok.stdout
    # the code changes after the build: a new import nobody declared
    (version / "model.py").write_text("from tokenizers import Tokenizer\nimport onnxruntime\n")
    loose = run_tritonforge("validate", str(repo), "--target", DEFAULT_TARGET)
    assert loose.returncode == 0, loose.stdout + loose.stderr
    assert f"{ONNXRUNTIME} (undeclared)" in loose.stdout
    strict = run_tritonforge("validate", str(repo), "--target", DEFAULT_TARGET, "--strict")
    assert strict.returncode == 1
    assert "needs: onnxruntime" in strict.stderr and "requirements.txt" in strict.stderr
    bad = run_tritonforge("validate", str(repo), "--target", "ubuntu:latest")
    assert bad.returncode == 2 and "neither NVIDIA's image tag" in bad.stderr
