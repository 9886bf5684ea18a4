"""``workers.backup`` called directly, on both real backends (a directory, S3 on moto).

The life of a backup in storage: a claim taken (create-if-absent), archives uploaded in parts,
``manifest.json`` written last, the claim dropped; or, on failure, everything the run stored
removed. These tests drive the worker functions the tasks wrap, as a re-run, a failed run or a
killed run leaves them, and look at what storage holds afterwards.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any

import pytest

from devrig.moto import StorageTarget
from storage.base import MiB, ObjectInfo, Storage, sha256_hex
from storage.errors import BackupExists, ConfigError, ObjectNotFound, StorageError
from storage.factory import open_storage
from storage.layout import Layout
from storage.options import StorageOptions
from workers.backup import (
    CLAIM_NAME,
    WRAPPED_KEY_NAME,
    AbortRequest,
    ArchiveUpload,
    BackupRef,
    ClaimRequest,
    FinalizeRequest,
    HeartbeatRequest,
    UploadPartRequest,
    UploadPartResult,
    _upload_totals,
    abort_backup,
    claim_backup,
    finalize_backup,
    heartbeat_backup,
    location_of,
    open_archive,
    upload_part,
)
from workers.staging import MemoryStage

PART_BYTES = 5 * MiB  # the smallest part that need not be last (S3's minimum)
BACKUP = BackupRef(name="b1", cluster="main")
LAYOUT = Layout(cluster="main")
PREFIX = LAYOUT.backup_prefix("b1")
MANIFEST_KEY = LAYOUT.manifest_key("b1")
BACKUP_MANIFEST_KEY = LAYOUT.backup_manifest_key("b1", encrypted=False)
WRAPPED_KEY_KEY = PREFIX + WRAPPED_KEY_NAME
CLAIM_KEY = PREFIX + CLAIM_NAME
MANIFEST = json.dumps({"name": "b1"}).encode()


def claim_request(run_id: str) -> ClaimRequest:
    return ClaimRequest(
        backup=BACKUP, run_id=run_id, host=f"host-{run_id}", started_at=f"start-{run_id}"
    )


def archive_key(archive: str) -> str:
    return LAYOUT.archive_key("b1", archive, "none", encrypted=False)


def data(seed: int, size: int) -> bytes:
    return hashlib.shake_256(str(seed).encode()).digest(size)


@dataclass
class Run:
    """One run of the backup, driven as the coordinator drives it (the stage in memory)."""

    storage: Storage
    run_id: str
    stage: MemoryStage = field(default_factory=MemoryStage)
    uploads: dict[str, ArchiveUpload] = field(default_factory=dict)

    def claim(self) -> str:
        return claim_backup(self.storage, claim_request(self.run_id))

    def upload(self, archive: str, *parts: bytes) -> ArchiveUpload:
        """Open the archive's upload and have the worker upload ``parts`` as 1, 2, ..."""
        key = archive_key(archive)
        upload = ArchiveUpload(key=key, upload_id=open_archive(self.storage, key), parts=[])
        for number, part in enumerate(parts, start=1):
            upload.parts.append(self.send(upload, number, part))
        self.uploads[archive] = upload
        return upload

    def send(self, upload: ArchiveUpload, number: int, part: bytes) -> UploadPartResult:
        ref = f"{upload.upload_id}/{number}"
        self.stage.put(ref, part, ttl_s=60)
        request = UploadPartRequest(
            key=upload.key,
            upload_id=upload.upload_id,
            part_number=number,
            size=len(part),
            sha256=sha256_hex(part),
            ref=ref,
        )
        return upload_part(self.storage, self.stage, request)

    def finalize_request(self) -> FinalizeRequest:
        self.stage.put("backup_manifest", b"backup manifest of b1", ttl_s=60)
        self.stage.put("wrapped_key", b"wrapped key of b1", ttl_s=60)
        self.stage.put("manifest", MANIFEST, ttl_s=60)
        return FinalizeRequest(
            backup=BACKUP,
            run_id=self.run_id,
            archives=list(self.uploads.values()),
            backup_manifest_key=BACKUP_MANIFEST_KEY,
            backup_manifest_ref="backup_manifest",
            wrapped_key_ref="wrapped_key",
            manifest_ref="manifest",
        )

    def abort_request(self) -> AbortRequest:
        return AbortRequest(backup=BACKUP, run_id=self.run_id, uploads=list(self.uploads.values()))


def keys(storage: Storage, prefix: str = PREFIX) -> set[str]:
    return {info.key for info in storage.list(prefix)}


def uploads_in_progress(storage: Storage) -> set[tuple[str, str]]:
    return {(u.key, u.upload_id) for u in storage.list_multipart_uploads(PREFIX)}


def missing(storage: Storage, key: str) -> bool:
    try:
        storage.head(key)
    except ObjectNotFound:
        return True
    return False


# -- claim ----------------------------------------------------------------------------------------


def test_claim_takes_a_free_name_and_a_rerun_of_the_same_run_keeps_it(storage: Storage) -> None:
    run = Run(storage, "run-a")

    where = run.claim()

    assert where == location_of(storage, CLAIM_KEY)
    assert where.startswith(storage.url.rstrip("/") + "/")
    held = json.loads(storage.get(CLAIM_KEY))
    assert held == {
        "storage_url": None,
        "run_id": "run-a",
        "host": "host-run-a",
        "started_at": "start-run-a",
        "heartbeat_every_s": None,  # a run that beats sets both (coordinator.backup.heartbeat)
        "heartbeat_at": None,
    }
    # acks_late: the same task may run again; it finds its own claim and carries on.
    assert run.claim() == where
    assert keys(storage) == {CLAIM_KEY}


def test_claim_refuses_more_parts_per_object_than_the_store_takes(storage: Storage) -> None:
    limit = storage.capabilities.max_part_count
    request = claim_request("run-a").model_copy(update={"parts_per_object": limit + 1})
    with pytest.raises(ConfigError, match=rf"up to {limit + 1} parts in one object .* at most "
                                          rf"{limit} .*: set the same on both"):  # fmt: skip
        claim_backup(storage, request)
    assert keys(storage) == set()
    fits = claim_request("run-a").model_copy(update={"parts_per_object": limit})
    claim_backup(storage, fits)
    assert "parts_per_object" not in json.loads(storage.get(CLAIM_KEY))


def test_claim_refuses_a_name_another_run_holds_and_leaves_its_claim(storage: Storage) -> None:
    Run(storage, "run-a").claim()
    before = storage.get(CLAIM_KEY)

    with pytest.raises(BackupExists) as refused:
        Run(storage, "run-b").claim()

    message = str(refused.value)
    assert "claimed by run run-a started start-run-a on host-run-a" in message
    assert f"delete '{location_of(storage, CLAIM_KEY)}'" in message
    assert storage.get(CLAIM_KEY) == before


def test_claim_refuses_the_name_of_a_complete_backup_and_stores_nothing(storage: Storage) -> None:
    storage.put(MANIFEST_KEY, MANIFEST)

    with pytest.raises(BackupExists, match=r"backup 'b1' already exists in .*cluster 'main'"):
        Run(storage, "run-a").claim()

    assert keys(storage) == {MANIFEST_KEY}


def run_until_killed(
    url: str, options: StorageOptions, env: Mapping[str, str], ready: ProcessEvent
) -> None:
    """A run in another process: claims b1, uploads one part of base, then hangs where the
    parent kills it (SIGKILL: no clean-up of any kind)."""
    import os

    os.environ.update(env)
    storage = open_storage(url, options)
    run = Run(storage, "run-killed")
    run.claim()
    run.upload("base", data(1, 1000))
    ready.set()
    multiprocessing.Event().wait()  # never set: the parent kills this process here


def test_a_claim_left_by_a_killed_run_names_itself_until_removed_then_the_name_is_free(
    storage_target: StorageTarget, storage: Storage
) -> None:
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Event()
    killed = spawn.Process(
        target=run_until_killed,
        args=(storage_target.url, storage_target.options, storage_target.env, ready),
    )
    killed.start()
    try:
        assert ready.wait(timeout=120), "the doomed run never got its part uploaded"
    finally:
        killed.kill()
        killed.join(timeout=30)
    assert killed.exitcode is not None and killed.exitcode < 0
    (left_over,) = uploads_in_progress(storage)

    # The next run is told who holds the name and which object to delete.
    run = Run(storage, "run-next")
    with pytest.raises(BackupExists) as refused:
        run.claim()
    assert "claimed by run run-killed" in str(refused.value)
    assert f"delete '{location_of(storage, CLAIM_KEY)}'" in str(refused.value)

    # The operator deletes it: the name is free, and the new run completes the backup. The
    # killed run's upload of the same archive is aborted, not mistaken for this run's.
    storage.delete(CLAIM_KEY)
    run.claim()
    run.upload("base", data(2, 2000))
    finalize_backup(storage, run.stage, run.finalize_request())

    assert storage.get(archive_key("base")) == data(2, 2000)
    assert left_over not in uploads_in_progress(storage)
    assert uploads_in_progress(storage) == set()
    assert storage.get(MANIFEST_KEY) == MANIFEST
    assert missing(storage, CLAIM_KEY)


# -- finalize -------------------------------------------------------------------------------------


class WatchedStorage:
    """The real store, with a look at everything under the backup at the moment
    ``manifest.json`` is written."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.at_manifest: tuple[set[str], set[tuple[str, str]]] | None = None

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        if key == MANIFEST_KEY:
            self.at_manifest = (keys(self._storage), uploads_in_progress(self._storage))
        return self._storage.put(
            key, data, if_absent=if_absent, metadata=metadata, sha256=sha256
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


def test_finalize_completes_every_archive_and_writes_the_manifest_last(storage: Storage) -> None:
    run = Run(storage, "run-a")
    run.claim()
    base = [data(10, PART_BYTES), data(11, 4321)]
    tablespace = [data(20, 777)]
    run.upload("base", *base)
    run.upload("16384", *tablespace)
    watch = WatchedStorage(storage)

    finalize_backup(watch, run.stage, run.finalize_request())

    # When manifest.json went in, everything it describes was already whole in storage.
    assert watch.at_manifest == (
        {archive_key("base"), archive_key("16384"), BACKUP_MANIFEST_KEY, WRAPPED_KEY_KEY,
         CLAIM_KEY},
        set(),
    )  # fmt: skip
    assert storage.get(archive_key("base")) == b"".join(base)
    assert storage.get(archive_key("16384")) == b"".join(tablespace)
    assert storage.get(BACKUP_MANIFEST_KEY) == b"backup manifest of b1"
    assert storage.get(WRAPPED_KEY_KEY) == b"wrapped key of b1"
    assert storage.get(MANIFEST_KEY) == MANIFEST
    # The claim goes after the manifest: the name is never unguarded.
    assert keys(storage) == watch.at_manifest[0] - {CLAIM_KEY} | {MANIFEST_KEY}


def test_finalize_run_again_after_it_landed_changes_nothing(storage: Storage) -> None:
    run = Run(storage, "run-a")
    run.claim()
    run.upload("base", data(1, 100))
    request = run.finalize_request()
    finalize_backup(storage, run.stage, request)
    before = {key: storage.get(key) for key in keys(storage)}

    finalize_backup(storage, run.stage, request)

    assert {key: storage.get(key) for key in keys(storage)} == before


def test_finalize_is_refused_while_a_part_is_missing_and_succeeds_once_it_is_there(
    storage: Storage,
) -> None:
    run = Run(storage, "run-a")
    run.claim()
    run.upload("16384", data(20, 777))
    base = run.upload("base", data(10, PART_BYTES))
    last = data(11, 4321)
    # The coordinator lists part 2 (its size and checksum), but it never reached storage.
    base.parts.append(
        UploadPartResult(
            part_number=2,
            etag=hashlib.md5(last).hexdigest(),  # noqa: S324 - S3's part etag
            size=len(last),
            sha256=sha256_hex(last),
        )
    )
    request = run.finalize_request()

    with pytest.raises(StorageError):
        finalize_backup(storage, run.stage, request)

    # Nothing looks like a backup: no manifest, no complete base archive, the claim still held.
    assert missing(storage, MANIFEST_KEY)
    assert missing(storage, archive_key("base"))
    assert json.loads(storage.get(CLAIM_KEY))["run_id"] == "run-a"

    # The part is sent again (its task re-run); finalize re-run completes the backup, the
    # tablespace archive it completed the first time included.
    base.parts[1] = run.send(base, 2, last)
    finalize_backup(storage, run.stage, request)

    assert storage.get(archive_key("base")) == data(10, PART_BYTES) + last
    assert storage.get(archive_key("16384")) == data(20, 777)
    assert storage.get(MANIFEST_KEY) == MANIFEST
    assert missing(storage, CLAIM_KEY)
    assert uploads_in_progress(storage) == set()


# -- abort ----------------------------------------------------------------------------------------


def test_abort_removes_every_upload_and_object_of_the_run_claim_last(storage: Storage) -> None:
    run = Run(storage, "run-a")
    run.claim()
    run.upload("base", data(10, PART_BYTES), data(11, 10))
    run.upload("16384", data(20, 777))
    # An upload the coordinator never heard of (stopped while it was being opened), and a
    # manifest stored before the failure.
    open_archive(storage, archive_key("16385"))
    storage.put(BACKUP_MANIFEST_KEY, b"backup manifest of b1")
    assert len(uploads_in_progress(storage)) == 3

    assert abort_backup(storage, run.abort_request()) is False

    assert uploads_in_progress(storage) == set()
    assert keys(storage) == set()
    # The name is free again: another run takes it.
    Run(storage, "run-b").claim()


def test_abort_of_a_run_that_lost_the_name_keeps_the_holders_claim(storage: Storage) -> None:
    Run(storage, "run-a").claim()
    loser = Run(storage, "run-b")

    assert abort_backup(storage, loser.abort_request()) is False

    assert json.loads(storage.get(CLAIM_KEY))["run_id"] == "run-a"


def test_abort_never_touches_a_complete_backup(storage: Storage) -> None:
    run = Run(storage, "run-a")
    run.claim()
    run.upload("base", data(1, 100))
    finalize_backup(storage, run.stage, run.finalize_request())
    before = {key: storage.get(key) for key in keys(storage)}

    assert abort_backup(storage, run.abort_request()) is True  # the coordinator says so

    assert {key: storage.get(key) for key in keys(storage)} == before
    assert MANIFEST_KEY in before


# --- heartbeat -------------------------------------------------------------------------------


def beat(storage: Storage, run_id: str, at: str) -> bool:
    return heartbeat_backup(storage, HeartbeatRequest(backup=BACKUP, run_id=run_id, at=at))


def test_a_heartbeat_rewrites_its_own_claim_only(storage: Storage) -> None:
    claim_backup(storage, claim_request("run-a"))
    assert beat(storage, "run-a", "t1") is True
    assert json.loads(storage.get(CLAIM_KEY))["heartbeat_at"] == "t1"
    before = storage.get(CLAIM_KEY)
    assert beat(storage, "run-b", "t2") is False  # another run's claim: untouched
    assert storage.get(CLAIM_KEY) == before


def test_a_late_heartbeat_never_brings_a_claim_back(storage: Storage) -> None:
    assert beat(storage, "run-a", "t1") is False  # no claim (removed by finalize or cleanup)
    with pytest.raises(ObjectNotFound):
        storage.get(CLAIM_KEY)
    claim_backup(storage, claim_request("run-a"))
    storage.put(BACKUP.layout.manifest_key(BACKUP.name), b"{}")
    before = storage.get(CLAIM_KEY)
    assert beat(storage, "run-a", "t2") is False  # complete: the claim is not refreshed
    assert storage.get(CLAIM_KEY) == before


def test_finalize_counts_archives_and_their_objects() -> None:
    uploads = [
        ArchiveUpload(key=Layout.archive_object_key("b1/base.tar.zst", i), upload_id="u", parts=[
            UploadPartResult(part_number=1, etag="e", size=5, sha256="00" * 32)])
        for i in range(3)
    ] + [ArchiveUpload(key="b1/16384.tar.zst", upload_id="u", parts=[])]  # fmt: skip
    assert _upload_totals(uploads) == {"archives": 2, "objects": 4, "parts": 3, "bytes": 15}
    assert _upload_totals(uploads[:1]) == {"archives": 1, "parts": 1, "bytes": 5}
