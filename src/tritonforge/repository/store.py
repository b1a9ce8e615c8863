"""Put a model repository into object storage, where Triton (``--model-repository=s3://...``) reads it.

URLs are Triton's own, so the one pushed to is the one to serve from:

- ``s3://bucket/prefix`` (AWS; region and credentials from boto3's usual chain: environment, profile,
  IRSA), or ``s3://http://host:port/bucket/prefix`` for an S3-compatible server (MinIO, Ceph, moto);
- ``gs://bucket/prefix`` (needs ``google-cloud-storage``; credentials from the environment);
- ``as://account/container/prefix`` (Azure; ``azure://`` is taken too; needs ``azure-storage-blob``,
  credentials from ``AZURE_STORAGE_CONNECTION_STRING`` or ``AZURE_STORAGE_KEY``).

The repository is checked first (a repository with errors is refused, nothing sent). Files already in the
store with the same content (S3's ETag is the MD5 of a single-part upload) are skipped; every model's
``config.pbtxt`` goes last, so a server starting mid-push never finds a config whose version files are not
there yet. Objects under the prefix that the repository no longer has are reported, never deleted: a
model folder left there would still be loaded by Triton, so the report says so.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritonforge.errors import RepositoryError

__all__ = ["PushResult", "StoreURL", "parse_store_url", "push_repository", "repository_files"]

#: what to install for each store's client library
_LIBRARIES = {"s3": ("boto3", "boto3"), "gs": ("google.cloud.storage", "google-cloud-storage")}
_LIBRARIES["as"] = ("azure.storage.blob", "azure-storage-blob")
_FORMS = "s3://BUCKET/PREFIX, s3://http://HOST:PORT/BUCKET/PREFIX, gs://BUCKET/PREFIX, as://ACCOUNT/CONTAINER/PREFIX"
_S3_ENDPOINT = re.compile(r"^s3://(https?://[^/]+)/([^/]+)/?(.*)$")
_PLAIN = re.compile(r"^(s3|gs)://([^/]+)/?(.*)$")
_AZURE = re.compile(r"^(?:as|azure)://([^/]+)/([^/]+)/?(.*)$")


@dataclass(frozen=True)
class StoreURL:
    """A parsed store URL: ``scheme`` (s3, gs, as), bucket (container), key prefix, endpoint, account."""

    scheme: str
    bucket: str
    prefix: str
    endpoint: str | None = None
    account: str | None = None

    @property
    def triton_url(self) -> str:
        """The URL to give ``tritonserver --model-repository``."""
        tail = f"/{self.prefix}" if self.prefix else ""
        if self.scheme == "as":
            return f"as://{self.account}/{self.bucket}{tail}"
        if self.endpoint:
            return f"s3://{self.endpoint}/{self.bucket}{tail}"
        return f"{self.scheme}://{self.bucket}{tail}"

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative


@dataclass
class PushResult:
    """What a push did: files sent, files already there, bytes sent, and objects the repository lacks."""

    url: str
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    stale: list[str] = field(default_factory=list)


def parse_store_url(url: str) -> StoreURL:
    """Read a store URL (see the module docstring for the forms).

    Raises:
        ValueError: any other form, naming the accepted ones.
    """
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, not {type(url).__name__}")
    text = url.strip()
    match = _S3_ENDPOINT.match(text)
    if match:
        return StoreURL("s3", match[2], match[3].strip("/"), endpoint=match[1])
    match = _PLAIN.match(text)
    if match and match[2] not in ("http:", "https:"):
        return StoreURL(match[1], match[2], match[3].strip("/"))
    match = _AZURE.match(text)
    if match:
        return StoreURL("as", match[2], match[3].strip("/"), account=match[1])
    raise ValueError(f"store URL {url!r} is not one of {_FORMS}")


def repository_files(repo: Path) -> list[tuple[str, Path]]:
    """``(relative key, file)`` for every file Triton may read, ``config.pbtxt`` files last; hidden files
    and folders (staging, caches) and ``__pycache__`` left out."""
    found = []
    for path in sorted(repo.rglob("*")):
        parts = path.relative_to(repo).parts
        if any(p.startswith(".") or p == "__pycache__" for p in parts) or not path.is_file():
            continue
        found.append(("/".join(parts), path))
    return sorted(found, key=lambda item: (item[0].endswith("/config.pbtxt"), item[0]))


def push_repository(repo: str | os.PathLike[str], url: str) -> PushResult:
    """Upload ``repo`` to the store at ``url`` (Triton's own URL forms), skipping unchanged files.

    Raises:
        RepositoryError: the repository has errors (``tritonforge validate`` lists them), the store's
            library is not installed (names the package), or the store refused (names the bucket and why).
        ValueError: ``url`` is not a store URL.
    """
    from tritonforge.repository.checker import check_repository

    root = Path(repo)
    target = parse_store_url(url)
    if not root.is_dir():
        raise RepositoryError(
            f"no model repository at {root}; nothing was pushed (give the repository's folder)"
        )
    errors = [p for p in check_repository(root) if p.severity == "error"]
    if errors:
        raise RepositoryError(
            f"{root} has {len(errors)} error(s), first: {errors[0]}; nothing was pushed "
            f"(`tritonforge validate {root}` lists them)"
        )
    store = _open(target)
    result = PushResult(url=target.triton_url)
    try:
        existing = dict(store.list())
        wanted = repository_files(root)
        for relative, path in wanted:
            key = target.key(relative)
            if existing.get(key) == _md5(path):
                result.unchanged.append(relative)
                continue
            store.put(key, path)
            result.uploaded.append(relative)
            result.bytes_sent += path.stat().st_size
        keys = {target.key(relative) for relative, _ in wanted}
        result.stale = sorted(k for k in existing if k not in keys)
    except RepositoryError:
        raise
    except Exception as exc:  # the client library's own errors: one line naming the store and the cause
        raise RepositoryError(f"can't push to {target.triton_url}: {type(exc).__name__}: {exc}") from None
    return result


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open(target: StoreURL) -> Any:
    module, package = _LIBRARIES[target.scheme]
    try:
        __import__(module)
    except ImportError:
        raise RepositoryError(
            f"{target.scheme}:// stores need the {package} package: pip install {package}"
        ) from None
    if target.scheme == "s3":
        return _S3(target)
    if target.scheme == "gs":
        return _GCS(target)
    return _Azure(target)


class _S3:
    def __init__(self, target: StoreURL) -> None:
        import boto3

        self.target = target
        self.client = boto3.client("s3", endpoint_url=target.endpoint)

    def list(self) -> Iterator[tuple[str, str]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.target.bucket, Prefix=self.target.key("")
        )
        for page in pages:
            for item in page.get("Contents", ()):
                yield item["Key"], item.get("ETag", "").strip('"')

    def put(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.target.bucket, key)


class _GCS:  # not run here: google-cloud-storage is not installed where this was written
    def __init__(self, target: StoreURL) -> None:
        from google.cloud import storage

        self.target = target
        self.bucket = storage.Client().bucket(target.bucket)

    def list(self) -> Iterator[tuple[str, str]]:
        import base64

        for blob in self.bucket.list_blobs(prefix=self.target.key("")):
            yield blob.name, base64.b64decode(blob.md5_hash or "").hex()

    def put(self, key: str, path: Path) -> None:
        self.bucket.blob(key).upload_from_filename(str(path))


class _Azure:  # not run here: azure-storage-blob is not installed where this was written
    def __init__(self, target: StoreURL) -> None:
        from azure.storage.blob import ContainerClient

        connection = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        if connection:
            self.container = ContainerClient.from_connection_string(connection, target.bucket)
        else:
            self.container = ContainerClient(
                f"https://{target.account}.blob.core.windows.net",
                target.bucket,
                credential=os.environ.get("AZURE_STORAGE_KEY"),
            )
        self.target = target

    def list(self) -> Iterator[tuple[str, str]]:
        for blob in self.container.list_blobs(name_starts_with=self.target.key("")):
            md5 = blob.content_settings.content_md5
            yield blob.name, bytes(md5).hex() if md5 else ""

    def put(self, key: str, path: Path) -> None:
        with path.open("rb") as stream:
            self.container.upload_blob(key, stream, overwrite=True)
