"""Access control through the real server: who may infer and who may change models are separate.

One server (module scope) runs with Triton's own restrictions, its keys read the way `serve` reads them
(an environment variable and a 0600 file), and gRPC mutual TLS with throwaway certificates:

- ``model-repository,model-config,statistics`` need the operator key (load, unload, rollouts);
- ``inference`` needs the inference key; ``health`` and ``metadata`` stay open (readiness, validation);
- every gRPC client must present a certificate signed by the test CA.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rollout_models import mlp
from tritonforge.cli import run
from tritonforge.client import AsyncClient, Auth, Client, RetryPolicy, TLSConfig
from tritonforge.client.secrets import read_secret
from tritonforge.commands.access import server_secrets
from tritonforge.errors import AuthenticationError, SecretError
from tritonforge.registry import promote, served_versions
from tritonforge.repository import add_model
from tritonforge.repository.writer import load_config, versions
from tritonforge.rollout import Rollout, Thresholds
from tritonforge.rollout.state import load_state
from tritonforge.server import EmbeddedServer

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl for test certificates")

OPERATOR_KEY = "op-" + os.urandom(8).hex()
INFERENCE_KEY = "inf-" + os.urandom(8).hex()
INFERENCE_ENV = "TF_TEST_ACCESS_INFERENCE_KEY"
X = np.random.default_rng(0).random((2, 8), dtype=np.float32)


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _cert(folder: Path, name: str, ca: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    """A key (mode 0600) and a certificate: a self-signed CA, or one signed by ``ca`` for localhost."""
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    if ca is None:
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
                 "-keyout", key, "-out", cert)  # fmt: skip
    else:
        csr, ext = folder / f"{name}.csr", folder / f"{name}.ext"
        ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", key, "-out", csr
        )
        _openssl("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial", "-days", "1",
                 "-extfile", ext, "-out", cert)  # fmt: skip
    key.chmod(0o600)
    return key, cert


class Certs:
    def __init__(self, folder: Path) -> None:
        self.ca = _cert(folder, "ca")
        self.server = _cert(folder, "server", self.ca)
        self.client = _cert(folder, "client", self.ca)

    def tls(self, *, mutual: bool = True) -> TLSConfig:
        if not mutual:
            return TLSConfig(root_certificates=str(self.ca[1]))
        return TLSConfig(
            root_certificates=str(self.ca[1]),
            private_key=str(self.client[0]),
            certificate_chain=str(self.client[1]),
        )


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("access_secrets")


@pytest.fixture(scope="module")
def certs(secrets_dir: Path) -> Certs:
    return Certs(secrets_dir)


@pytest.fixture(scope="module")
def operator_key_file(secrets_dir: Path) -> Path:
    path = secrets_dir / "operator.key"
    path.write_text(OPERATOR_KEY + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("access") / "repo"
    files = tmp_path_factory.mktemp("access_files")
    for name in ("clf", "canary", "flip"):
        add_model(root, name, mlp(files / f"{name}_1.onnx"), max_batch_size=16)
        add_model(root, name, mlp(files / f"{name}_2.onnx"), max_batch_size=16)  # the same function
        promote(root, name, 1, reason="initial")
    return root


@pytest.fixture(scope="module")
def server(repo: Path, certs: Certs, operator_key_file: Path) -> Iterator[EmbeddedServer]:
    os.environ[INFERENCE_ENV] = INFERENCE_KEY
    try:
        # the specs `tritonforge serve` is given: references, never the keys themselves
        grpc_specs, http_specs = server_secrets(
            [
                f"model-repository,model-config,statistics:admin-key=@{operator_key_file}",
                f"inference:infer-key=env:{INFERENCE_ENV}",
            ],
            [f"model-repository:admin-key=@{operator_key_file}"],
            certs.server[0],
        )
    finally:
        del os.environ[INFERENCE_ENV]
    with EmbeddedServer(
        repo,
        model_control="explicit",
        load_models=["clf", "canary", "flip"],
        grpc_restricted_protocols=grpc_specs,
        http_restricted_apis=http_specs,
        grpc_server_cert=certs.server[1],
        grpc_server_key=certs.server[0],
        grpc_root_cert=certs.ca[1],
        grpc_mutual_tls=True,
    ) as running:
        yield running


def _operator(certs: Certs) -> Auth:
    keys = {"model-repository,model-config,statistics": ("admin-key", OPERATOR_KEY)}
    return Auth(keys, tls=certs.tls())


def _app(certs: Certs) -> Auth:
    return Auth({"inference": ("infer-key", INFERENCE_KEY)}, tls=certs.tls())


def _client(url: str, auth: Auth) -> Client:
    return Client(url, auth=auth, retry=RetryPolicy.none(), metrics=False)


# -- who may change models -------------------------------------------------------------------------------


def test_client_without_the_operator_key_cannot_load_or_unload_and_is_told_which_group(
    server: EmbeddedServer, certs: Certs
) -> None:
    with _client(server.grpc_url, _app(certs)) as app:
        with pytest.raises(
            AuthenticationError, match="'model-repository' call RepositoryModelUnload"
        ) as info:
            app.unload_model("clf")
        assert "auth=Auth(" in info.value.message and "--auth 'model-repository:" in info.value.message
        assert OPERATOR_KEY not in info.value.message
        with pytest.raises(AuthenticationError, match="'model-repository' call RepositoryModelLoad"):
            app.load_model("clf")
        with pytest.raises(AuthenticationError, match="'statistics'"):
            app.model_statistics("clf")
        # refused, not down: the endpoint stays healthy, and nothing was retried
        (status,) = app.endpoints
        assert status.state == "closed" and status.healthy and status.consecutive_failures == 0
        assert app.infer("clf", {"x": X})["probs"].shape == (2, 3)
    assert server.is_model_ready("clf")


def test_client_with_the_operator_key_can_unload_and_load(server: EmbeddedServer, certs: Certs) -> None:
    with _client(server.grpc_url, _operator(certs)) as operator:
        operator.unload_model("clf")
        assert not operator.is_model_ready("clf")
        operator.load_model("clf")
        assert operator.is_model_ready("clf")
        assert "inference_stats" in operator.model_statistics("clf")["model_stats"][0]
        # the operator's key opens only its own groups: inference still needs the inference key
        with pytest.raises(AuthenticationError, match="'inference' call ModelInfer"):
            operator.infer("clf", {"x": X})


def test_a_refused_call_is_never_retried_and_never_opens_the_circuit(
    server: EmbeddedServer, certs: Certs
) -> None:
    events = []
    with Client(
        server.grpc_url, auth=Auth(tls=certs.tls()), retry=RetryPolicy(max_attempts=5), hooks=[events.append]
    ) as anonymous:
        for _ in range(8):
            with pytest.raises(AuthenticationError):
                anonymous.infer("clf", {"x": X})
        assert [e.kind for e in events] == ["request"] * 8  # no "retry" events
        assert anonymous.endpoint_health() == {server.grpc_url: True}
        assert anonymous.endpoints[0].state == "closed"


# -- who may infer ---------------------------------------------------------------------------------------


def test_inference_works_with_the_inference_key_on_both_faces(server: EmbeddedServer, certs: Certs) -> None:
    import asyncio

    with _client(server.grpc_url, _app(certs)) as app:
        assert app.is_server_ready()
        assert app.infer("clf", {"x": X})["probs"].shape == (2, 3)

    async def main() -> tuple[int, int]:
        async with AsyncClient(server.grpc_url, auth=_app(certs), metrics=False) as aio:
            out = await aio.infer("clf", {"x": X})
            with pytest.raises(AuthenticationError, match="'model-repository'"):
                await aio.unload_model("clf")
            return out["probs"].shape

    assert asyncio.run(main()) == (2, 3)


def test_inference_is_refused_without_the_inference_key_on_both_faces(
    server: EmbeddedServer, certs: Certs
) -> None:
    import asyncio

    no_keys = Auth(tls=certs.tls())
    with (
        _client(server.grpc_url, no_keys) as anonymous,
        pytest.raises(AuthenticationError, match="'inference' call ModelInfer"),
    ):
        anonymous.infer("clf", {"x": X})

    async def main() -> None:
        async with AsyncClient(server.grpc_url, auth=no_keys, metrics=False, coalesce=False) as aio:
            await aio.infer("clf", {"x": X})

    with pytest.raises(AuthenticationError, match="'inference'"):
        asyncio.run(main())


def test_client_without_a_certificate_is_refused_under_mutual_tls(
    server: EmbeddedServer, certs: Certs
) -> None:
    # every key, but no client certificate: the TLS handshake is refused before any header is read
    keys = {**_operator(certs).keys, **_app(certs).keys}
    with Client(server.grpc_url, auth=Auth(keys, tls=certs.tls(mutual=False)), metrics=False) as stranger:
        with pytest.raises(AuthenticationError, match="TLS handshake") as info:
            stranger.infer("clf", {"x": X}, timeout_s=10)
        assert "certificate_chain" in info.value.message
        assert stranger.endpoints[0].state == "closed"


# -- rollouts and the CLI --------------------------------------------------------------------------------


class _Load:
    """An app calling the model by name with the inference key, counting failures."""

    def __init__(self, url: str, auth: Auth, model: str) -> None:
        self.client = Client(url, auth=auth, metrics=False)
        self.model = model
        self.ok, self.failures = 0, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.client.infer(self.model, {"x": X}, timeout_s=10)
                self.ok += 1
            except Exception as exc:
                self.failures.append(repr(exc)[:200])
            time.sleep(0.01)

    def __enter__(self) -> _Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        self.client.close()


def test_rollout_without_the_operator_key_is_refused_before_anything_changes(
    repo: Path, server: EmbeddedServer, certs: Certs
) -> None:
    config = (repo / "canary" / "config.pbtxt").read_text()
    with pytest.raises(AuthenticationError, match="'model-repository'"):
        Rollout(repo, server.grpc_url, "canary", auth=_app(certs)).start(2, steps=[100], hold_s=1.0)
    assert load_state(repo, "canary") is None
    assert (repo / "canary" / "config.pbtxt").read_text() == config
    assert not (repo / "canary__rollout").exists()


@pytest.mark.slow
def test_rollout_with_the_operator_key_promotes_while_apps_infer_with_theirs(
    repo: Path, server: EmbeddedServer, certs: Certs
) -> None:
    limits = Thresholds(max_error_rate=0.0, min_agreement=0.99, min_requests=5)
    with _Load(server.grpc_url, _app(certs), "canary") as load:
        outcome = Rollout(repo, server.grpc_url, "canary", auth=_operator(certs)).start(
            2, steps=[50, 100], hold_s=1.0, thresholds=limits, reason="access test"
        )
    assert outcome.result == "promoted", outcome
    assert load.failures == [] and load.ok > 10


def _serves(repo: Path, model: str) -> list[int]:
    return served_versions(load_config(repo / model), versions(repo / model))


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = run(list(args))
    return code, capsys.readouterr().err


def test_cli_promote_needs_the_operator_key_from_a_0600_file_or_the_environment(
    repo: Path,
    server: EmbeddedServer,
    certs: Certs,
    operator_key_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tls = ["--tls-root-cert", str(certs.ca[1]), "--tls-client-cert", str(certs.client[1]),
           "--tls-client-key", str(certs.client[0])]  # fmt: skip
    base = ["promote", str(repo), "flip", "2", "--url", server.grpc_url]
    code, err = _cli(capsys, *base, *tls)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "'model-repository' call" in err and "--auth 'model-repository:admin-key=env:VAR'" in err
    assert "more lines" not in err
    assert _serves(repo, "flip") == [1]  # refused before the repository changed
    # the secret itself on the command line is refused, before any call
    code, err = _cli(capsys, *base, *tls, "--auth", f"model-repository:admin-key={OPERATOR_KEY}")
    assert code == 1 and "never given in the clear" in err and OPERATOR_KEY not in err
    code, err = _cli(capsys, *base, *tls, "--auth", f"model-repository:admin-key=@{operator_key_file}")
    assert code == 0, err
    assert _serves(repo, "flip") == [2]
    assert server.is_model_ready("flip", 2) and not server.is_model_ready("flip", 1)
    # the same through the environment: TRITONFORGE_AUTH holds the reference, the key its own variable
    monkeypatch.setenv("TF_TEST_OPERATOR_KEY", OPERATOR_KEY)
    monkeypatch.setenv("TRITONFORGE_AUTH", "model-repository:admin-key=env:TF_TEST_OPERATOR_KEY")
    monkeypatch.setenv("TRITONFORGE_TLS_ROOT_CERT", str(certs.ca[1]))
    monkeypatch.setenv("TRITONFORGE_TLS_CLIENT_CERT", str(certs.client[1]))
    monkeypatch.setenv("TRITONFORGE_TLS_CLIENT_KEY", str(certs.client[0]))
    code, err = _cli(capsys, "rollback", str(repo), "flip", "--url", server.grpc_url)
    assert code == 0, err
    assert server.is_model_ready("flip", 1) and not server.is_model_ready("flip", 2)


def test_monitor_reads_restricted_statistics_with_the_operator_key_only(
    server: EmbeddedServer, certs: Certs
) -> None:
    from tritonforge.observe.metrics import MetricsError, batch_sizes

    with _client(server.grpc_url, _app(certs)) as app:
        app.infer("clf", {"x": X})
    sizes = batch_sizes(server.grpc_url, auth=_operator(certs))
    assert sizes[("clf", "1")]  # the call above ran at batch size 2
    with pytest.raises(MetricsError, match="restricted"):
        batch_sizes(server.grpc_url, auth=_app(certs))


@pytest.mark.slow
def test_cli_bench_sweeps_a_restricted_server_with_keys_from_the_environment(
    server: EmbeddedServer,
    certs: Certs,
    operator_key_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TF_TEST_INFER_KEY", INFERENCE_KEY)
    monkeypatch.setenv(
        "TRITONFORGE_AUTH",
        f"inference:infer-key=env:TF_TEST_INFER_KEY model-config,statistics:admin-key=@{operator_key_file}",
    )
    monkeypatch.setenv("TRITONFORGE_TLS_ROOT_CERT", str(certs.ca[1]))
    monkeypatch.setenv("TRITONFORGE_TLS_CLIENT_CERT", str(certs.client[1]))
    monkeypatch.setenv("TRITONFORGE_TLS_CLIENT_KEY", str(certs.client[0]))
    args = ["bench", "clf", "--url", server.grpc_url, "--concurrency", "1", "--window-s", "0.5"]
    args += ["--max-windows", "3", "--out", str(tmp_path / "bench")]
    code, err = _cli(capsys, *args)
    assert code in (0, 1), err  # 1: not stable within 3 windows, still measured
    assert "error" not in err.lower()
    assert (tmp_path / "bench" / "sweep.csv").read_text().count("\n") >= 2


# -- secrets: environment or 0600 files, never a command line --------------------------------------------


def test_serve_refuses_a_key_given_in_the_clear_on_its_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _cli(
        capsys, "serve", str(tmp_path), "--grpc-restricted-protocol", "model-repository:k=s3cret"
    )
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "never given in the clear" in err and "env:NAME" in err and "s3cret" not in err


def test_serve_refuses_a_key_file_that_others_can_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "admin.key"
    key.write_text("s3cret\n")
    key.chmod(0o644)
    spec = f"model-repository:admin-key=@{key}"
    code, err = _cli(capsys, "serve", str(tmp_path), "--grpc-restricted-protocol", spec)
    assert code == 1 and f"chmod 600 {key}" in err and "mode 0644" in err


def test_serve_refuses_a_tls_key_that_others_can_read(tmp_path: Path, certs: Certs) -> None:
    leaky = tmp_path / "server.key"
    shutil.copyfile(certs.server[0], leaky)
    leaky.chmod(0o640)
    with pytest.raises(SecretError, match=r"--grpc-server-key.*chmod 600"):
        server_secrets([], [], leaky)


def test_read_secret_takes_an_environment_variable_or_a_private_file_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TF_TEST_SECRET", "abc")
    assert read_secret("env:TF_TEST_SECRET", what="k") == "abc"
    monkeypatch.delenv("TF_TEST_SECRET")
    with pytest.raises(SecretError, match="TF_TEST_SECRET is not set"):
        read_secret("env:TF_TEST_SECRET", what="k")
    private = tmp_path / "k"
    private.write_text("xyz\n")
    private.chmod(0o600)
    assert read_secret(f"@{private}", what="k") == "xyz"
    private.chmod(0o604)
    with pytest.raises(SecretError, match="readable by others"):
        read_secret(f"@{private}", what="k")
    with pytest.raises(SecretError, match="in the clear"):
        read_secret("xyz", what="k")


def test_auth_sends_each_group_only_its_own_key_and_never_prints_it() -> None:
    auth = Auth({"inference": ("Infer-Key", "i"), "model-repository,statistics": ("admin-key", "a")})
    assert auth.grpc_metadata("ModelInfer") == ("triton-grpc-protocol-infer-key", "i")
    assert auth.grpc_metadata("RepositoryModelLoad") == ("triton-grpc-protocol-admin-key", "a")
    assert auth.grpc_metadata("ModelStatistics") == ("triton-grpc-protocol-admin-key", "a")
    assert auth.grpc_metadata("ServerReady") is None
    assert "'a'" not in repr(auth) and "'i'" not in repr(auth) and "***" in repr(auth)
    with pytest.raises(ValueError, match="unknown protocol group 'repository'"):
        Auth({"repository": ("k", "v")})
