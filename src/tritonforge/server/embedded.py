"""The real Triton server as a context manager, on loopback, with nothing left behind when it stops."""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from tritonforge.errors import ModelLoadError, ServerError
from tritonforge.server.install import TritonInstall, backend_directory, find_tritonserver

__all__ = ["DEFAULT_STARTUP_TIMEOUT_S", "EmbeddedServer", "free_port"]

DEFAULT_STARTUP_TIMEOUT_S = 180.0
ModelControl = Literal["none", "explicit"]

# Triton's log lines that name a model which did not load, and why.
_LOAD_FAILURES = (
    re.compile(r"failed to load '(?P<model>[^']+)'(?: version (?P<version>\d+))?: (?P<reason>.*?)\"?$"),
    re.compile(r"Poll failed for model directory '(?P<model>[^']+)': (?P<reason>.*?)\"?$"),
)
_PORT_IN_USE = re.compile(
    r"address already in use|failed to start .*service|Socket '.*' already in use", re.I
)

_running: set[EmbeddedServer] = set()
_running_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedServer:
    """A ``tritonserver`` process serving ``repository`` on loopback.

    Example:
        >>> with EmbeddedServer("model_repository") as server:           # doctest: +SKIP
        ...     client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

    Ports default to free loopback ports. ``model_control="explicit"`` starts with only ``load_models``
    loaded (all of them with ``["*"]``) and allows :meth:`load_model` / :meth:`unload_model`.

    Raises (from :meth:`start`):
        ModelLoadError: a model failed to load; names the model and Triton's reason.
        ServerError: the server did not start or become ready; carries the tail of its log.
    """

    def __init__(
        self,
        repository: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        host: str = "127.0.0.1",
        model_control: ModelControl = "none",
        load_models: Sequence[str] = (),
        tritonserver: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        exit_timeout_s: int = 10,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
    ) -> None:
        repos = [repository] if isinstance(repository, (str, os.PathLike)) else list(repository)
        self.repositories = [Path(r).resolve() for r in repos]
        for repo in self.repositories:
            if not repo.is_dir():
                raise ServerError(
                    f"model repository {repo} does not exist (build it first, e.g. `tritonforge build`)"
                )
        if model_control not in ("none", "explicit"):
            raise ServerError(f"model_control must be 'none' or 'explicit', not {model_control!r}")
        if load_models and model_control != "explicit":
            raise ServerError(
                "load_models needs model_control='explicit' (in 'none' mode every model is loaded)"
            )
        self.host = host
        self._requested_ports = (grpc_port, http_port, metrics_port)
        self.grpc_port = self.http_port = self.metrics_port = 0
        self.model_control: ModelControl = model_control
        self.load_models = tuple(load_models)
        self._tritonserver = tritonserver
        self.startup_timeout_s = startup_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None
        self._log_text = ""
        self._shm_prefix = f"tfg_{uuid.uuid4().hex[:10]}_"
        self.install: TritonInstall | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return (
            f"<EmbeddedServer {state} grpc={self.grpc_url} repository={[str(r) for r in self.repositories]}>"
        )

    def start(self) -> EmbeddedServer:
        """Start the server and wait until it is ready (every model loaded)."""
        if self.is_running:
            return self
        self.install = find_tritonserver(self._tritonserver)
        backends = backend_directory(self.install)
        _exit_cleanly_on_sigterm()
        auto_ports = not any(self._requested_ports)
        attempts = 3 if auto_ports else 1
        for attempt in range(attempts):
            self._launch(backends)
            try:
                self._wait_ready()
                break
            except ServerError as exc:
                port_clash = bool(_PORT_IN_USE.search(self._current_log()))
                self.stop()
                if not (port_clash and attempt + 1 < attempts) or isinstance(exc, ModelLoadError):
                    raise
        with _running_lock:
            _running.add(self)
        return self

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL for whatever of its process group is left (stubs too)."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=self.exit_timeout_s + 5)
            # The Python-backend stubs are the server's children in its process group; a server that was
            # killed (or hung) can leave them, so sweep the whole group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            _wait_group_gone(process.pid)
        for region in glob.glob(f"/dev/shm/{self._shm_prefix}*"):
            with contextlib.suppress(OSError):
                os.unlink(region)
        if self._log_path is not None:
            self._log_text = self._current_log()
            with contextlib.suppress(OSError):
                self._log_path.unlink()
            self._log_path = None
        with _running_lock:
            _running.discard(self)

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    # -- addresses ---------------------------------------------------------------------------------------

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    # -- logs --------------------------------------------------------------------------------------------

    @property
    def log(self) -> str:
        """Everything the server logged so far (kept after :meth:`stop`)."""
        return self._current_log()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self._current_log().splitlines()[-lines:])

    def _current_log(self) -> str:
        if self._log_path is None:
            return self._log_text
        try:
            return self._log_path.read_text(errors="replace")
        except OSError:
            return self._log_text

    # -- model control -----------------------------------------------------------------------------------

    def load_model(self, name: str, config: Any = None) -> None:
        """Load (or reload) ``name``; ``config`` (a ModelConfig, dict or JSON string) overrides config.pbtxt.

        Raises:
            ModelLoadError: Triton refused to load it; the message has Triton's reason.
        """
        self._require_explicit("load_model")
        body: dict[str, Any] = {}
        if config is not None:
            body["parameters"] = {"config": _config_json(config)}
        self._post(f"/v2/repository/models/{name}/load", body, model=name, action="load")

    def unload_model(self, name: str, *, unload_dependents: bool = False) -> None:
        """Unload ``name`` (and, when asked, the ensembles that depend on it)."""
        self._require_explicit("unload_model")
        body = {"parameters": {"unload_dependents": unload_dependents}}
        self._post(f"/v2/repository/models/{name}/unload", body, model=name, action="unload")
        # Unload returns before the model is gone; wait so a reload or a readiness check sees the truth.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.is_model_ready(name):
            time.sleep(0.05)

    def is_model_ready(self, name: str, version: str | int | None = None) -> bool:
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version is not None else "") + "/ready"
        return self._get_status(path) == 200

    def repository_index(self) -> list[dict[str, Any]]:
        """Triton's view of the repository: each model's name, version, state and reason."""
        return list(json.loads(self._request("/v2/repository/index", {}) or "[]"))

    # -- internals ---------------------------------------------------------------------------------------

    def _launch(self, backends: Path) -> None:
        assert self.install is not None
        grpc_port, http_port, metrics_port = self._requested_ports
        self.grpc_port = grpc_port or free_port(self.host)
        self.http_port = http_port or free_port(self.host)
        self.metrics_port = metrics_port or free_port(self.host)
        fd, log_name = tempfile.mkstemp(prefix="tritonforge-server-", suffix=".log")
        self._log_path = Path(log_name)
        args = [
            str(self.install.binary),
            *[f"--model-repository={repo}" for repo in self.repositories],
            f"--backend-directory={backends}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--model-control-mode={self.model_control}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            *[f"--load-model={name}" for name in self.load_models],
            *self.extra_args,
        ]
        env = dict(os.environ)
        # The Python-backend stub is an embedded interpreter that takes its sys.path from the `python3`
        # first on PATH (PYTHONPATH is not enough): put this interpreter's bin/ first.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libs = [str(d) for d in self.install.library_dirs if d.is_dir()]
        # The stub links libpython3.X.so.1.0; unless this interpreter's own comes first, the loader may
        # pick another build of the same minor version (e.g. the distro's), whose ABI the stdlib's
        # extension modules (_ssl, ...) of this interpreter don't match.
        own_libpython = _shared_libpython_dir()
        if own_libpython is not None:
            libs.insert(0, str(own_libpython))
        if libs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(
                os.pathsep
            )
        try:
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # one process group: stop() can sweep the stubs with it
            )
        except OSError as exc:
            raise ServerError(f"could not start {self.install.binary}: {exc}") from exc
        finally:
            os.close(fd)

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self._process.poll() is not None:
                self._raise_start_failure(f"exited with code {self._process.returncode} while starting")
            if self._get_status("/v2/health/ready") == 200:
                return
            if time.monotonic() > deadline:
                self._raise_start_failure(f"was not ready after {self.startup_timeout_s:.0f} s")
            time.sleep(0.1)

    def _raise_start_failure(self, what: str) -> None:
        log = self._current_log()
        failures = _load_failures(log)
        tail = "\n".join(log.splitlines()[-25:])
        if failures:
            model, reason = failures[0]
            others = "".join(f"\n  - '{m}': {r}" for m, r in failures[1:])
            more = f"\nOther models that failed:{others}" if others else ""
            raise ModelLoadError(
                f"model '{model}' failed to load: {reason}{more}\n"
                f"Fix the model or its config.pbtxt (`tritonforge validate REPO` checks it offline).",
                model=model,
                endpoint=self.grpc_url,
            )
        raise ServerError(f"tritonserver {what}. Last lines of its log:\n{tail}", endpoint=self.grpc_url)

    def _require_explicit(self, what: str) -> None:
        if self.model_control != "explicit":
            raise ServerError(f"{what} needs EmbeddedServer(..., model_control='explicit')")
        if not self.is_running:
            raise ServerError(f"{what}: the server is not running")

    def _get_status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError):
            return 0

    def _request(self, path: str, body: dict[str, Any]) -> str:
        request = urllib.request.Request(
            self.http_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=600) as response:
            return str(response.read().decode())

    def _post(self, path: str, body: dict[str, Any], *, model: str, action: str) -> None:
        try:
            self._request(path, body)
        except urllib.error.HTTPError as exc:
            try:
                reason = json.loads(exc.read().decode()).get("error", "")
            except (ValueError, OSError):
                reason = str(exc)
            details = [r for m, r in _load_failures(self._current_log()) if m == model]
            extra = f" ({details[-1]})" if details and details[-1] not in reason else ""
            error = ModelLoadError if action == "load" else ServerError
            raise error(
                f"could not {action} model '{model}': {reason}{extra}", model=model, endpoint=self.grpc_url
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ServerError(
                f"could not {action} model '{model}': server unreachable ({exc})",
                model=model,
                endpoint=self.grpc_url,
            ) from exc


def _shared_libpython_dir() -> Path | None:
    """The folder of the running interpreter's shared libpython, if it was built with one."""
    import sysconfig

    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not libdir or not soname or not (Path(libdir) / soname).exists():
        return None
    return Path(libdir)


def _load_failures(log: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for line in log.splitlines():
        for pattern in _LOAD_FAILURES:
            match = pattern.search(line)
            if match:
                # Triton logs the reason JSON-escaped on one line (a Python traceback included)
                reason = match["reason"].replace('\\"', '"').replace("\\n", "\n").strip()
                item = (match["model"], reason)
                if item not in found:
                    found.append(item)
                break
    return found


def _config_json(config: Any) -> str:
    if isinstance(config, str):
        return config
    if isinstance(config, dict):
        return json.dumps(config)
    from google.protobuf import json_format

    proto = config.to_proto() if hasattr(config, "to_proto") else config
    return json_format.MessageToJson(proto, preserving_proto_field_name=True)


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in process group ``pgid`` (Linux /proc).

    Zombies don't count: orphaned stubs are reparented to PID 1, and a PID 1 that never reaps them would
    otherwise make every stop wait out its timeout.
    """
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone while we looked
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            return True
    return False


def _wait_group_gone(pgid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.05)


def _exit_cleanly_on_sigterm() -> None:
    """Make SIGTERM a normal exit (``SystemExit``) when nothing else handles it, so ``with`` blocks,
    ``finally`` and atexit stop the servers. By default SIGTERM ends Python on the spot, and the server,
    in its own process group, would outlive it with its log, temp files and shared memory."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_exit)


def _raise_exit(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once, as before
    raise SystemExit(128 + signum)


@atexit.register
def _stop_all() -> None:
    with _running_lock:
        servers = list(_running)
    for server in servers:
        server.stop()
