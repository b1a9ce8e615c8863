"""What each Python-backend model imports beyond NVIDIA's image, as pinned pip requirement lines.

Production runs NVIDIA's ``nvcr.io/nvidia/tritonserver:<yy.mm>-py3``, whose Python backend interpreter has
the standard library of the image's Python, numpy and ``triton_python_backend_utils`` — nothing else. A
``model.py`` that imports anything more fails to load there (and, with model control ``none``, the server
exits). So every third-party import is found here, at build time, by reading the model's code (``ast``,
nothing is imported or run): ``model.py`` and every module beside it in the version folder.

- An import inside ``try:`` whose handler catches ``ImportError`` (or ``ModuleNotFoundError``,
  ``Exception``, a bare ``except``) and does something else than re-raise is *optional*: the model has a
  fallback. It is listed, commented out (``# onnxruntime==1.20.1  # optional: ...``), never required.
- Imports under ``if TYPE_CHECKING:`` never run and are skipped; ``importlib.import_module("x")`` and
  ``__import__("x")`` with a literal name count like ``import x``.
- Import names become distributions through this interpreter's installed metadata
  (``importlib.metadata.packages_distributions``) and are pinned to the versions installed here. An import
  nothing here provides stays unpinned under its import name (pip refuses it at image build time, which
  is where it should fail, not in a pod).

Modules of tritonforge that a model imports from its own folder (:data:`SHIPPED_MODULES`: the error
accounting every generated Python model carries) are never requirements: the writer puts each beside the
code that imports it (:func:`ship_modules`), so they are local to the model like any module beside it.

The result is written at build time as ``<model>/<version>/requirements.txt`` (see
:func:`write_requirements`; the repository writer does it for every Python model it writes), where
``deploy``'s server image installs it from, and ``tritonforge validate --target IMAGE`` compares what each
model needs with what its ``requirements.txt`` declares.

Example::

    >>> python_requirements(Path("model_repository"))  # doctest: +SKIP
    {'my_model': ['scikit-learn==1.5.2', '# onnxruntime==1.20.1  # optional: model.py:12 has a fallback']}
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from tritonforge import error_accounting
from tritonforge.config import ModelConfig, read_model_dir
from tritonforge.errors import TritonForgeError

__all__ = [
    "DEFAULT_TARGET",
    "IMAGE_MODULES",
    "REQUIREMENTS_FILE",
    "SHIPPED_MODULES",
    "Import",
    "ModelRequirements",
    "Requirement",
    "declared_requirements",
    "model_requirements",
    "module_imports",
    "python_requirements",
    "requirements_text",
    "ship_modules",
    "stdlib_modules",
    "target_python",
    "write_requirements",
]

#: NVIDIA's image the embedded binary matches (Triton 2.51 is the 24.10 container)
DEFAULT_TARGET = "nvcr.io/nvidia/tritonserver:24.10-py3"
#: what the Python backend's interpreter has in NVIDIA's image besides the standard library
IMAGE_MODULES = frozenset({"numpy", "triton_python_backend_utils", "c_python_backend_utils"})
#: the file beside a Python model's ``model.py`` that declares its third-party requirements
REQUIREMENTS_FILE = "requirements.txt"
#: tritonforge's own modules a Python model may import from its own folder, by the name it imports: NVIDIA's
#: image has no tritonforge, so the writer puts each beside the code that imports it (:func:`ship_modules`)
SHIPPED_MODULES: Mapping[str, Path] = {error_accounting.SHIPPED_AS: Path(error_accounting.__file__)}

# NVIDIA's release notes: 20.xx-22.xx are Ubuntu 20.04 with Python 3.8; 23.01 onwards Ubuntu 22.04 with
# Python 3.10; 24.12 ("Ubuntu 24.04 including Python 3.12") onwards Python 3.12.
_RELEASE_PYTHON: tuple[tuple[tuple[int, int], tuple[int, int]], ...] = (
    ((24, 12), (3, 12)),
    ((23, 1), (3, 10)),
    ((0, 0), (3, 8)),
)
_TAG = re.compile(r"(?:^|[/:])(?:tritonserver:)?(\d{2})\.(\d{2})(?:-py3)?(?:-[\w.-]+)?$")
_PYTHON = re.compile(r"^python(\d)\.(\d{1,2})$")

# Top-level standard-library modules that came or went between 3.8 and 3.13 (public ones; the running
# interpreter's sys.stdlib_module_names gives the rest): {name: (first version with it, first without)}.
_STDLIB_CHANGES: Mapping[str, tuple[tuple[int, int], tuple[int, int]]] = {
    **{name: ((0, 0), (3, 10)) for name in ("_bootlocale", "formatter", "parser", "symbol")},
    **{name: ((3, 9), (9, 9)) for name in ("graphlib", "zoneinfo")},
    "tomllib": ((3, 11), (9, 9)),
    **{name: ((0, 0), (3, 12)) for name in ("asynchat", "asyncore", "distutils", "imp", "smtpd")},
    **{
        name: ((0, 0), (3, 13))
        for name in (
            "aifc",
            "audioop",
            "cgi",
            "cgitb",
            "chunk",
            "crypt",
            "imghdr",
            "lib2to3",
            "mailcap",
            "msilib",
            "nis",
            "nntplib",
            "ossaudiodev",
            "pipes",
            "sndhdr",
            "spwd",
            "sunau",
            "telnetlib",
            "uu",
            "xdrlib",
        )
    },
}
_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


@dataclass(frozen=True)
class Import:
    """One import a model's code makes: the top-level module, where, and whether it has a fallback."""

    module: str
    file: str
    line: int
    optional: bool = False

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Requirement:
    """A third-party package a model needs: its import name, the distribution and version that provide it
    here (``None`` when nothing installed here does), and whether the model has a fallback without it."""

    module: str
    distribution: str | None
    version: str | None
    optional: bool
    where: str

    @property
    def name(self) -> str:
        """The pip name (the import name when nothing here provides it)."""
        return self.distribution or self.module

    def line(self) -> str:
        """The pip requirement line: ``dist==version``; commented out with the reason when optional."""
        pinned = f"{self.distribution}=={self.version}" if self.distribution and self.version else self.module
        if self.optional:
            return f"# {pinned}  # optional: {self.where} has a fallback without it"
        if self.distribution is None:
            return f"{pinned}  # not installed where this was built: pin it by hand"
        return pinned


@dataclass(frozen=True)
class ModelRequirements:
    """What one Python-backend model imports beyond the target image, and what it declares."""

    model: str
    python: tuple[int, int]
    requirements: tuple[Requirement, ...]
    #: normalised distribution names its ``requirements.txt`` files declare (empty: none written)
    declared: frozenset[str] = field(default_factory=frozenset)

    @property
    def required(self) -> tuple[Requirement, ...]:
        return tuple(r for r in self.requirements if not r.optional)

    @property
    def optional(self) -> tuple[Requirement, ...]:
        return tuple(r for r in self.requirements if r.optional)

    @property
    def undeclared(self) -> tuple[Requirement, ...]:
        """Required packages that no ``requirements.txt`` of the model names."""
        return tuple(r for r in self.required if _normalise(r.name) not in self.declared)

    def lines(self) -> list[str]:
        """Pip requirement lines: the required ones, then the optional ones commented out."""
        return [r.line() for r in self.required] + [r.line() for r in self.optional]


def target_python(target: str = DEFAULT_TARGET) -> tuple[int, int]:
    """The Python version of ``target``: an NVIDIA tag (``nvcr.io/nvidia/tritonserver:24.10-py3``, or
    just ``24.10``) or ``python3.X``.

    Raises:
        ValueError: for anything else, naming the two forms.
    """
    if not isinstance(target, str):
        raise TypeError(f"target must be a str, not {type(target).__name__}")
    match = _PYTHON.match(target.strip())
    if match:
        return int(match[1]), int(match[2])
    match = _TAG.search(target.strip())
    if match:
        release = int(match[1]), int(match[2])
        return next(python for first, python in _RELEASE_PYTHON if release >= first)
    raise ValueError(
        f"target {target!r} is neither NVIDIA's image tag (e.g. {DEFAULT_TARGET}, or 24.10) nor a "
        "Python version (e.g. python3.10)"
    )


@lru_cache(maxsize=8)
def stdlib_modules(python: tuple[int, int]) -> frozenset[str]:
    """The top-level standard-library module names of Python ``python`` (3.8 to 3.13)."""
    names = set(sys.stdlib_module_names) | set(_STDLIB_CHANGES)
    return frozenset(
        name
        for name in names
        if name not in _STDLIB_CHANGES or _STDLIB_CHANGES[name][0] <= python < _STDLIB_CHANGES[name][1]
    )


def module_imports(path: Path) -> list[Import]:
    """Every absolute import in the Python file ``path`` (top-level module names), in order.

    Raises:
        RepositoryError: the file can't be read or is not valid Python.
    """
    from tritonforge.errors import RepositoryError

    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError) as exc:
        raise RepositoryError(f"can't read the imports of {path}: {exc}; fix the file") from None
    found: list[Import] = []
    _Imports(path.name, found).visit(tree)
    return found


class _Imports(ast.NodeVisitor):
    def __init__(self, file: str, found: list[Import]) -> None:
        self.file = file
        self.found = found
        self.guarded = 0  # depth of try bodies with an ImportError fallback

    def _add(self, module: str, node: ast.AST) -> None:
        top = module.split(".")[0]
        if top:
            self.found.append(Import(top, self.file, getattr(node, "lineno", 0), self.guarded > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self._add(node.module, node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if (
            name in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            self._add(node.args[0].value, node)
        self.generic_visit(node)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        fallback = any(_has_fallback(handler) for handler in node.handlers)
        self.guarded += fallback
        for child in node.body:
            self.visit(child)
        self.guarded -= fallback
        rest: list[ast.AST] = [*node.handlers, *node.orelse, *node.finalbody]
        for other in rest:
            self.visit(other)

    visit_TryStar = visit_Try


def _has_fallback(handler: ast.ExceptHandler) -> bool:
    """Whether ``handler`` catches a failed import and goes on (anything but re-raising)."""
    caught = handler.type
    names: list[ast.expr] = (
        [] if caught is None else list(caught.elts) if isinstance(caught, ast.Tuple) else [caught]
    )
    catches = caught is None or any(
        (n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else "")
        in _IMPORT_ERRORS
        for n in names
    )
    return catches and not all(isinstance(statement, ast.Raise) for statement in handler.body)


def _code_files(version_dir: Path) -> list[Path]:
    """``model.py`` and the modules beside it (sub-packages too), caches skipped."""
    return sorted(p for p in version_dir.rglob("*.py") if "__pycache__" not in p.parts and p.is_file())


def _local_modules(version_dir: Path) -> set[str]:
    """Top-level names importable from the version folder itself (the stub puts it on ``sys.path``)."""
    return {p.stem for p in version_dir.glob("*.py")} | {
        p.name for p in version_dir.iterdir() if p.is_dir() and (p / "__init__.py").is_file()
    }


def _distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _requirement(imp: Import, distributions: Mapping[str, list[str]]) -> list[Requirement]:
    dists = sorted(set(distributions.get(imp.module, [])))
    if not dists:
        return [Requirement(imp.module, None, None, imp.optional, imp.where)]
    found = []
    for dist in dists:
        try:
            meta = importlib.metadata.metadata(dist)
            found.append(Requirement(imp.module, meta["Name"], meta["Version"], imp.optional, imp.where))
        except importlib.metadata.PackageNotFoundError:
            found.append(Requirement(imp.module, dist, None, imp.optional, imp.where))
    return found


def _python_model_dirs(
    repo: Path, configs: Mapping[str, ModelConfig] | None = None
) -> list[tuple[str, list[Path]]]:
    from tritonforge.repository.checker import model_dirs
    from tritonforge.repository.writer import versions

    found = []
    for model_dir in model_dirs(repo):
        try:
            config = read_model_dir(model_dir) if configs is None else configs.get(model_dir.name)
        except TritonForgeError:
            continue  # `validate` reports a config it can't read on its own
        if config is None:
            continue  # read already, and it failed
        if config.backend == "python":
            found.append((model_dir.name, [model_dir / str(v) for v in versions(model_dir)]))
    return found


def model_requirements(
    repo: str | Path, target: str = DEFAULT_TARGET, *, configs: Mapping[str, ModelConfig] | None = None
) -> list[ModelRequirements]:
    """What each Python-backend model of ``repo`` imports beyond ``target``'s Python backend, by model name;
    ``configs``: the repository's configs already read (:func:`check_repository_configs`), else read here.

    Raises:
        RepositoryError: ``repo`` is not a folder, or a model's code is not readable Python.
        ValueError: ``target`` is neither an NVIDIA tag nor ``python3.X``.
    """
    from tritonforge.errors import RepositoryError

    root = Path(repo)
    python = target_python(target)
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a folder; give the repository's path")
    distributions = _distributions()
    results = []
    for name, version_dirs in _python_model_dirs(root, configs):
        merged: list[Requirement] = []
        declared: set[str] = set()
        for version_dir in version_dirs:
            declared |= declared_requirements(version_dir / REQUIREMENTS_FILE)
            merged.extend(_version_requirements(version_dir, python, distributions))
        results.append(ModelRequirements(name, python, _merge(merged), frozenset(declared)))
    return results


def _version_requirements(
    version_dir: Path, python: tuple[int, int], distributions: Mapping[str, list[str]]
) -> tuple[Requirement, ...]:
    available = stdlib_modules(python) | IMAGE_MODULES | _local_modules(version_dir)
    found = [
        req
        for path in _code_files(version_dir)
        for imp in module_imports(path)
        if imp.module not in available
        for req in _requirement(imp, distributions)
    ]
    return _merge(found)


def _merge(requirements: Iterable[Requirement]) -> tuple[Requirement, ...]:
    """One entry per package (required anywhere wins over optional elsewhere), required ones first."""
    kept: dict[str, Requirement] = {}
    for req in requirements:
        key = _normalise(req.name)
        if key not in kept or (kept[key].optional and not req.optional):
            kept[key] = req
    return tuple(sorted(kept.values(), key=lambda r: (r.optional, _normalise(r.name))))


def python_requirements(
    repo: Path, target: str = DEFAULT_TARGET, *, configs: Mapping[str, ModelConfig] | None = None
) -> dict[str, list[str]]:
    """For every Python-backend model of ``repo``: the pip requirement lines of what its code imports
    beyond the Python backend of NVIDIA's image ``target`` (its Python's standard library, numpy and
    ``triton_python_backend_utils``).

    Required packages come first, pinned to the versions installed here (``tokenizers==0.20.3``);
    imports with a fallback follow, commented out. A model that needs nothing has an empty list.

    Raises:
        RepositoryError: ``repo`` is not a folder, or a model's code is not readable Python.
        ValueError: ``target`` is neither an NVIDIA tag nor ``python3.X``.
    """
    return {m.model: m.lines() for m in model_requirements(repo, target, configs=configs)}


def requirements_text(lines: Iterable[str], target: str = DEFAULT_TARGET) -> str:
    """A ``requirements.txt`` holding ``lines``, headed by what it is for."""
    head = (
        f"# third-party packages this model imports beyond {target}'s Python backend\n"
        "# (written by tritonforge; pinned to the versions it was built with)\n"
    )
    return head + "".join(f"{line}\n" for line in lines)


def write_requirements(version_dir: Path, target: str = DEFAULT_TARGET) -> Path | None:
    """Write ``requirements.txt`` into a Python model's version folder from the code in it; returns the
    file, or None (and removes a stale one) when the code imports nothing beyond ``target``.

    Raises:
        RepositoryError: the code is not readable Python.
    """
    found = _version_requirements(version_dir, target_python(target), _distributions())
    out = version_dir / REQUIREMENTS_FILE
    if not found:
        out.unlink(missing_ok=True)
        return None
    out.write_text(requirements_text([r.line() for r in found], target), encoding="utf-8")
    return out


def ship_modules(version_dir: Path, *, python_model: bool = True) -> list[str]:
    """Put each of :data:`SHIPPED_MODULES` beside the code in ``version_dir`` that imports it, and remove
    one that no code there imports any more (all of them when it is not a ``python_model``'s folder);
    returns the file names shipped. A file is written anew, never through a hard link it may share with
    another version.

    Raises:
        RepositoryError: the code of a Python model is not readable Python.
    """
    shipped = {f"{name}.py": source for name, source in SHIPPED_MODULES.items()}
    imported = {
        imp.module
        for path in (_code_files(version_dir) if python_model else [])
        if path.parent != version_dir or path.name not in shipped
        for imp in module_imports(path)
    }
    kept = []
    for filename, source in shipped.items():
        target = version_dir / filename
        if Path(filename).stem not in imported:
            target.unlink(missing_ok=True)
            continue
        text = source.read_bytes()
        if not target.is_file() or target.read_bytes() != text:
            target.unlink(missing_ok=True)
            target.write_bytes(text)
        kept.append(filename)
    return kept


def declared_requirements(path: Path) -> set[str]:
    """The normalised distribution names a requirements file declares (commented lines don't count)."""
    if not path.is_file():
        return set()
    names = set()
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        if match:
            names.add(_normalise(match[0]))
    return names


def _normalise(name: str) -> str:
    """PEP 503's normal form of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()
