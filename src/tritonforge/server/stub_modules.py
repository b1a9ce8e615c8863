"""Modules a stub of our Python-based backends loads only when something in it uses them.

A stub is one process per model instance, so every module it imports is paid once per loaded model, in
memory and in the CPU time of each load. Two imports are larger than what serving uses:

- numpy imports ``random``, ``ma``, ``polynomial``, ``fft`` and ``ctypeslib`` with itself (numpy 1.x),
  and ``ast``, ``pickle`` and ``textwrap`` for functions a stub never calls: ~4.7 MiB of private memory
  and ~20 ms of a stub's start, which neither Triton's utilities, our runtime, onnxruntime nor a request
  use (``random`` also loads OpenSSL's libcrypto through ``hashlib``).
- Triton's stub asks ``asyncio.iscoroutine`` of what every ``execute`` returns (to run an ``async def
  execute``): importing asyncio for that costs ~3.3 MiB (socket, ssl, subprocess, logging...).

Each is held by a stand-in module in ``sys.modules`` that imports the real one, which takes its place
(in ``sys.modules`` and as its package's attribute), the first time anything is asked of it. Standard
library only: this module runs before numpy is imported.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["NUMPY_ON_DEMAND", "AsyncioOnDemand", "OnDemandModule", "defer_asyncio", "defer_numpy_extras"]

#: what ``import numpy`` (1.x) loads and a serving stub never uses: numpy's submodules, and the standard
#: library modules numpy imports at its top for functions a stub never calls (``ast`` for buffer-format
#: parsing, ``pickle`` for loading and saving, ``textwrap`` for help texts)
NUMPY_ON_DEMAND = (
    "numpy.random",
    "numpy.ma",
    "numpy.polynomial",
    "numpy.fft",
    "numpy.ctypeslib",
    "ast",
    "pickle",
    "textwrap",
)


class OnDemandModule(types.ModuleType):
    """Stands in ``sys.modules`` for a module until anything is asked of it (an attribute, a name
    imported from it, a submodule): then the real module is imported, replaces this one, and answers."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real(), name)

    def _real(self) -> types.ModuleType:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        # the import system binds the real module as its package's attribute, where this one was
        return importlib.import_module(self.__name__)


class AsyncioOnDemand(OnDemandModule):
    """``asyncio`` in a stub of our backends: answers ``iscoroutine`` for the list every ``execute``
    returns; any other object, attribute or submodule imports the real asyncio."""

    def iscoroutine(self, obj: object) -> bool:
        return False if type(obj) is list else bool(self._real().iscoroutine(obj))


def defer_asyncio() -> None:
    """Let ``asyncio`` load only if something in this stub needs it (see :class:`AsyncioOnDemand`); a
    framework that imported it already (torch does) keeps it."""
    if "asyncio" not in sys.modules:
        sys.modules["asyncio"] = AsyncioOnDemand("asyncio")


def defer_numpy_extras() -> None:
    """Before numpy's first import: the modules in :data:`NUMPY_ON_DEMAND` load on first use. Nothing
    changes once numpy is imported (they are loaded already) or for one imported already."""
    if "numpy" in sys.modules:
        return
    for name in NUMPY_ON_DEMAND:
        sys.modules.setdefault(name, OnDemandModule(name))
