"""What a stub of our Python-based backends imports, when, and at which priority.

A stub is one process per model instance, so every module it imports is paid once per loaded model, in
memory and in the CPU time of each load. Two imports are larger than what serving uses:

- numpy imports ``random``, ``ma``, ``polynomial``, ``fft`` and ``ctypeslib`` with itself (numpy 1.x),
  and ``ast``, ``pickle`` and ``textwrap`` for functions a stub never calls: ~4.7 MiB of private memory
  and ~20 ms of a stub's start, which neither Triton's utilities, our runtime, onnxruntime nor a request
  use (``random`` also loads OpenSSL's libcrypto through ``hashlib``).
- Triton's stub asks ``asyncio.iscoroutine`` of what every ``execute`` returns (to run an ``async def
  execute``): importing asyncio for that costs ~3.3 MiB (socket, ssl, subprocess, logging...).

Each is held by a stand-in module in ``sys.modules`` that imports the real one, which takes its place
(in ``sys.modules`` and as its package's attribute), the first time anything is asked of it. What a stub
does import at its start runs below the priority of the models answering requests
(:func:`import_at_low_priority`). Standard library only: this module runs before numpy is imported.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import types
from typing import Any

__all__ = [
    "DEFAULT_LOAD_NICE",
    "LOAD_NICE_ENV",
    "NUMPY_ON_DEMAND",
    "AsyncioOnDemand",
    "OnDemandModule",
    "defer_asyncio",
    "defer_numpy_extras",
    "import_at_low_priority",
    "load_nice",
]

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


#: how many nice steps below the stub's priority a model's load imports run (0: at the stub's priority)
LOAD_NICE_ENV = "TRITONFORGE_LOAD_NICE"
DEFAULT_LOAD_NICE = 10


def load_nice() -> int:
    """The nice steps :func:`import_at_low_priority` adds: ``$TRITONFORGE_LOAD_NICE`` (0-19), else 10.

    Raises:
        ValueError: the variable is not a whole number from 0 to 19 (the model's load fails with this).
    """
    text = os.environ.get(LOAD_NICE_ENV, "").strip()
    if not text:
        return DEFAULT_LOAD_NICE
    if not text.isdigit() or int(text) > 19:
        raise ValueError(f"{LOAD_NICE_ENV}={text!r}: give a whole number from 0 (off) to 19")
    return int(text)


def import_at_low_priority(names: tuple[str, ...]) -> None:
    """Import ``names`` in a thread :func:`load_nice` steps below this one's priority, and wait for it.

    Our backends import numpy and their runtime this way: about half of the ~80 ms of CPU a small ONNX
    model's stub takes to start. A model loaded while others answer requests (the model cache loads on a
    request's miss) takes that CPU from them. Nice values are per thread on Linux and an unprivileged
    process can't lower one again, so the imports run in a thread of their own: the stub's main thread,
    which serves the model's requests, and every thread it starts keep the stub's priority. Only imports
    that start no thread belong here (a thread started in that thread would keep its lower priority):
    the frameworks start threads as they load and are imported as usual. Where the priority can't be
    changed, the imports run at the stub's.
    """
    steps = load_nice()
    if steps == 0:
        for name in names:
            importlib.import_module(name)
        return
    failed: list[BaseException] = []

    def run() -> None:
        try:
            tid = threading.get_native_id()
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))
            for name in names:
                importlib.import_module(name)
        except BaseException as exc:  # raised again in the calling thread
            failed.append(exc)

    thread = threading.Thread(target=run, name="tritonforge-load-imports")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
