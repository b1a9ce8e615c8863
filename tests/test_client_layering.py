"""The client package is imported by apps on its own: it may use nothing of tritonforge but the errors."""

from __future__ import annotations

import ast
from pathlib import Path

import tritonforge.client

CLIENT = Path(tritonforge.client.__file__).parent
ALLOWED = ("tritonforge.client", "tritonforge.errors")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_client_package_imports_nothing_of_tritonforge_but_errors() -> None:
    wrong = {
        f"{path.name}: {name}"
        for path in CLIENT.rglob("*.py")
        for name in _imports(path)
        if (name == "tritonforge" or name.startswith("tritonforge."))
        and not any(name == a or name.startswith(a + ".") for a in ALLOWED)
    }
    assert wrong == set()
