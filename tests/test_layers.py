"""Layers point down only (ARCHITECTURE.md): every import inside the package is checked against the order.

    commands → examples → (batch, rollout, deploy, observe, loadtest) → (client, server, ensemble, registry)
             → repository → (export, quantize) → verify → config → files → (errors, atomic, error_accounting)

Packages on one line do not import each other; the client imports nothing of ours but ``errors`` (apps
import it alone). A new top-level package or module must be placed in ``LAYERS`` before its first import
is accepted — that is how batch/, rollout/, deploy/ and observe/ (placed already) stay covered when they
land. Function-local imports count too: a lazy import still points the way it points.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tritonforge

PACKAGE = Path(tritonforge.__file__).resolve().parent

#: lowest first; one tuple is one layer
LAYERS: tuple[tuple[str, ...], ...] = (
    # atomic: the one atomic file write; error_accounting: what our Python models count and raise (stdlib
    # only, shipped beside generated models); neither imports anything of ours
    ("errors", "atomic", "error_accounting"),
    # reading files from outside (regular files only, size bounds, strict YAML): everything reads with it
    ("files",),
    ("config",),
    ("verify",),
    ("export", "quantize"),
    ("repository",),
    ("client", "server", "ensemble", "registry"),
    ("batch", "rollout", "deploy", "observe", "loadtest"),
    # the example builders and the demo use the product as a user would, drift profiles included
    ("examples",),
    ("commands",),
    ("cli",),
    ("__main__",),
)
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}
#: what a unit may import besides itself, when narrower than "anything below"
ONLY = {"client": {"errors"}}


def unit_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def imported_modules(path: Path) -> list[tuple[int, list[str], list[str]]]:
    """(line, module path split on dots, names imported) for every import in ``path``, relative ones
    resolved (``import a.b`` gives no names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[tuple[int, list[str], list[str]]] = []
    package_parts = ("tritonforge", *path.relative_to(PACKAGE).parent.parts)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name.split("."), []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                parts = [*base, *(node.module or "").split(".")] if node.module else list(base)
            else:
                parts = (node.module or "").split(".")
            found.append((node.lineno, parts, [a.name for a in node.names]))
    return found


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, tritonforge unit imported, names imported) for every import of ours in ``path``."""
    found: list[tuple[int, str, list[str]]] = []
    for line, parts, names in imported_modules(path):
        if parts[0] != "tritonforge":
            continue
        if not names:  # import tritonforge.x
            found.append((line, parts[1] if len(parts) > 1 else "", []))
        elif len(parts) > 1 and parts[1]:
            found.append((line, parts[1], names))
        else:  # `from tritonforge import x`: x is a unit, or a name of the package root
            for name in names:
                found.append((line, name if name in RANK else "", [name]))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_unit_of_the_package_has_a_layer() -> None:
    units = {unit_of(p) for p in SOURCES} - {"__init__"}
    assert sorted(units - set(RANK)) == [], "place the new package in LAYERS (tests/test_layers.py)"


def violations() -> list[str]:
    found: list[str] = []
    for path in SOURCES:
        unit = unit_of(path)
        if unit == "__init__":
            continue  # the package root is the facade: it re-exports from every layer
        for line, target, names in imports_of(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if target == unit:
                continue
            if target == "":
                if names != ["__version__"]:
                    found.append(f"{where}: {unit} imports {names} from the package root (import the unit)")
                continue
            if target not in RANK:
                found.append(f"{where}: {unit} imports {target}, which has no layer")
            elif unit in ONLY and target not in ONLY[unit]:
                found.append(f"{where}: {unit} may import only {sorted(ONLY[unit])}, not {target}")
            elif RANK[target] >= RANK.get(unit, -1):
                found.append(
                    f"{where}: {unit} (layer {RANK.get(unit)}) imports {target} (layer {RANK[target]})"
                )
    return found


def test_imports_point_down_only() -> None:
    assert violations() == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from tritonforge.server import EmbeddedServer\n", "repository (layer 5) imports server (layer 6)"),
        ("def f():\n    from tritonforge.client import Client\n", "repository (layer 5) imports client"),
        ("from ..ensemble import compile_specs\n", "repository (layer 5) imports ensemble (layer 6)"),
    ],
)
def test_the_check_catches_an_upward_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source, expected
):
    # The checker itself must be able to fail: plant an upward import in a copy of a lower layer.
    fake = tmp_path / "tritonforge"
    (fake / "repository").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    planted = fake / "repository" / "planted.py"
    planted.write_text(source)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    monkeypatch.setattr(__import__(__name__), "SOURCES", [planted])
    assert any(expected in v for v in violations())


#: the most lines a module of src/ may have; a data table (its module docstring says "data table") is exempt
MAX_LINES = 600


def _lines_and_doc(path: Path) -> tuple[int, str]:
    text = path.read_text(encoding="utf-8")
    return text.count("\n") + (not text.endswith("\n") and bool(text)), ast.get_docstring(
        ast.parse(text)
    ) or ""


def test_no_module_is_over_600_lines() -> None:
    too_long = {}
    for path in SOURCES:
        lines, doc = _lines_and_doc(path)
        if lines > MAX_LINES and "data table" not in doc.lower():
            too_long[str(path.relative_to(PACKAGE.parent))] = lines
    assert too_long == {}, f"split these modules along their seams (at most {MAX_LINES} lines each)"


def private_reach_ins() -> set[str]:
    """``unit -> target.module[.name]`` for every import of another unit's private module or name (``_x``)."""
    found: set[str] = set()
    for path in SOURCES:
        unit = unit_of(path)
        for _, parts, names in imported_modules(path):
            if len(parts) < 2 or parts[0] != "tritonforge" or parts[1].removesuffix(".py") == unit:
                continue
            target = ".".join(parts[1:])
            if any(p.startswith("_") and not p.startswith("__") for p in parts[2:]):
                found.add(f"{unit} -> {target}")
            found.update(
                f"{unit} -> {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")
            )
    return found


def test_no_package_imports_another_packages_private_module_or_name() -> None:
    assert sorted(private_reach_ins()) == [], "make it public API of its package (in __all__), or move it"


def test_the_private_check_catches_a_reach_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "tritonforge"
    (fake / "observe").mkdir(parents=True)
    planted = fake / "observe" / "planted.py"
    planted.write_text("from tritonforge.client._stats import split\nfrom tritonforge.server import _port\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    monkeypatch.setattr(__import__(__name__), "SOURCES", [planted])
    assert private_reach_ins() == {"observe -> client._stats", "observe -> server._port"}
