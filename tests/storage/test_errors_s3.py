"""How the S3 backend fails, and S3-only behaviour the shared contract suite cannot show.

Failures must arrive as the project's own errors with messages an operator can act on: the
endpoint or bucket named, never a credential.
"""

from __future__ import annotations

from collections.abc import Callable
from multiprocessing import get_context
from pathlib import Path

import boto3
import pytest

from devrig.moto import S3_PREFIX, MotoServer, StorageTarget, s3_target
from devrig.procs import free_port
from storage.base import Storage, sha256_hex
from storage.errors import (
    ConfigError,
    ObjectNotFound,
    PermanentStorageError,
    StorageUnreachable,
)
from storage.factory import open_storage
from storage.options import StorageOptions


def test_unreachable_endpoint_is_storage_unreachable_naming_the_endpoint(
    aws_env: dict[str, str],
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    options = StorageOptions(s3_endpoint=endpoint, max_attempts=2, connect_timeout_s=1.0)
    store = open_storage("s3://some-bucket/x", options)

    with pytest.raises(StorageUnreachable) as caught:
        store.get("k")

    message = str(caught.value)
    assert message == f"cannot reach storage endpoint '{endpoint}': connection refused"
    assert aws_env["AWS_SECRET_ACCESS_KEY"] not in message
    store.close()


@pytest.mark.parametrize("operation", ["get", "put", "list", "create_multipart"])
def test_missing_bucket_is_a_permanent_error_naming_the_bucket(
    moto_server: MotoServer, aws_env: dict[str, str], operation: str
) -> None:
    store = s3_target(moto_server.endpoint, "cd-no-such-bucket", aws_env).open()
    calls: dict[str, Callable[[], object]] = {
        "get": lambda: store.get("k"),
        "put": lambda: store.put("k", b"x"),
        "list": lambda: list(store.list("")),
        "create_multipart": lambda: store.create_multipart("k"),
    }

    with pytest.raises(PermanentStorageError) as caught:
        calls[operation]()

    assert not isinstance(caught.value, ObjectNotFound)
    assert str(caught.value) == "bucket 'cd-no-such-bucket' does not exist"
    store.close()


def test_missing_credentials_are_a_permanent_error_saying_what_to_set(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    # Keep boto3's chain from finding anything else on this machine (files, instance metadata).
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = open_storage("s3://b1", StorageOptions(s3_endpoint=moto_server.endpoint))

    with pytest.raises(PermanentStorageError, match=r"^no storage credentials found: set AWS_"):
        store.get("k")
    store.close()


@pytest.mark.parametrize(
    "url",
    [
        "s3://",
        "s3:///only/a/path",
        "s3://bad bucket!/x",
        "s3://bucket/../escape",
        "file://relative/path",
        "file://otherhost/path",
        "ftp://host/path",
        "/plain/path",
        "",
    ],
)
def test_bad_storage_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        open_storage(url)


def test_endpoint_without_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="invalid S3 endpoint 'localhost:9000'"):
        open_storage("s3://bucket", StorageOptions(s3_endpoint="localhost:9000"))


def test_url_hides_nothing_secret_and_names_bucket_and_prefix() -> None:
    assert open_storage("s3://bucket/a/b/").url == "s3://bucket/a/b"
    assert open_storage("s3://bucket").url == "s3://bucket"


def test_keys_live_under_the_url_prefix_in_the_bucket(
    moto_server: MotoServer, aws_env: dict[str, str], s3_bucket: str
) -> None:
    target = s3_target(moto_server.endpoint, s3_bucket, aws_env)
    store = target.open()
    store.put("b1/manifest.json", b"{}")
    client = boto3.session.Session().client("s3", endpoint_url=moto_server.endpoint)

    stored = client.list_objects_v2(Bucket=s3_bucket)["Contents"]

    assert [o["Key"] for o in stored] == [f"{S3_PREFIX}/b1/manifest.json"]
    assert [i.key for i in store.list("")] == ["b1/manifest.json"]
    client.close()
    store.close()


def test_multipart_object_reports_no_whole_object_checksum(
    moto_server: MotoServer, aws_env: dict[str, str], s3_bucket: str
) -> None:
    store = s3_target(moto_server.endpoint, s3_bucket, aws_env).open()
    upload_id = store.create_multipart("mp")
    part = store.upload_part("mp", upload_id, 1, b"abc", sha256=sha256_hex(b"abc"))
    store.complete_multipart("mp", upload_id, [part])

    info = store.head("mp")

    # S3 keeps a checksum of part checksums for multipart objects, not the object's SHA-256.
    assert info.size == 3
    assert info.checksum_sha256 is None
    store.close()


def put_from_forked_child(store: Storage) -> None:
    store.put("from-child", b"child bytes")


def test_storage_opened_before_a_fork_works_in_the_child(
    moto_server: MotoServer, aws_env: dict[str, str], s3_bucket: str
) -> None:
    target: StorageTarget = s3_target(moto_server.endpoint, s3_bucket, aws_env)
    store = target.open()
    store.put("from-parent", b"parent bytes")  # the parent's client now exists

    child = get_context("fork").Process(target=put_from_forked_child, args=(store,))
    child.start()
    child.join(timeout=60)

    assert child.exitcode == 0
    assert store.get("from-child") == b"child bytes"
    assert store.get("from-parent") == b"parent bytes"
    store.close()
