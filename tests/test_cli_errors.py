"""Every verb of `tritonforge`, given bad input, answers with one line on stderr and a non-zero exit code
(never a traceback), and `tritonforge serve` mirrors tritonserver's own flags on a real server."""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

import tiny_models
from cli_runner import run_tritonforge, tritonforge_process
from tritonforge.repository import add_model

run_cli = functools.partial(run_tritonforge, timeout=120, columns=None)  # piped, no COLUMNS: 80 wide


# verb -> (arguments, what the one line must say). Paths under /nonexistent never exist.
BAD_INPUT: dict[str, tuple[list[str], str]] = {
    "serve": (["/nonexistent/repo"], "model repository /nonexistent/repo does not exist"),
    "add-model": (["/nonexistent/repo", "m", "/nonexistent/model.onnx"], "does not exist"),
    "validate": (["/nonexistent/repo"], "1 error(s) in /nonexistent/repo"),
    "push": (["/nonexistent/repo", "s3://bucket/models"], "no model repository at /nonexistent/repo"),
    "demo": (["--requests", "-3", "--bogus"], "No such option: --bogus"),
    "export": (["/nonexistent/model.pkl", "--out", "/nonexistent/out.onnx"], "error: "),
    "quantize": (["/nonexistent/model.onnx", "--out", "/nonexistent/q.onnx"], "error: "),
    "models": (["/nonexistent/repo"], "/nonexistent/repo is not a model repository"),
    "promote": (["/nonexistent/repo", "m", "1"], "no model 'm'"),
    "rollback": (["/nonexistent/repo", "m"], "no model 'm'"),
    "build": (["--no-such-flag"], "No such option: --no-such-flag"),
    "bench": (["m", "--url", "127.0.0.1:1"], "did not answer"),
    "tune": (["m", "--repo", "/nonexistent/repo"], "error: "),
    "ensemble": (["check", "/nonexistent/spec.yaml"], "problem(s) in the pipeline spec(s)"),
    "rollout": (
        ["start", "m", "--url", "127.0.0.1:1", "--repo", "/nonexistent/repo"],
        "give the candidate version",
    ),
    "evaluate": (["m", "--url", "127.0.0.1:1", "--data", "/nonexistent/d.npz"], "error: "),
    "audit": (["/nonexistent/repo"], "/nonexistent/repo is not a model repository"),
    "deploy": (["/nonexistent/repo", "--out", "/nonexistent/out"], "no model repository at /nonexistent"),
    "monitor": (["--metrics-url", "127.0.0.1:1", "--once"], "cannot read Triton's metrics"),
    "slo": (["/nonexistent/slo.yaml", "--out", "/nonexistent/out"], "error: "),
    "drift": (["m", "--store", "/nonexistent/store", "--repo", "/nonexistent/repo"], "error: "),
    "cost": (["/nonexistent/sweep.json", "--price-per-hour", "1"], "error: "),
    "batch-infer": (
        ["m", "--url", "127.0.0.1:1", "--input", "/nonexistent/x.parquet", "--out", "/nonexistent/out"],
        "/nonexistent/x.parquet: no such file or folder",
    ),
}


def _connections(process: psutil.Process) -> list:
    """The process's sockets (psutil < 6, which the kserve SDK pins, names it ``connections``)."""
    return (getattr(process, "net_connections", None) or process.connections)()


def test_every_verb_listed_by_help_has_a_bad_input_case():
    listed = run_cli("--help").stdout.split("Commands:", 1)[1]  # piped: click's plain help
    verbs = set(re.findall(r"^  ([a-z][a-z-]+)\s", listed, flags=re.M))
    assert verbs == set(BAD_INPUT), "add a bad-input case for each new verb"


@pytest.mark.parametrize("verb", sorted(BAD_INPUT))
def test_verb_reports_bad_input_as_one_line_on_stderr_with_a_nonzero_exit(verb: str) -> None:
    args, expected = BAD_INPUT[verb]
    result = run_cli(verb, *args)
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve"], "Missing argument 'REPO'"),
        (["serve", "/tmp", "--model-control", "sometimes"], "'sometimes' is not one of"),
        (["no-such-verb"], "No such command 'no-such-verb'"),
        (["validate", "/tmp", "--", "--x"], "only `tritonforge serve` takes `-- ARGS`"),
        (["serve", "/tmp", "--grpc-restricted-protocol", "everything"], "is not '<protocol>"),
        (["serve", "/tmp", "--grpc-server-cert", "/nonexistent/c.pem"], "needs both"),
    ],
)
def test_usage_errors_are_one_line_naming_the_help_to_read(args: list[str], expected: str) -> None:
    result = run_cli(*args)
    assert result.returncode in (1, 2)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected.lower() in lines[0].lower(), result.stderr


# ---------------------------------------------------------------- serve, as a stand-in for tritonserver


def _listening(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_serve_binds_the_host_polls_the_repo_caches_keeps_its_log_and_passes_tritonserver_flags(tmp_path):
    repo = tmp_path / "repo"
    onnx_file = tiny_models.mlp_onnx(tmp_path / "mlp.onnx")
    add_model(repo, "mlp", onnx_file)
    log = tmp_path / "logs" / "server.log"
    with tritonforge_process(
        "serve", str(repo),
        "--host", "127.0.0.2",
        "--model-control", "poll", "--poll-s", "1",
        "--log-file", str(log),
        "--response-cache-byte-size", "1048576",
        "--", "--exit-timeout-secs=5",
    ) as process:  # fmt: skip
        assert process.stdout is not None
        http = grpc = None
        deadline = time.monotonic() + 180
        while http is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            grpc = grpc or (re.match(r"gRPC\s+(\S+)", line) or [None, None])[1]
            http = (re.match(r"HTTP\s+(\S+)", line) or [None, None])[1]
        assert http and grpc, "serve never printed its addresses"
        assert http.startswith("http://127.0.0.2:") and grpc.startswith("127.0.0.2:")
        server = next(p for p in psutil.Process(process.pid).children() if p.name() == "tritonserver")
        bound = {c.laddr.ip for c in _connections(server) if c.status == psutil.CONN_LISTEN}
        assert bound and bound <= {"127.0.0.2", "::ffff:127.0.0.2"}
        port = int(grpc.rsplit(":", 1)[1])
        assert _listening("127.0.0.2", port) and not _listening("127.0.0.1", port)
        # poll mode: a model added while serving is picked up by Triton's own poller
        add_model(repo, "mlp_late", onnx_file)
        deadline = time.monotonic() + 60
        while not _ready(f"{http}/v2/models/mlp_late/ready") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _ready(f"{http}/v2/models/mlp_late/ready")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    text = log.read_text()  # kept after stop
    assert re.search(r"exit_timeout\s+\|\s+5\s", text), "the flag after -- did not reach tritonserver"
    assert re.search(r"model_control_mode\s+\|\s+MODE_POLL", text)
    assert re.search(r"cache_enabled\s+\|\s+1", text)
    assert "successfully loaded 'mlp_late'" in text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make test certificates")
def test_embedded_server_serves_grpc_over_mutual_tls_and_restricts_repository_control(tmp_path):
    import grpc
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from tritonforge.server import EmbeddedServer

    def make_cert(name: str, signer: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
        key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
        if signer is None:
            args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}"]
            subprocess.run(["openssl", *args, "-keyout", key, "-out", cert], check=True, capture_output=True)
        else:
            csr = tmp_path / f"{name}.csr"
            subj = ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
            subprocess.run(
                ["openssl", "req", "-newkey", "rsa:2048", "-nodes", *subj, "-keyout", key, "-out", csr],
                check=True,
                capture_output=True,
            )
            ext = tmp_path / f"{name}.ext"
            ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
            subprocess.run(
                ["openssl", "x509", "-req", "-in", csr, "-CA", signer[1], "-CAkey", signer[0],
                 "-CAcreateserial", "-days", "1", "-extfile", ext, "-out", cert],
                check=True,
                capture_output=True,
            )  # fmt: skip
        return key, cert

    ca = make_cert("ca")
    server_key, server_cert = make_cert("server", ca)
    client_key, client_cert = make_cert("client", ca)
    repo = tmp_path / "repo"
    add_model(repo, "mlp", tiny_models.mlp_onnx(tmp_path / "mlp.onnx"))
    with EmbeddedServer(
        repo,
        model_control="explicit",
        load_models=["mlp"],
        grpc_server_cert=server_cert,
        grpc_server_key=server_key,
        grpc_root_cert=ca[1],
        grpc_mutual_tls=True,
        http_restricted_apis=["model-repository:admin-key=s3cret"],
    ) as server:
        tls = {
            "ssl": True,
            "root_certificates": str(ca[1]),
            "private_key": str(client_key),
            "certificate_chain": str(client_cert),
        }
        with grpcclient.InferenceServerClient(server.grpc_url, **tls) as client:
            assert client.is_model_ready("mlp")
        without_cert = {"ssl": True, "root_certificates": str(ca[1])}
        with (
            grpcclient.InferenceServerClient(server.grpc_url, **without_cert) as client,
            pytest.raises((InferenceServerException, grpc.RpcError)),
        ):
            client.is_server_live(client_timeout=5)
        # the server's own control calls send the header the restriction asks for
        server.unload_model("mlp")
        assert not server.is_model_ready("mlp")
        request = urllib.request.Request(f"{server.http_url}/v2/repository/index", data=b"{}")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=5)
    assert not os.path.exists(str(server._log_path or ""))
