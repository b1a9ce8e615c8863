"""`serve` applies an access rule to both protocols: the security page's example, run as written by the real
`tritonforge serve`, refuses every unkeyed call on gRPC and on HTTP (inference, config, statistics,
logging, repository) and answers the keyed ones; health and metadata stay open.

Also: the rule as a library function (mirroring, ``as-given``, Triton's own refusals up front), and every
group name it takes is one the real tritonserver 2.51 takes on both protocols.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout_models import mlp
from tritonforge.client import Auth, Client
from tritonforge.errors import AuthenticationError, ServerError
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer, free_port
from tritonforge.server.access import RESTRICTABLE_GROUPS, restrict_both

ADMIN_KEY = "adm-" + os.urandom(8).hex()
INFER_KEY = "inf-" + os.urandom(8).hex()
X = np.random.default_rng(1).random((2, 8), dtype=np.float32)
ADMIN_GROUPS = "model-repository,model-config,statistics,logging,trace"


# -- the rule, without a server ----------------------------------------------------------------------------


def test_restrict_both_mirrors_each_group_onto_the_protocol_that_lacks_it() -> None:
    plan = restrict_both(
        [f"{ADMIN_GROUPS}:admin-key=@/k", "inference:infer-key=env:K"], ["model-repository:admin-key=@/k"]
    )
    assert plan.http == (
        "model-repository:admin-key=@/k",
        "inference:infer-key=env:K",
        "model-config,statistics,trace,logging:admin-key=@/k",
    )
    assert plan.grpc == (f"{ADMIN_GROUPS}:admin-key=@/k", "inference:infer-key=env:K")
    assert plan.mirrored == {"HTTP": ("inference", "model-config", "statistics", "trace", "logging")}
    assert plan.summary.startswith(
        "access: inference, model-config, model-repository, statistics, trace, logging"
    )
    assert "@/k" not in plan.summary and "env:K" not in plan.summary


def test_restrict_both_mirrors_http_onto_grpc_too_and_keeps_groups_restricted_on_both_as_given() -> None:
    plan = restrict_both(["inference:a=1"], ["inference:b=2", "statistics:c=3"])
    assert plan.grpc == ("inference:a=1", "statistics:c=3") and plan.http == (
        "inference:b=2",
        "statistics:c=3",
    )
    assert plan.mirrored == {"gRPC": ("statistics",)}


def test_restrict_both_as_given_leaves_each_protocol_alone_and_says_what_is_open() -> None:
    plan = restrict_both(["inference,statistics:k=v"], [], "as-given")
    assert plan.grpc == ("inference,statistics:k=v",) and plan.http == ()
    assert plan.summary == (
        "access: inference, statistics restricted on gRPC only, open on HTTP "
        "(--restriction-scope as-given; 'both' restricts both protocols)"
    )


def test_restrict_both_counts_the_arguments_passed_through_and_never_repeats_them() -> None:
    plan = restrict_both(["inference:k=v"], [], extra_args=["--http-restricted-api", "inference:k=w"])
    assert plan.http == () and plan.mirrored == {}


@pytest.mark.parametrize(
    ("grpc", "http", "says"),
    [
        (["inference:a=1", "inference,logging:b=2"], [], "group 'inference' is restricted twice"),
        (["infer:a=1"], [], "unknown group 'infer'; Triton's groups are health, metadata"),
        ([], ["inference"], "--http-restricted-api 'inference'=...: expected"),
    ],
)
def test_restrict_both_refuses_what_triton_would_refuse_at_start(
    grpc: list[str], http: list[str], says: str
) -> None:
    with pytest.raises(ServerError, match=says):
        restrict_both(grpc, http)


def test_every_group_the_rule_takes_is_taken_by_the_real_tritonserver_on_both_protocols(
    tmp_path: Path,
) -> None:
    spec = f"{','.join(RESTRICTABLE_GROUPS)}:k=v"
    with EmbeddedServer(tmp_path, grpc_restricted_protocols=[spec], http_restricted_apis=[spec]) as server:
        assert _http(server.http_url, "GET", "/v2/health/ready", {"k": "v"})[0] == 200
        assert _http(server.http_url, "GET", "/v2/health/ready")[0] != 200


# -- the security page's example, through the real `tritonforge serve` ---------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("serve_access")
    repo = root / "repo"
    add_model(repo, "clf", mlp(root / "clf.onnx"), max_batch_size=16)
    key_file = root / "admin-key"
    key_file.write_text(ADMIN_KEY + "\n")
    key_file.chmod(0o600)
    ports = {name: free_port() for name in ("grpc", "http", "metrics")}
    args = [
        sys.executable, "-m", "tritonforge", "serve", str(repo),
        "--model-control", "explicit", "--load-model", "*",
        "--grpc-port", str(ports["grpc"]), "--http-port", str(ports["http"]),
        "--metrics-port", str(ports["metrics"]),
        "--grpc-restricted-protocol", f"{ADMIN_GROUPS}:admin-key=@{key_file}",
        "--grpc-restricted-protocol", "inference,shared-memory:infer-key=env:INFER_KEY",
        "--http-restricted-api", f"model-repository:admin-key=@{key_file}",
    ]  # fmt: skip
    env = {**os.environ, "INFER_KEY": INFER_KEY, "COLUMNS": "200"}
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if "Ctrl-C stops the server" in line:
                break
        assert any("Ctrl-C stops the server" in line for line in lines), "\n".join(lines)
        yield {
            "grpc": f"127.0.0.1:{ports['grpc']}",
            "http": f"http://127.0.0.1:{ports['http']}",
            "lines": lines,
        }
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _http(
    base: str, method: str, path: str, headers: dict[str, str] | None = None, body: Any = None
) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        base + path, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


INFER_BODY = {"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32", "data": X.ravel().tolist()}]}
HTTP_CALLS = {
    "inference": ("POST", "/v2/models/clf/infer", INFER_BODY),
    "model-config": ("GET", "/v2/models/clf/config", None),
    "statistics": ("GET", "/v2/models/clf/stats", None),
    "logging": ("POST", "/v2/logging", {"log_verbose_level": 0}),
    "model-repository": ("POST", "/v2/repository/index", {}),
    "trace": ("GET", "/v2/trace/setting", None),
}
KEYS = {"inference": ("infer-key", INFER_KEY)} | {
    group: ("admin-key", ADMIN_KEY) for group in ADMIN_GROUPS.split(",")
}


def test_serve_says_in_one_line_that_it_restricts_both_protocols(served: dict[str, Any]) -> None:
    (line,) = [line for line in served["lines"] if line.startswith("access:")]
    assert line == (
        "access: inference, shared-memory, model-config, model-repository, statistics, trace, logging "
        "restricted on gRPC and HTTP alike (mirrored onto HTTP: inference, shared-memory, model-config, "
        "statistics, trace, logging)"
    )
    assert ADMIN_KEY not in "\n".join(served["lines"]) and INFER_KEY not in "\n".join(served["lines"])


@pytest.mark.parametrize("group", sorted(HTTP_CALLS))
def test_the_documented_example_refuses_an_unkeyed_http_call_and_answers_a_keyed_one(
    served: dict[str, Any], group: str
) -> None:
    method, path, body = HTTP_CALLS[group]
    status, text = _http(served["http"], method, path, body=body)
    assert status in (401, 403), (status, text)
    wrong = {KEYS[group][0]: "not-the-key"}
    assert _http(served["http"], method, path, wrong, body)[0] in (401, 403)
    status, text = _http(served["http"], method, path, dict([KEYS[group]]), body)
    assert status == 200, text


def test_the_documented_example_leaves_health_and_metadata_open_on_http(served: dict[str, Any]) -> None:
    assert _http(served["http"], "GET", "/v2/health/ready")[0] == 200
    assert _http(served["http"], "GET", "/v2/models/clf")[0] == 200


def test_the_documented_example_refuses_unkeyed_grpc_calls_and_answers_keyed_ones(
    served: dict[str, Any],
) -> None:
    with Client(served["grpc"]) as anonymous:
        assert anonymous.model_metadata("clf").name == "clf"  # metadata is open
        for call in (
            lambda: anonymous.infer("clf", {"x": X}),
            lambda: anonymous.model_config("clf"),
            lambda: anonymous.model_statistics("clf"),
            lambda: anonymous.repository_index(),
        ):
            with pytest.raises(AuthenticationError):
                call()
    auth = Auth({"inference": ("infer-key", INFER_KEY), ADMIN_GROUPS: ("admin-key", ADMIN_KEY)})
    with Client(served["grpc"], auth=auth) as keyed:
        assert keyed.infer("clf", {"x": X})["probs"].shape == (2, 3)
        assert keyed.model_config("clf").name == "clf"
        assert keyed.model_statistics("clf")["model_stats"]


def test_serve_refuses_a_group_restricted_twice_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tritonforge.cli import run

    monkeypatch.setenv("TF_TEST_KEY", "x")
    spec = ["--grpc-restricted-protocol", "inference:a=env:TF_TEST_KEY"]
    code = run(["serve", str(tmp_path), *spec, "--grpc-restricted-protocol", "inference:b=env:TF_TEST_KEY"])
    err = capsys.readouterr().err
    assert code == 1 and "group 'inference' is restricted twice" in err and len(err.strip().splitlines()) == 1


# -- property-based: any specs give a plan that restricts both protocols alike, or our one-line error -----

GROUP_NAMES = st.sampled_from([*RESTRICTABLE_GROUPS, "infer", "", "Inference"])
SPECS = st.lists(
    st.one_of(
        st.builds(
            lambda groups, key, value: f"{','.join(groups)}:{key}={value}",
            st.lists(GROUP_NAMES, min_size=1, max_size=3),
            st.sampled_from(["k", "admin-key", "a=b", ""]),
            st.text(max_size=4),
        ),
        st.text(max_size=12),
    ),
    max_size=3,
)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(grpc=SPECS, http=SPECS)
def test_any_specs_restrict_both_protocols_alike_or_get_one_clear_error(
    grpc: list[str], http: list[str]
) -> None:
    try:
        plan = restrict_both(grpc, http)
    except ServerError as exc:
        assert "\n" not in exc.message
        return

    def groups(specs: tuple[str, ...]) -> dict[str, str]:
        found: dict[str, str] = {}
        for spec in specs:
            names, _, rest = spec.partition(":")
            for name in names.split(","):
                assert name not in found  # Triton refuses a group twice on one protocol
                found[name] = rest
        return found

    on_grpc, on_http = groups(plan.grpc), groups(plan.http)
    assert set(on_grpc) == set(on_http) and set(on_grpc) <= set(RESTRICTABLE_GROUPS)
    assert plan.grpc[: len(grpc)] == tuple(grpc) and plan.http[: len(http)] == tuple(http)
