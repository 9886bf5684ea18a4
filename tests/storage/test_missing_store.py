"""A store that is not there is an error for every operation, never an empty store.

On S3 a missing bucket answers every request with NoSuchBucket. A local store's root is its
bucket: a ``file://`` URL with a typo must not start a new archive on a write, nor read as an
archive with nothing in it. Both backends, through the same operations; the local one also for
a root that is a regular file, and for a root that disappears after the store was opened.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devrig.moto import MotoServer, StorageTarget, local_target, s3_target
from storage.base import Storage, UploadedPart, sha256_hex
from storage.errors import PermanentStorageError
from storage.factory import open_storage

UPLOAD_ID = "0" * 32
OPERATIONS: dict[str, Callable[[Storage], Any]] = {
    "put": lambda s: s.put("b1/manifest.json", b"{}"),
    "put-if-absent": lambda s: s.put("wal_archive/cloud-dump-archive.json", b"{}", if_absent=True),
    "get": lambda s: s.get("b1/manifest.json"),
    "get-range": lambda s: s.get_range("b1/base.tar.zst", 0, 10),
    "head": lambda s: s.head("wal_archive/cloud-dump-archive.json"),
    "list-all": lambda s: list(s.list("")),
    "list-prefix": lambda s: list(s.list("wal_archive/")),
    "delete": lambda s: s.delete("b1/backup.claim"),
    "create-multipart": lambda s: s.create_multipart("b1/base.tar.zst"),
    "upload-part": lambda s: s.upload_part("b1/base.tar.zst", UPLOAD_ID, 1, b"x",
                                           sha256=sha256_hex(b"x")),
    "complete-multipart": lambda s: s.complete_multipart(
        "b1/base.tar.zst", UPLOAD_ID, [UploadedPart(1, "e", 1, sha256_hex(b"x"))]),
    "abort-multipart": lambda s: s.abort_multipart("b1/base.tar.zst", UPLOAD_ID),
    "list-multipart": lambda s: s.list_multipart_uploads(""),
}  # fmt: skip


@pytest.fixture(params=["local", "s3"])
def missing_store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[StorageTarget, str]:
    """A store that does not exist, and the words its every error must carry."""
    if request.param == "local":
        root = tmp_path / "no-such-store"
        return local_target(root, create=False), f"storage directory '{root}' does not exist"
    server: MotoServer = request.getfixturevalue("moto_server")
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    target = s3_target(server.endpoint, bucket, request.getfixturevalue("aws_env"))
    return target, f"bucket '{bucket}' does not exist"


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_every_operation_on_a_store_that_does_not_exist_is_a_permanent_error(
    missing_store: tuple[StorageTarget, str], operation: str, tmp_path: Path
) -> None:
    target, words = missing_store
    if target.kind == "s3" and operation == "head":
        # S3 answers HEAD without a body: a missing bucket's 404 reads as a missing object.
        # Callers that tell "no store" from "no object" list or get as well (walarchive).
        words = "object 'wal_archive/cloud-dump-archive.json' not found"
    store = target.open()
    with pytest.raises(PermanentStorageError, match=words):
        OPERATIONS[operation](store)
    store.close()
    assert not (tmp_path / "no-such-store").exists()


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_every_operation_on_a_local_root_that_is_a_file_names_it(
    operation: str, tmp_path: Path
) -> None:
    root = tmp_path / "a-file"
    root.write_bytes(b"not a store")
    store = open_storage(f"file://{root}")
    with pytest.raises(PermanentStorageError, match=f"storage directory '{root}' is not a dir"):
        OPERATIONS[operation](store)
    assert root.read_bytes() == b"not a store"


def test_a_local_root_removed_while_in_use_is_not_recreated(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = local_target(root).open()
    store.put("wal_archive/a", b"1")
    store.create_multipart("b1/base.tar.zst")
    (root / "wal_archive" / "a").unlink()
    (root / "wal_archive").rmdir()
    for entry in (root / ".cloud-dump-uploads").iterdir():
        for part in entry.iterdir():
            part.unlink()
        entry.rmdir()
    (root / ".cloud-dump-uploads").rmdir()
    root.rmdir()
    with pytest.raises(PermanentStorageError, match="does not exist"):
        store.put("wal_archive/b", b"2")
    assert not root.exists()


def test_a_local_store_creates_what_is_under_its_root(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = local_target(root).open()
    store.put("c1/backup/b1/manifest.json", b"{}")
    upload = store.create_multipart("c1/backup/b1/base.tar.zst")
    assert (root / "c1" / "backup" / "b1" / "manifest.json").read_bytes() == b"{}"
    assert [u.upload_id for u in store.list_multipart_uploads("c1/")] == [upload]
    # A store that exists and is empty: listings are empty, a missing object is just missing.
    empty = local_target(tmp_path / "empty").open()
    assert list(empty.list("")) == [] and empty.list_multipart_uploads("") == []
    empty.delete("nothing/here")
