"""Fixtures for object storage in tests: a real moto S3 server, buckets, and storage targets.

- ``moto_server`` (session): ``moto_server`` started from this venv on a free port.
- ``aws_env`` (session): fake AWS credentials in ``os.environ`` (boto3's standard chain picks
  them up in this process and in every child started afterwards), restored at the end.
- ``moto_admin_client`` (session): a boto3 client on that server, for test set-up.
- ``s3_bucket`` (function): a fresh, uniquely named bucket on that server.
- ``storage_target`` (function, parametrized "local" and "s3"): where a test's store lives (an
  existing directory, or a bucket), with the environment a worker subprocess needs to reach the
  same store; ``storage`` opens it.
- ``s3_store`` (function): a store in a fresh bucket on that server, for S3-only tests.

The S3 server is started only by tests that ask for it, so local-only runs do not pay for it.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from devrig.procs import ServerProcess, free_port, port_open
from storage.base import Storage
from storage.factory import open_storage
from storage.options import StorageOptions

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
S3_PREFIX = "some-prefix"


@dataclass(frozen=True)
class MotoServer:
    endpoint: str
    pid: int


@dataclass(frozen=True)
class StorageTarget:
    """A store a test (and its worker subprocesses) can open."""

    kind: str  # "local" or "s3"
    url: str
    options: StorageOptions
    env: dict[str, str] = field(default_factory=dict)

    def open(self) -> Storage:
        return open_storage(self.url, self.options)


def moto_server_path() -> Path:
    # The venv's own entry point, next to the interpreter running the tests.
    return Path(sys.executable).parent / "moto_server"


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    server = ServerProcess(
        "moto_server",
        [str(moto_server_path()), "-H", "127.0.0.1", "-p", str(port)],
        log_path,
    )
    try:
        server.wait_until(lambda: port_open(port))
        yield MotoServer(endpoint=f"http://127.0.0.1:{port}", pid=server.pid)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def aws_env() -> Iterator[dict[str, str]]:
    saved = {name: os.environ.get(name) for name in FAKE_AWS_ENV}
    os.environ.update(FAKE_AWS_ENV)
    try:
        yield dict(FAKE_AWS_ENV)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def moto_admin_client(moto_server: MotoServer, aws_env: dict[str, str]) -> Iterator[Any]:
    """A boto3 client for setting up the server (buckets); built once, as it costs ~0.2 s."""
    client = boto3.session.Session().client(
        "s3", endpoint_url=moto_server.endpoint, region_name=aws_env["AWS_DEFAULT_REGION"]
    )
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def s3_bucket(moto_admin_client: Any) -> str:
    name = f"cd-test-{uuid.uuid4().hex[:16]}"
    moto_admin_client.create_bucket(Bucket=name)
    return name


def s3_target(endpoint: str, bucket: str, aws_env: dict[str, str]) -> StorageTarget:
    # Few attempts: a test that provokes a server error should not sit through long backoffs.
    options = StorageOptions(s3_endpoint=endpoint, s3_region="us-east-1", max_attempts=2)
    url = f"s3://{bucket}/{S3_PREFIX}"
    env = {"CLOUD_DUMP_STORAGE": url, "CLOUD_DUMP_S3_ENDPOINT": endpoint, **aws_env}
    return StorageTarget("s3", url, options, env)


def local_target(root: Path, *, create: bool = True) -> StorageTarget:
    """A store in directory ``root``, created here unless ``create`` is False: like a bucket,
    a local store's root must exist (cloud-dump creates only what is under it)."""
    if create:
        root.mkdir(parents=True, exist_ok=True)
    url = f"file://{root}"
    return StorageTarget("local", url, StorageOptions(), {"CLOUD_DUMP_STORAGE": url})


@pytest.fixture
def s3_store(moto_server: MotoServer, aws_env: dict[str, str], s3_bucket: str) -> StorageTarget:
    return s3_target(moto_server.endpoint, s3_bucket, aws_env)


@pytest.fixture(params=["local", "s3"], ids=["local", "s3"])
def storage_target(request: pytest.FixtureRequest, tmp_path: Path) -> StorageTarget:
    if request.param == "local":
        return local_target(tmp_path / "store")
    server: MotoServer = request.getfixturevalue("moto_server")
    env: dict[str, str] = request.getfixturevalue("aws_env")
    bucket: str = request.getfixturevalue("s3_bucket")
    return s3_target(server.endpoint, bucket, env)


@pytest.fixture
def storage(storage_target: StorageTarget) -> Iterator[Storage]:
    store = storage_target.open()
    try:
        yield store
    finally:
        store.close()
