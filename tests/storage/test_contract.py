"""The Storage contract (see ``storage/base.py``), run unchanged against every backend.

The ``storage`` fixture is parametrized over the local directory backend and S3 on a real moto
server (``devrig/moto.py``). A behaviour only one backend can show is said so where it is
tested.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pytest

from devrig.moto import StorageTarget, local_target
from storage.base import MiB, ObjectInfo, Storage, UploadedPart, sha256_hex
from storage.errors import (
    ChecksumMismatch,
    ObjectExists,
    ObjectNotFound,
    PartTooSmall,
    StorageError,
    UploadNotFound,
)
from storage.factory import open_storage
from storage.fsutil import TEMP_PREFIX
from storage.local import UPLOADS_DIR
from storage.options import StorageOptions
from storage.urls import local_url

PART_BYTES = 5 * MiB  # the smallest part both backends accept (S3's minimum)


def payload(seed: int, size: int) -> bytes:
    """Deterministic bytes, so that a child process can rebuild what the parent expects."""
    return random.Random(seed).randbytes(size)


# -- objects --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"hello, storage", b"", bytes(range(256)) * 64 + b"\x00\xff\r\n"],
    ids=["text", "empty", "binary"],
)
def test_put_then_get_returns_the_same_bytes(storage: Storage, data: bytes) -> None:
    info = storage.put("backup-1/manifest.json", data)

    assert storage.get("backup-1/manifest.json") == data
    assert info.key == "backup-1/manifest.json"
    assert info.size == len(data)
    assert info.checksum_sha256 == sha256_hex(data)


def test_put_without_condition_replaces_the_object(storage: Storage) -> None:
    storage.put("k", b"first")
    storage.put("k", b"second, longer")

    assert storage.get("k") == b"second, longer"


@pytest.mark.parametrize(
    ("start", "length", "expected"),
    [
        (3, 4, b"3456"),
        (6, 4, b"6789"),
        (8, 100, b"89"),
        (10, 5, b""),
        (50, 5, b""),
        (2, 0, b""),
    ],
    ids=["middle", "up-to-end", "past-end-truncated", "start-at-end", "start-beyond-end", "empty"],
)
def test_get_range_returns_the_bytes_inside_the_object(
    storage: Storage, start: int, length: int, expected: bytes
) -> None:
    storage.put("r", b"0123456789")

    assert storage.get_range("r", start, length) == expected


def test_get_range_of_an_empty_object_is_empty(storage: Storage) -> None:
    storage.put("empty", b"")

    assert storage.get_range("empty", 0, 10) == b""


def test_open_stream_reads_the_object_in_chunks_with_its_metadata(storage: Storage) -> None:
    data = random.Random(7).randbytes(3 * MiB + 17)
    storage.put("streamed", data, metadata={"raw-sha256": "abc"})
    storage.put("plain", b"x")

    stream = storage.open_stream("streamed")
    try:
        chunks = list(iter(lambda: stream.read(MiB), b""))
    finally:
        stream.close()
    plain = storage.open_stream("plain")
    try:
        assert plain.read() == b"x"
        assert plain.metadata == {}
    finally:
        plain.close()

    assert b"".join(chunks) == data
    assert all(len(chunk) <= MiB for chunk in chunks)
    assert stream.metadata == {"raw-sha256": "abc"}


@pytest.mark.parametrize("operation", ["get", "get_range", "head", "open_stream"])
def test_reading_a_missing_object_raises_object_not_found(storage: Storage, operation: str) -> None:
    storage.put("present/file", b"x")  # the store and its prefix exist; the key does not
    reads: dict[str, Callable[[], object]] = {
        "get": lambda: storage.get("present/missing"),
        "get_range": lambda: storage.get_range("present/missing", 0, 10),
        "head": lambda: storage.head("present/missing"),
        "open_stream": lambda: storage.open_stream("present/missing"),
    }

    with pytest.raises(ObjectNotFound) as caught:
        reads[operation]()
    assert caught.value.key == "present/missing"


def test_reading_from_a_store_never_written_raises_object_not_found(storage: Storage) -> None:
    with pytest.raises(ObjectNotFound):
        storage.get("nothing/here")


def test_delete_removes_the_object_and_deleting_again_is_fine(storage: Storage) -> None:
    storage.put("d/obj", b"x")

    storage.delete("d/obj")
    storage.delete("d/obj")
    storage.delete("never/existed")

    with pytest.raises(ObjectNotFound):
        storage.head("d/obj")


def test_conditional_put_creates_a_free_key(storage: Storage) -> None:
    storage.put("wal/000000010000000000000001.zst", b"segment", if_absent=True)

    assert storage.get("wal/000000010000000000000001.zst") == b"segment"


def test_conditional_put_refuses_an_existing_key_and_keeps_its_bytes(storage: Storage) -> None:
    storage.put("wal/00000002.history", b"original")

    with pytest.raises(ObjectExists) as caught:
        storage.put("wal/00000002.history", b"impostor", if_absent=True)

    assert caught.value.key == "wal/00000002.history"
    assert storage.get("wal/00000002.history") == b"original"


def test_head_reports_size_etag_and_checksum(storage: Storage) -> None:
    data = payload(1, 1000)
    put_info = storage.put("h/obj", data)

    before = time.time()
    info = storage.head("h/obj")

    assert info == ObjectInfo("h/obj", 1000, put_info.etag, sha256_hex(data), {},
                              info.modified_s)
    assert info.etag
    # When it was written, in the store's clock (moto's and this machine's are the same).
    assert info.modified_s is not None and abs(info.modified_s - before) < 60
    assert next(iter(storage.list("h/obj"))).modified_s == pytest.approx(info.modified_s, abs=1)


def test_etag_changes_when_the_object_is_rewritten(storage: Storage) -> None:
    first = storage.put("e", b"one").etag

    second = storage.put("e", b"two!").etag

    assert first != second
    assert storage.head("e").etag == second


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "../escape", "a/./b", "a/../../b", "dir/"])
def test_malformed_keys_are_rejected(storage: Storage, key: str) -> None:
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.put(key, b"x")


# -- listing --------------------------------------------------------------------------------------


def populate(storage: Storage, keys: list[str]) -> None:
    for key in keys:
        storage.put(key, key.encode())


def listed_keys(storage: Storage, prefix: str) -> list[str]:
    return [info.key for info in storage.list(prefix)]


def test_list_returns_nested_keys_under_a_prefix_in_key_order(storage: Storage) -> None:
    populate(storage, ["b/2/z", "a/1", "b/1", "b/2/a", "b-sibling", "c"])

    assert listed_keys(storage, "b/") == ["b/1", "b/2/a", "b/2/z"]
    assert listed_keys(storage, "b/2/") == ["b/2/a", "b/2/z"]


def test_list_with_a_partial_segment_prefix_matches_by_string(storage: Storage) -> None:
    populate(storage, ["backup-2024/x", "backup-2025/y", "backups/z", "other"])

    assert listed_keys(storage, "backup-") == ["backup-2024/x", "backup-2025/y"]
    assert listed_keys(storage, "backups/z") == ["backups/z"]
    assert listed_keys(storage, "nope") == []


def test_list_of_everything_shows_relative_keys_only(storage: Storage) -> None:
    populate(storage, ["one", "two/three"])

    infos = list(storage.list(""))

    # The store URL's own prefix (and any internal bookkeeping) never shows through.
    assert [i.key for i in infos] == ["one", "two/three"]
    assert [i.size for i in infos] == [3, 9]
    assert all(i.etag for i in infos)


def test_list_of_an_empty_store_is_empty(storage: Storage) -> None:
    assert listed_keys(storage, "") == []


def test_list_does_not_show_multipart_uploads_in_progress(storage: Storage) -> None:
    upload_id = storage.create_multipart("big")
    storage.upload_part("big", upload_id, 1, b"x", sha256=sha256_hex(b"x"))

    assert listed_keys(storage, "") == []
    storage.abort_multipart("big", upload_id)


# -- multipart ------------------------------------------------------------------------------------


def upload_part_in_child(
    url: str,
    options: StorageOptions,
    key: str,
    upload_id: str,
    part_number: int,
    size: int,
    offset: int | None = None,
) -> tuple[int, UploadedPart]:
    """Runs in a spawned process: open the store afresh, as a worker would, and upload."""
    data = payload(part_number, size)
    store = open_storage(url, options)
    try:
        return os.getpid(), store.upload_part(
            key, upload_id, part_number, data, sha256=sha256_hex(data), offset=offset
        )
    finally:
        store.close()


def complete_in_child(
    url: str, options: StorageOptions, key: str, upload_id: str, parts: list[UploadedPart]
) -> tuple[int, ObjectInfo]:
    store = open_storage(url, options)
    try:
        return os.getpid(), store.complete_multipart(key, upload_id, parts)
    finally:
        store.close()


@pytest.mark.parametrize("offsets", [False, True], ids=["no-offsets", "offsets-given"])
def test_multipart_from_separate_processes_assembles_the_exact_bytes(
    storage_target: StorageTarget, storage: Storage, offsets: bool
) -> None:
    """Parts sent in reverse order, each by a process of its own; with their offsets, the
    local store writes them in place."""
    key = "backup-1/base.tar.zst"
    sizes = {1: PART_BYTES, 2: PART_BYTES, 3: 12345}
    upload_id = storage.create_multipart(key)
    spawn = get_context("spawn")
    executors = [ProcessPoolExecutor(max_workers=1, mp_context=spawn) for _ in range(4)]
    try:
        uploads: list[Future[tuple[int, UploadedPart]]] = [
            executors[n - 1].submit(
                upload_part_in_child,
                storage_target.url,
                storage_target.options,
                key,
                upload_id,
                n,
                sizes[n],
                (n - 1) * PART_BYTES if offsets else None,
            )
            for n in (3, 2, 1)
        ]
        results = [f.result(timeout=120) for f in uploads]
        parts = sorted((part for _, part in results), key=lambda part: part.part_number)
        completion = executors[3].submit(
            complete_in_child, storage_target.url, storage_target.options, key, upload_id, parts
        )
        pid, info = completion.result(timeout=120)
    finally:
        for executor in executors:
            executor.shutdown()

    expected = b"".join(payload(n, sizes[n]) for n in (1, 2, 3))
    assert len({pid, os.getpid(), *(p for p, _ in results)}) == 5
    assert info.key == key
    assert info.size == len(expected)
    assert storage.get(key) == expected
    assert storage.head(key).size == len(expected)
    assert storage.list_multipart_uploads("") == []


def test_complete_rejects_a_small_part_that_is_not_last_and_stores_nothing(
    storage: Storage,
) -> None:
    key = "backup-1/base.tar.zst"
    upload_id = storage.create_multipart(key)
    small = payload(7, 1024)
    parts = [
        storage.upload_part(key, upload_id, n, small, sha256=sha256_hex(small)) for n in (1, 2)
    ]

    with pytest.raises(PartTooSmall):
        storage.complete_multipart(key, upload_id, parts)

    with pytest.raises(ObjectNotFound):
        storage.head(key)
    storage.abort_multipart(key, upload_id)


def test_a_single_small_part_is_a_valid_last_part(storage: Storage) -> None:
    upload_id = storage.create_multipart("tiny")
    part = storage.upload_part("tiny", upload_id, 1, b"abc", sha256=sha256_hex(b"abc"))

    storage.complete_multipart("tiny", upload_id, [part])

    assert storage.get("tiny") == b"abc"


@pytest.mark.parametrize("offsets", [False, True], ids=["no-offsets", "offsets-given"])
def test_reuploading_a_part_number_replaces_the_part(storage: Storage, offsets: bool) -> None:
    key = "re/upload"
    upload_id = storage.create_multipart(key)
    first, second, tail = payload(1, PART_BYTES), payload(2, PART_BYTES), b"tail"
    at_1, at_2 = (0, PART_BYTES) if offsets else (None, None)
    stale = storage.upload_part(key, upload_id, 1, first, sha256=sha256_hex(first), offset=at_1)
    replacement = storage.upload_part(
        key, upload_id, 1, second, sha256=sha256_hex(second), offset=at_1
    )
    last = storage.upload_part(key, upload_id, 2, tail, sha256=sha256_hex(tail), offset=at_2)

    with pytest.raises(StorageError):  # S3's InvalidPart: the part was replaced since
        storage.complete_multipart(key, upload_id, [stale, last])
    storage.complete_multipart(key, upload_id, [replacement, last])

    assert storage.get(key) == second + tail


def test_abort_discards_the_upload(storage: Storage) -> None:
    key = "aborted/base.tar"
    upload_id = storage.create_multipart(key)
    part = storage.upload_part(key, upload_id, 1, b"data", sha256=sha256_hex(b"data"))

    storage.abort_multipart(key, upload_id)

    with pytest.raises(ObjectNotFound):
        storage.head(key)
    assert storage.list_multipart_uploads("aborted/") == []
    with pytest.raises(UploadNotFound):
        storage.abort_multipart(key, upload_id)
    # Real S3 and the local backend answer UploadNotFound to these two; moto 5.x fails with HTTP
    # 500 (a KeyError on the aborted upload), which arrives as a TransientStorageError.
    with pytest.raises(StorageError):
        storage.upload_part(key, upload_id, 2, b"late", sha256=sha256_hex(b"late"))
    with pytest.raises(StorageError):
        storage.complete_multipart(key, upload_id, [part])


def test_local_backend_answers_upload_not_found_after_abort(tmp_path: Path) -> None:
    store = local_target(tmp_path / "store").open()
    upload_id = store.create_multipart("k")
    part = store.upload_part("k", upload_id, 1, b"data", sha256=sha256_hex(b"data"))
    store.abort_multipart("k", upload_id)

    with pytest.raises(UploadNotFound):
        store.upload_part("k", upload_id, 2, b"late", sha256=sha256_hex(b"late"))
    with pytest.raises(UploadNotFound):
        store.complete_multipart("k", upload_id, [part])


def test_local_backend_removes_what_an_interrupted_discard_left(tmp_path: Path) -> None:
    """A discard renames the upload's directory, then removes it: killed in between (or a part
    it could not remove), the renamed directory held space that no listing showed. The next
    discard removes it, and nothing else under the uploads directory."""
    store = local_target(tmp_path / "store").open()
    interrupted = store.create_multipart("a")
    store.upload_part("a", interrupted, 1, b"x" * 1000, sha256=sha256_hex(b"x" * 1000))
    uploads = tmp_path / "store" / UPLOADS_DIR
    (uploads / interrupted).rename(uploads / f"{TEMP_PREFIX}{interrupted}")  # as if killed here
    other_tmp = uploads / f"{TEMP_PREFIX}not-an-upload"
    other_tmp.mkdir()
    kept = store.create_multipart("b")
    assert [u.upload_id for u in store.list_multipart_uploads("")] == [kept]
    store.abort_multipart("c", store.create_multipart("c"))
    assert sorted(p.name for p in uploads.iterdir()) == sorted([kept, other_tmp.name])


def test_uploaded_bytes_counts_the_parts_of_an_upload_in_progress(storage: Storage) -> None:
    upload_id = storage.create_multipart("held/base.tar")
    assert storage.uploaded_bytes("held/base.tar", upload_id) == 0
    for number, data in ((1, b"a" * 1000), (2, b"b" * 24), (1, b"c" * 100)):  # 1 replaced
        storage.upload_part("held/base.tar", upload_id, number, data, sha256=sha256_hex(data))
    assert storage.uploaded_bytes("held/base.tar", upload_id) == 124
    storage.abort_multipart("held/base.tar", upload_id)
    with pytest.raises(UploadNotFound):
        storage.uploaded_bytes("held/base.tar", upload_id)


def test_unknown_upload_id_is_upload_not_found(storage: Storage) -> None:
    with pytest.raises(UploadNotFound):
        storage.abort_multipart("k", "0123456789abcdef0123456789abcdef")


def test_list_multipart_uploads_shows_uploads_in_progress_by_prefix(storage: Storage) -> None:
    keys = ["backups/b/base.tar", "backups/a/base.tar", "other/x"]
    ids = {key: storage.create_multipart(key) for key in keys}

    under_backups = storage.list_multipart_uploads("backups/")
    everything = storage.list_multipart_uploads("")

    assert [(u.key, u.upload_id) for u in under_backups] == [
        ("backups/a/base.tar", ids["backups/a/base.tar"]),
        ("backups/b/base.tar", ids["backups/b/base.tar"]),
    ]
    assert sorted(u.key for u in everything) == sorted(keys)
    assert storage.list_multipart_uploads("backups/a") == [
        u for u in under_backups if u.key.startswith("backups/a")
    ]
    for key, upload_id in ids.items():
        storage.abort_multipart(key, upload_id)
    assert storage.list_multipart_uploads("") == []


def test_capabilities_state_s3_part_limits(storage: Storage) -> None:
    caps = storage.capabilities

    assert caps.min_part_size_bytes == 5 * MiB
    assert caps.max_part_size_bytes == 5 * 1024 * MiB
    assert caps.max_part_count == 10_000


def test_url_names_the_store(storage_target: StorageTarget, storage: Storage) -> None:
    assert storage.url == storage_target.url


# -- checksums ------------------------------------------------------------------------------------
# moto does not validate x-amz-checksum-sha256 (it stores whatever it is sent), so a wrong
# checksum can only be shown to be refused by the local backend; real S3 answers BadDigest, which
# storage/s3.py maps to ChecksumMismatch.


def test_local_upload_part_with_a_wrong_sha256_is_refused_and_not_stored(tmp_path: Path) -> None:
    store = local_target(tmp_path / "store").open()
    upload_id = store.create_multipart("k")

    with pytest.raises(ChecksumMismatch):
        store.upload_part("k", upload_id, 1, b"real bytes", sha256=sha256_hex(b"other bytes"))

    with pytest.raises(StorageError):
        # Completing with the part the caller believed it sent finds nothing to assemble.
        store.complete_multipart(
            "k", upload_id, [UploadedPart(1, sha256_hex(b"other"), 5, sha256_hex(b"other"))]
        )


@pytest.mark.parametrize("xattrs", [True, False], ids=["part-digest-recorded", "no-xattrs"])
def test_local_complete_takes_each_part_only_as_its_uploader_was_answered(
    tmp_path: Path, xattrs: bool
) -> None:
    """A part replaced after its ETag was handed out is refused at completion (S3's
    InvalidPart), whether the part's SHA-256 was recorded with it or, on a file system
    without user xattrs, must be read again."""
    root = tmp_path / "store"
    store = local_target(root).open()
    key = "assembled/base.tar.zst"
    upload_id = store.create_multipart(key)
    first, second, tail = payload(1, PART_BYTES), payload(2, PART_BYTES), payload(3, 100)
    stale = store.upload_part(key, upload_id, 1, first, sha256=sha256_hex(first))
    fresh = store.upload_part(key, upload_id, 1, second, sha256=sha256_hex(second))
    last = store.upload_part(key, upload_id, 2, tail, sha256=sha256_hex(tail))
    part_files = sorted((root / ".cloud-dump-uploads" / upload_id).glob("part-*"))
    assert len(part_files) == 2
    for path in part_files:
        if xattrs:
            assert os.getxattr(path, "user.cloud-dump.part-sha256")
        else:
            os.removexattr(path, "user.cloud-dump.part-sha256")

    with pytest.raises(StorageError, match=r"part 1 .* does not match its etag"):
        store.complete_multipart(key, upload_id, [stale, last])
    with pytest.raises(ObjectNotFound):
        store.head(key)

    info = store.complete_multipart(key, upload_id, [fresh, last])
    assert store.get(key) == second + tail
    assert info.size == len(second + tail)


def test_metadata_is_stored_with_the_object(storage: Storage) -> None:
    storage.put("meta/a", b"payload", metadata={"raw-sha256": "ab" * 32, "system-id": "123"})
    assert storage.head("meta/a").metadata == {"raw-sha256": "ab" * 32, "system-id": "123"}
    storage.put("meta/b", b"plain")
    assert storage.head("meta/b").metadata == {}


def test_refused_conditional_create_keeps_the_first_metadata(storage: Storage) -> None:
    storage.put("meta/a", b"first", if_absent=True, metadata={"raw-sha256": "1" * 64})
    with pytest.raises(ObjectExists):
        storage.put("meta/a", b"second", if_absent=True, metadata={"raw-sha256": "2" * 64})
    info = storage.head("meta/a")
    assert info.metadata == {"raw-sha256": "1" * 64}
    assert storage.get("meta/a") == b"first"


def test_local_delete_leaves_no_empty_directory_behind(tmp_path: Path) -> None:
    """A store has no directories of its own: a failed backup's deleted claim, or check's ping
    object, must not leave '<name>/' in the store."""
    root = tmp_path / "store"
    root.mkdir()
    storage = open_storage(local_url(str(root)))
    storage.put("b9/backup.claim", b"x")
    storage.put("keep/a/one", b"1")
    storage.put("keep/a/two", b"2")
    storage.delete("b9/backup.claim")
    storage.delete("keep/a/one")
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
        "keep", "keep/a", "keep/a/two",
    ]  # fmt: skip
    storage.delete("keep/a/two")
    assert root.is_dir() and not any(root.iterdir())  # the root itself stays
    storage.put("b9/backup.claim", b"y")  # and the prefix can be written again
    assert storage.get("b9/backup.claim") == b"y"


def test_a_local_write_survives_its_directory_being_pruned_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stands in for a delete of the prefix's last other object between the writer's mkdir and
    its temporary file (a race no real server can be made to lose on demand)."""
    from storage import fsutil

    root = tmp_path / "store"
    root.mkdir()
    storage = open_storage(local_url(str(root)))
    real = fsutil.write_atomically
    pruned: list[Path] = []

    def pruned_first(path: Path, *args: Any, **kwargs: Any) -> bool:
        if not pruned:
            pruned.append(path.parent)
            path.parent.rmdir()
        return real(path, *args, **kwargs)

    monkeypatch.setattr("storage.local.write_atomically", pruned_first)
    storage.put("b1/manifest.json", b"{}")
    assert pruned == [root / "b1"] and storage.get("b1/manifest.json") == b"{}"
