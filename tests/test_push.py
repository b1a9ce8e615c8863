"""`tritonforge push` into a real S3-compatible server (moto's, on loopback), then Triton's s3:// loading."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

import tiny_models
from cli_runner import cli_env
from conftest import triton_infer
from tritonforge.config import DataType, ModelConfig, TensorSpec
from tritonforge.repository import add_model
from tritonforge.repository.store import parse_store_url, push_repository
from tritonforge.server import EmbeddedServer

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "tritonforge-test",
    "AWS_SECRET_ACCESS_KEY": "tritonforge-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKET = "models"

DOUBLE = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", x * 2)]))
        return out
"""


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port, with a bucket; stopped at the end."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
        client.create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()
    with socket.socket() as sock, pytest.raises(OSError):  # nothing left listening
        sock.settimeout(2)
        sock.connect(("127.0.0.1", port))


@pytest.fixture()
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("push") / "repo"
    add_model(repo, "mlp", tiny_models.mlp_onnx(repo.parent / "mlp.onnx"), max_batch_size=8)
    (repo.parent / "model.py").write_text(DOUBLE)
    config = ModelConfig(
        name="double",
        backend="python",
        max_batch_size=8,
        inputs=[TensorSpec(name="IN", dtype=DataType.FP32, dims=[2])],
        outputs=[TensorSpec(name="OUT", dtype=DataType.FP32, dims=[2])],
    )
    add_model(repo, "double", repo.parent / "model.py", config)
    return repo


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


def _keys(endpoint: str, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))


def test_store_urls_are_tritons_own_forms() -> None:
    assert (
        parse_store_url("s3://http://127.0.0.1:9000/b/p/q").triton_url == "s3://http://127.0.0.1:9000/b/p/q"
    )
    assert parse_store_url("s3://bucket").prefix == ""
    assert parse_store_url("gs://bucket/models/").triton_url == "gs://bucket/models"
    assert parse_store_url("azure://acct/cont/pre").triton_url == "as://acct/cont/pre"
    with pytest.raises(ValueError, match="is not one of s3://BUCKET/PREFIX"):
        parse_store_url("ftp://host/x")


def push_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`tritonforge push ARGS` as a user runs it, with the store's credentials in the environment only."""
    return subprocess.run(
        [sys.executable, "-m", "tritonforge", "push", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**cli_env(), **CREDENTIALS},
    )


def test_push_uploads_then_triton_serves_the_repository_from_s3(
    small_repo: Path, s3_endpoint: str, aws_env: None, tmp_path: Path
) -> None:
    url = f"s3://{s3_endpoint}/{BUCKET}/prod/repo"
    done = push_cli(str(small_repo), url, "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["url"] == url and record["unchanged"] == [] and record["stale"] == []
    assert record["uploaded"][-2:] == ["double/config.pbtxt", "mlp/config.pbtxt"]  # configs last
    assert _keys(s3_endpoint, "prod/repo/") == sorted(f"prod/repo/{k}" for k in record["uploaded"])
    # Triton's own S3 loading: it downloads the repository and serves it (credentials from the env)
    with EmbeddedServer(url) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            x = np.random.default_rng(0).random((2, 8), dtype=np.float32)
            assert triton_infer(client, "mlp", {"x": x})["probs"].shape == (2, 3)
            y = np.ones((1, 2), np.float32)
            np.testing.assert_array_equal(triton_infer(client, "double", {"IN": y})["OUT"], y * 2)
        finally:
            client.close()
    # pushed again unchanged: nothing sent; a model removed from the repository is reported, not deleted
    again = push_repository(small_repo, url)
    assert again.uploaded == [] and len(again.unchanged) == len(record["uploaded"])
    copy = tmp_path / "repo"
    shutil.copytree(small_repo, copy)
    shutil.rmtree(copy / "double")
    fewer = push_repository(copy, url)
    assert (
        fewer.uploaded == [] and fewer.stale and all(k.startswith("prod/repo/double/") for k in fewer.stale)
    )


def test_triton_refuses_an_s3_repository_it_cant_read(s3_endpoint: str, aws_env: None) -> None:
    from tritonforge.errors import ServerError

    with (
        pytest.raises(ServerError),
        EmbeddedServer(f"s3://{s3_endpoint}/no-such-bucket/x", startup_timeout_s=60),
    ):
        pass


def test_push_refuses_in_one_line(small_repo: Path, tmp_path: Path, s3_endpoint: str, aws_env: None) -> None:
    gs = push_cli(str(small_repo), "gs://bucket/models")
    assert gs.returncode == 1
    assert (
        gs.stderr.strip()
        == "error: gs:// stores need the google-cloud-storage package: pip install google-cloud-storage"
    )
    bad_url = push_cli(str(small_repo), "ftp://host/models")
    assert bad_url.returncode == 2 and "is not one of s3://BUCKET/PREFIX" in bad_url.stderr
    broken = tmp_path / "broken"
    (broken / "m" / "1").mkdir(parents=True)
    (broken / "m" / "config.pbtxt").write_text("this is not a config {")
    refused = push_cli(str(broken), f"s3://{s3_endpoint}/{BUCKET}/broken")
    assert refused.returncode == 1 and "nothing was pushed" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert _keys(s3_endpoint, "broken/") == []
    missing_bucket = push_cli(str(small_repo), f"s3://{s3_endpoint}/no-such-bucket/x")
    assert missing_bucket.returncode == 1 and "NoSuchBucket" in missing_bucket.stderr
    assert os.environ["AWS_ACCESS_KEY_ID"] == CREDENTIALS["AWS_ACCESS_KEY_ID"]
