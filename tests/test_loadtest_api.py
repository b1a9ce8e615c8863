"""The public face of tritonforge.loadtest: an honest ``__all__``, and no gevent patching on import."""

from __future__ import annotations

import subprocess
import sys

import tritonforge.loadtest as loadtest


def test_loadtest_all_lists_only_names_it_has_each_once() -> None:
    assert [name for name in loadtest.__all__ if not hasattr(loadtest, name)] == []
    assert len(loadtest.__all__) == len(set(loadtest.__all__))


def _prints_ok_in_a_fresh_interpreter(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_importing_loadtest_and_its_cli_verbs_neither_imports_locust_nor_patches_with_gevent() -> None:
    code = (
        "import sys, socket\n"
        "import tritonforge.loadtest, tritonforge.commands.loadtest\n"
        "heavy = {'locust', 'gevent', 'matplotlib'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not heavy, heavy\n"
        "assert socket.socket.__module__ == 'socket', socket.socket.__module__\n"
        "print('ok')\n"
    )
    _prints_ok_in_a_fresh_interpreter(code)


def test_importing_the_locust_user_initialises_grpcs_gevent_support_first() -> None:
    code = (
        "import socket\n"
        "import tritonforge.loadtest.user\n"
        "import grpc._cython.cygrpc as cygrpc\n"
        "assert 'gevent' in socket.socket.__module__, socket.socket.__module__\n"
        "assert cygrpc.g_gevent_activated, 'grpc gevent support not initialised'\n"
        "print('ok')\n"
    )
    _prints_ok_in_a_fresh_interpreter(code)
