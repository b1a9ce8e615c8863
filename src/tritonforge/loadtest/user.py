"""A locust ``User`` for Triton models, on :class:`tritonforge.Client` (gRPC, made gevent-friendly).

Import this module (or locust) before anything that uses grpc: locust monkey-patches the standard library
with gevent on import, and grpc's own gevent support must be initialised before its first channel.

Example locustfile (``locust -f this.py --host 127.0.0.1:8001``)::

    from tritonforge.loadtest.user import TritonUser

    class Digits(TritonUser):
        model = "digits_mlp"
        wait_time = constant(0)

Each call is reported through ``environment.events.request`` (request type ``"grpc"``, name = the model,
response time in ms, the exception when it failed), through the client's event hooks. Payloads are
``payloads`` (real samples, cycled) or generated from the model's config as the server reports it.
"""

from __future__ import annotations

import locust  # first: its gevent monkey-patching must precede grpc
from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()

import itertools  # noqa: E402
import os  # noqa: E402
from collections.abc import Callable, Iterator, Mapping, Sequence  # noqa: E402
from typing import Any, ClassVar  # noqa: E402

import numpy as np  # noqa: E402
from locust import User, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402

from tritonforge.client import Client, ClientEvent, RetryPolicy  # noqa: E402
from tritonforge.errors import ClientError  # noqa: E402

__all__ = ["TritonUser", "access_from_env", "host_url"]

Payloads = Sequence[Mapping[str, np.ndarray]]


def host_url(host: str | None) -> str:
    """locust's ``--host`` as a gRPC ``host:port`` (``grpc://`` and ``http://`` prefixes dropped)."""
    if not host:
        raise ValueError(
            "no host: run locust with --host HOST:PORT (Triton's gRPC port, e.g. 127.0.0.1:8001)"
        )
    for prefix in ("grpc://", "http://", "https://"):
        if host.startswith(prefix):
            host = host[len(prefix) :]
    return host.rstrip("/")


def access_from_env() -> Any:
    """The access settings the CLI's verbs read from the environment, read the same way for locust pods
    (``tritonforge deploy`` writes them into the workers' env, keys as ``env:NAME`` references): the
    client's ``Auth`` from ``$TRITONFORGE_AUTH`` (specs separated by spaces) and
    ``$TRITONFORGE_TLS_*``, or ``None`` when none is set.

    Raises:
        SecretError: a spec that is malformed or names an unset variable.
    """
    from tritonforge.client.policies import Auth, TLSConfig

    env = os.environ
    specs = env.get("TRITONFORGE_AUTH", "").split()
    files = {
        "root_certificates": env.get("TRITONFORGE_TLS_ROOT_CERT"),
        "certificate_chain": env.get("TRITONFORGE_TLS_CLIENT_CERT"),
        "private_key": env.get("TRITONFORGE_TLS_CLIENT_KEY"),
    }
    server_name = env.get("TRITONFORGE_TLS_SERVER_NAME")
    tls = TLSConfig(**files, server_name=server_name) if any(files.values()) or server_name else None
    if not specs and tls is None:
        return None
    return Auth.from_specs(specs, tls=tls)


class TritonUser(User):
    """Sends requests to ``model`` on the Triton server at locust's ``--host`` (gRPC ``host:port``).

    Class attributes:
        model: the model (or ensemble) to call (required).
        version: a model version, or ``None`` for the server's policy.
        payloads: real request samples (``{input name: array}`` each, batch axis included), cycled; or a
            callable ``(user) -> payloads`` called once per user; ``None``: one request generated from the
            model's config with ``batch`` rows.
        batch: rows per generated request.
        timeout_s: deadline of one call.
        client_options: extra keyword arguments for :class:`tritonforge.Client` (no retries by default: a
            load test should see failures, not hide them).

    Override :meth:`infer_task` (or add ``@task`` methods calling :meth:`infer`) for other traffic.
    """

    abstract = True
    model: ClassVar[str] = ""
    version: ClassVar[str | None] = None
    payloads: ClassVar[Payloads | Callable[[TritonUser], Payloads] | None] = None
    batch: ClassVar[int] = 1
    timeout_s: ClassVar[float | None] = 30.0
    client_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        if not self.model:
            raise ValueError(f"{type(self).__name__}.model is not set")
        options: dict[str, Any] = {"retry": RetryPolicy.none(), "metrics": False, "shared_memory": "off"}
        access = access_from_env()
        if access is not None:
            options["auth"] = access
        options.update(self.client_options)
        self.client = Client(host_url(self.host), hooks=[self._report], **options)
        self._requests: Iterator[Mapping[str, np.ndarray]] | None = None

    def _report(self, event: ClientEvent) -> None:
        if event.kind != "request":
            return
        self.environment.events.request.fire(
            request_type="grpc",
            name=event.model,
            response_time=event.latency_s * 1e3,
            response_length=event.response_bytes,
            exception=event.error,
            context={"endpoint": event.endpoint, "version": event.version},
        )

    def _payloads(self) -> Payloads:
        source = type(self).payloads
        if callable(source):
            return source(self)
        if source is not None:
            return source
        from tritonforge.loadtest.target import inputs_from_config

        return [inputs_from_config(self.client.model_config(self.model), batch=self.batch)]

    def next_inputs(self) -> Mapping[str, np.ndarray]:
        if self._requests is None:
            payloads = list(self._payloads())
            if not payloads:
                raise ValueError(f"{type(self).__name__}: no payloads")
            # users start at different samples so they don't all send the same one
            offset = id(self) % len(payloads)
            self._requests = itertools.cycle(payloads[offset:] + payloads[:offset])
        return next(self._requests)

    def infer(self, model: str | None = None, inputs: Mapping[str, np.ndarray] | None = None) -> Any:
        """One call; reported to locust by the client's hook. Failures are reported, not raised."""
        try:
            return self.client.infer(
                model or self.model,
                inputs if inputs is not None else self.next_inputs(),
                version=self.version,
                timeout_s=self.timeout_s,
            )
        except ClientError:
            return None  # already reported as a failure through the hook

    @task
    def infer_task(self) -> None:
        self.infer()

    def on_start(self) -> None:
        try:
            self.next_inputs()  # fetch the config / build payloads before the clock matters
        except ClientError as exc:
            self.environment.events.request.fire(
                request_type="grpc",
                name=self.model,
                response_time=0.0,
                response_length=0,
                exception=exc,
                context={},
            )
            raise StopUser() from exc

    def on_stop(self) -> None:
        self.client.close()


assert locust  # imported for its side effect
