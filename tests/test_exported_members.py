"""``__all__`` is honest: each listed name exists, is listed once, and the public API is re-exported."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

import tritonforge

PACKAGE = Path(tritonforge.__file__).resolve().parent
#: every subpackage (a folder with an __init__.py: new ones are covered when they land)
SUBPACKAGES = sorted(
    "tritonforge." + ".".join(p.parent.relative_to(PACKAGE).parts)
    for p in PACKAGE.rglob("__init__.py")
    if p.parent != PACKAGE
)
MODULES = sorted(
    {
        "tritonforge",
        "tritonforge.errors",
        "tritonforge.client.policies",
        "tritonforge.client.observe",
        "tritonforge.client.shm",
        "tritonforge.client.stats",
        "tritonforge.client.wire",
        *(f"tritonforge.observe.{m}" for m in ("metrics", "monitor", "slo", "drift", "sampler", "logs")),
        "tritonforge.observe.cost",
        *SUBPACKAGES,
    }
)


def test_every_subpackage_is_covered() -> None:
    assert {"tritonforge.client", "tritonforge.verify", "tritonforge.examples"} <= set(SUBPACKAGES)


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_only_names_the_module_has(name: str) -> None:
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), list), f"{name} has no __all__"
    missing = [member for member in module.__all__ if not hasattr(module, member)]
    assert missing == []


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_each_name_once(name: str) -> None:
    module = importlib.import_module(name)
    assert len(module.__all__) == len(set(module.__all__))


@pytest.mark.parametrize(
    "name", ["tritonforge.errors", "tritonforge.client.policies", "tritonforge.client.stats"]
)
def test_all_lists_every_public_class_defined_in_the_module(name: str) -> None:
    module = importlib.import_module(name)
    defined = {
        n
        for n, obj in vars(module).items()
        if inspect.isclass(obj) and obj.__module__ == name and not n.startswith("_")
    }
    assert defined - set(module.__all__) == set()


def test_package_root_reexports_the_clients_and_policies() -> None:
    import tritonforge.client as client

    for member in [
        "Client",
        "AsyncClient",
        "RetryPolicy",
        "RetryBudget",
        "Deadline",
        "Fallback",
        "TrafficSplit",
        "Variant",
        "Shadow",
        "CircuitBreaker",
        "HealthCheck",
        "Placement",
        "SharedMemory",
        "TLSConfig",
    ]:
        assert member in tritonforge.__all__
        assert getattr(tritonforge, member) is getattr(client, member)


def test_package_root_reexports_every_error() -> None:
    import tritonforge.errors as errors

    assert set(errors.__all__) <= set(tritonforge.__all__)


def test_importing_the_package_does_not_load_the_client() -> None:
    # Triton's backend stub imports tritonforge in its own interpreter, where the client's deps may not load.
    import subprocess
    import sys

    code = "import sys, tritonforge; print(sorted({'grpc', 'prometheus_client'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
