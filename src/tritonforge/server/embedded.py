"""The real Triton server as a context manager, on loopback, with nothing left behind when it stops.

``EmbeddedServer`` owns the lifecycle: its options, the launch, readiness, model control over Triton's
HTTP API, the log, and the stop. What it tells tritonserver and reads from its log is in
:mod:`~tritonforge.server.launch`; the guards that remove what a killed server leaves (the watchdog's
owner side, SIGTERM as a clean exit, the sweep at the next start) in :mod:`~tritonforge.server.leftovers`.
"""

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
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from tritonforge.errors import ModelLoadError, ServerError
from tritonforge.server._watchdog import remove_env_dirs, wait_group_gone
from tritonforge.server.install import (
    TritonInstall,
    auto_complete_flags,
    backend_directory,
    bls_pool_flags,
    find_tritonserver,
    stub_python,
)
from tritonforge.server.launch import (
    PORT_IN_USE,
    check_access_options,
    config_json,
    flag_values,
    http_headers,
    load_failures,
    server_environment,
)
from tritonforge.server.leftovers import LOG_PREFIX, Watchdog, exit_cleanly_on_sigterm, sweep_leftovers

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2 as pb2

    from tritonforge.config import ModelConfig

__all__ = [
    "DEFAULT_STARTUP_TIMEOUT_S",
    "LOAD_WITH",
    "EmbeddedServer",
    "free_port",
    "load_with",
]

DEFAULT_STARTUP_TIMEOUT_S = 180.0
ModelControl = Literal["none", "explicit", "poll"]
_MODEL_CONTROLS = ("none", "explicit", "poll")
#: a model config parameter naming (comma-separated) the models it calls and must be loaded with it
LOAD_WITH = "tritonforge_load_with"


def load_with(repositories: Sequence[Path | str], names: Sequence[str]) -> list[str]:
    """``names`` and, before each, the companions its config names in :data:`LOAD_WITH` (a rollout's
    splitter and its twin: in explicit mode one without the other answers nothing). Only local
    repositories (paths) are read; a remote one's configs are Triton's to read."""
    from tritonforge.config import read_config
    from tritonforge.errors import TritonForgeError

    chosen: list[str] = []
    for name in names:
        for repo in repositories:
            if not isinstance(repo, Path):
                continue
            config_file = repo / name / "config.pbtxt"
            if name == "*" or not config_file.is_file():
                continue
            try:
                extra = read_config(config_file).parameters.get(LOAD_WITH, "")
            except TritonForgeError:
                continue  # Triton reports a broken config itself, naming the model
            chosen += [c for c in str(extra).split(",") if c and c not in chosen]
        if name not in chosen:
            chosen.append(name)
    return chosen


# The HTTP endpoints EmbeddedServer itself calls, by the restricted-API group Triton files them under.
_HTTP_API_OF_PATH = (
    ("/v2/repository", "model-repository"),
    ("/v2/health", "health"),
    ("/v2/models", "health"),
)

_running: set[EmbeddedServer] = set()
_running_lock = threading.Lock()


#: a repository Triton reads from object storage itself
REMOTE_REPOSITORY = re.compile(r"^(s3|gs|as)://")


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

    Ports default to free ports on ``host`` (loopback unless told otherwise; every 127.x.y.z address is
    loopback, so several servers can each have their own). ``model_control="explicit"`` starts with only
    ``load_models`` loaded (all of them with ``["*"]``) and allows :meth:`load_model` /
    :meth:`unload_model`; ``"poll"`` has Triton rescan the repository every ``poll_interval_s`` seconds
    and (re)load what changed. A model of ``load_models`` whose config names companions in the
    :data:`LOAD_WITH` parameter (a rollout's splitter names its twin) starts with them loaded too.

    The options mirror tritonserver's own flags: ``response_cache_bytes`` (``--cache-config
    local,size=``), ``log_file`` (kept after stop; by default the log is a temporary file removed on
    stop), ``log_verbose``, ``exit_timeout_s``, ``grpc_restricted_protocols`` /
    ``http_restricted_apis`` (Triton's ``"<protocols>:<header>=<value>"`` specs), gRPC TLS
    (``grpc_server_cert``, ``grpc_server_key``, ``grpc_root_cert``, ``grpc_mutual_tls``), and
    ``extra_args``, passed to tritonserver unchanged after everything else (so they win).

    ``python`` runs the Python backend's stubs in another interpreter's environment (a venv's ``python``;
    its version picks the stub): e.g. one reduced to what NVIDIA's image has, to prove a repository needs
    nothing more. Our Python-based ``onnxruntime``/``pytorch`` backends, stand-ins for NVIDIA's C++ ones,
    then reach tritonforge (and onnxruntime/torch in the folders ``backend_path`` names) on their own;
    user models see that interpreter alone.

    The server never outlives its owner: a small watchdog process holds a pipe from this process and,
    when the pipe closes without a clean stop (the owner was killed, even by SIGKILL), ends the server's
    process group and removes its shared memory and temporary files.

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
        poll_interval_s: int = 15,
        response_cache_bytes: int | None = None,
        log_file: str | os.PathLike[str] | None = None,
        grpc_restricted_protocols: Sequence[str] = (),
        http_restricted_apis: Sequence[str] = (),
        grpc_server_cert: str | os.PathLike[str] | None = None,
        grpc_server_key: str | os.PathLike[str] | None = None,
        grpc_root_cert: str | os.PathLike[str] | None = None,
        grpc_mutual_tls: bool = False,
        python: str | os.PathLike[str] | None = None,
        backend_path: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        repos = [repository] if isinstance(repository, (str, os.PathLike)) else list(repository)
        # s3://, gs://, as:// repositories are Triton's to read (credentials from its environment)
        self.repositories: list[Path | str] = [
            r if isinstance(r, str) and REMOTE_REPOSITORY.match(r) else Path(r).resolve() for r in repos
        ]
        for repo in self.repositories:
            if isinstance(repo, Path) and not repo.is_dir():
                raise ServerError(
                    f"model repository {repo} does not exist (build it first, e.g. `tritonforge build`)"
                )
        if model_control not in _MODEL_CONTROLS:
            raise ServerError(f"model_control must be 'none', 'explicit' or 'poll', not {model_control!r}")
        if load_models and model_control != "explicit":
            raise ServerError(
                f"load_models needs model_control='explicit' (in '{model_control}' mode all models load)"
            )
        for name, value, low in (
            ("poll_interval_s", poll_interval_s, 1),
            ("exit_timeout_s", exit_timeout_s, 0),
            ("log_verbose", log_verbose, 0),
            ("response_cache_bytes", 0 if response_cache_bytes is None else response_cache_bytes, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ServerError(f"{name} must be an integer >= {low}, got {value!r}")
        grpc_tls = (grpc_server_cert, grpc_server_key, grpc_root_cert, grpc_mutual_tls)
        check_access_options(grpc_restricted_protocols, http_restricted_apis, grpc_tls)
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
        self.poll_interval_s = poll_interval_s
        self.response_cache_bytes = response_cache_bytes
        self.log_file = None if log_file is None else Path(log_file).resolve()
        self.grpc_restricted_protocols = tuple(grpc_restricted_protocols)
        self.http_restricted_apis = tuple(http_restricted_apis)
        self.grpc_tls = grpc_tls
        self._http_headers = http_headers(
            [*self.http_restricted_apis, *flag_values(self.extra_args, "--http-restricted-api")]
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._watchdog: Watchdog | None = None
        self._launched_at = 0.0  # when the last launch began and the server was ready (time.time())
        self._ready_at: float | None = None
        self._log_path: Path | None = None
        self._log_offset = 0
        self._log_text = ""
        # the owner's pid in the name: a later start can tell a region whose owner is gone (sweep_leftovers)
        self._shm_prefix = f"tfg_{os.getpid()}_{uuid.uuid4().hex[:10]}_"
        self.install: TritonInstall | None = None
        self.python = None if python is None else stub_python(python)
        self.backend_path = tuple(Path(p).absolute() for p in backend_path)

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
        sweep_leftovers()
        backends = backend_directory(
            self.install, python_version=self.python.version if self.python else None
        )
        exit_cleanly_on_sigterm()
        auto_ports = not any(self._requested_ports)
        attempts = 3 if auto_ports else 1
        for attempt in range(attempts):
            self._launch(backends)
            try:
                self._wait_ready()
                if self._watchdog is not None:
                    self._watchdog.ready()
                self._ready_at = time.time()
                break
            except ServerError as exc:
                port_clash = bool(PORT_IN_USE.search(self._current_log()))
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
            wait_group_gone(process.pid, timeout_s=10.0)
            # the Python backend removes its /tmp/python_env_* on a clean exit only (not when Triton's
            # exit timeout ran out and the group was killed): the empty one made while this server started
            remove_env_dirs(self._launched_at, self._ready_at)
        for region in glob.glob(f"/dev/shm/{self._shm_prefix}*"):
            with contextlib.suppress(OSError):
                os.unlink(region)
        if self._log_path is not None:
            self._log_text = self._current_log()
            if self.log_file is None:  # a temporary log; one the user named is kept
                with contextlib.suppress(OSError):
                    self._log_path.unlink()
            self._log_path = None
        if self._watchdog is not None:
            self._watchdog.release()
            self._watchdog = None
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
            with self._log_path.open("rb") as handle:
                handle.seek(self._log_offset)  # a kept log file may hold earlier runs; read only this one
                return handle.read().decode(errors="replace")
        except OSError:
            return self._log_text

    def _effective_exit_timeout_s(self) -> int:
        """The exit timeout tritonserver runs with: the last --exit-timeout-secs of extra_args wins."""
        given = flag_values(self.extra_args, "--exit-timeout-secs")
        try:
            return int(given[-1]) if given else self.exit_timeout_s
        except ValueError:
            return self.exit_timeout_s

    # -- model control -----------------------------------------------------------------------------------

    def load_model(
        self, name: str, config: ModelConfig | pb2.ModelConfig | dict[str, Any] | str | None = None
    ) -> None:
        """Load (or reload) ``name``; ``config`` (a ModelConfig, dict or JSON string) overrides config.pbtxt.

        Raises:
            ModelLoadError: Triton refused to load it; the message has Triton's reason.
        """
        self._require_explicit("load_model")
        body: dict[str, Any] = {}
        if config is not None:
            body["parameters"] = {"config": config_json(config)}
        self._post(f"/v2/repository/models/{_quoted(name)}/load", body, model=name, action="load")

    def unload_model(self, name: str, *, unload_dependents: bool = False) -> None:
        """Unload ``name`` (and, when asked, the ensembles that depend on it)."""
        self._require_explicit("unload_model")
        body = {"parameters": {"unload_dependents": unload_dependents}}
        self._post(f"/v2/repository/models/{_quoted(name)}/unload", body, model=name, action="unload")
        # Unload returns before the model is gone; wait so a reload or a readiness check sees the truth.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.is_model_ready(name):
            time.sleep(0.05)

    def is_model_ready(self, name: str, version: str | int | None = None) -> bool:
        path = (
            f"/v2/models/{_quoted(name)}" + (f"/versions/{version}" if version is not None else "") + "/ready"
        )
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
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._log_path = self.log_file
            self._log_offset = os.fstat(fd).st_size
        else:
            fd, log_name = tempfile.mkstemp(prefix=f"{LOG_PREFIX}{os.getpid()}-", suffix=".log")
            self._log_path = Path(log_name)
            self._log_offset = 0
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
            *[f"--load-model={name}" for name in load_with(self.repositories, self.load_models)],
            *self._option_args(),
            *self.extra_args,
        ]
        env = server_environment(self.install, self.python, self.backend_path)
        # The watchdog starts first, so that no moment exists in which a server runs unwatched but for the
        # few instructions between Popen returning and the watchdog learning the server's group.
        watchdog = Watchdog.start(self._shm_prefix, None if self.log_file is not None else self._log_path)
        self._launched_at, self._ready_at = time.time(), None
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
            watchdog.release()
            raise ServerError(f"could not start {self.install.binary}: {exc}") from exc
        finally:
            os.close(fd)
        watchdog.watch(self._process.pid)
        self._watchdog = watchdog

    def _option_args(self) -> list[str]:
        """tritonserver flags for the options that have one, in tritonserver's own spelling."""
        args: list[str] = []
        if self.model_control == "poll":
            args.append(f"--repository-poll-secs={self.poll_interval_s}")
        if self.install is not None:
            args += auto_complete_flags(self.install, self.repositories, self.model_control, self.extra_args)
            args += bls_pool_flags(self.install, self.repositories, self.model_control, self.extra_args)
        if self.response_cache_bytes:
            args.append(f"--cache-config=local,size={self.response_cache_bytes}")
            # The wheel keeps its cache library beside the binary, not in /opt/tritonserver/caches.
            caches = self.install.binary.parent.parent / "caches" if self.install is not None else None
            if caches is not None and caches.is_dir():
                args.append(f"--cache-directory={caches}")
        args += [f"--grpc-restricted-protocol={spec}" for spec in self.grpc_restricted_protocols]
        args += [f"--http-restricted-api={spec}" for spec in self.http_restricted_apis]
        cert, key, root, mutual = self.grpc_tls
        if cert is not None and key is not None:
            args += ["--grpc-use-ssl=true", f"--grpc-server-cert={cert}", f"--grpc-server-key={key}"]
            if root is not None:
                args.append(f"--grpc-root-cert={root}")
            if mutual:
                args.append("--grpc-use-ssl-mutual=true")
        return args

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self._process.poll() is not None:
                self._raise_start_failure(f"exited with code {self._process.returncode} while starting")
            if self._get_status("/v2/health/ready") == 200:
                # ready is answered over HTTP; the gRPC and metrics listeners start beside it and can
                # lag a moment on a busy machine: the URLs handed out should take connections on return
                # (a listener turned off by an option is not waited for beyond a few seconds)
                self._wait_listening((self.grpc_port, self.metrics_port), min(deadline, time.monotonic() + 5))
                return
            if time.monotonic() > deadline:
                self._raise_start_failure(f"was not ready after {self.startup_timeout_s:.0f} s")
            time.sleep(0.1)

    def _wait_listening(self, ports: tuple[int, ...], until: float) -> None:
        """Until ``until`` (monotonic), wait for each port to accept a TCP connection on the server's host."""
        import socket

        for port in ports:
            while time.monotonic() < until:
                try:
                    socket.create_connection((self.host, port), timeout=0.5).close()
                    break
                except OSError:
                    time.sleep(0.02)

    def _raise_start_failure(self, what: str) -> None:
        log = self._current_log()
        failures = load_failures(log)
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

    def _headers_for(self, path: str) -> dict[str, str]:
        for prefix, api in _HTTP_API_OF_PATH:
            if path.startswith(prefix) and api in self._http_headers:
                return dict([self._http_headers[api]])
        return {}

    def _get_status(self, path: str) -> int:
        request = urllib.request.Request(self.http_url + path, headers=self._headers_for(path))
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError):
            return 0

    def _request(self, path: str, body: dict[str, Any]) -> str:
        request = urllib.request.Request(
            self.http_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **self._headers_for(path)},
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
            details = [r for m, r in load_failures(self._current_log()) if m == model]
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


def _quoted(name: str) -> str:
    """``name`` as one segment of a URL path (a model name may hold any character but ``/``)."""
    return urllib.parse.quote(name, safe="")


@atexit.register
def _stop_all() -> None:
    with _running_lock:
        servers = list(_running)
    for server in servers:
        server.stop()
