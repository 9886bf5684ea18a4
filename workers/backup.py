"""The units of work of a backup: claim a name, open archives, upload parts, finalize, abort.

Plain functions: storage and stage come in as arguments, requests and results are small
pydantic models (what Celery carries as JSON and Flower displays: keys, sizes, checksums,
references, the storage location the coordinator was told (``workers.location``); never bytes
or secrets). Every function can be run again with the same request and
end in the same state, because acks_late and the coordinator's re-dispatch both re-run work.

Life of a backup in storage (DESIGN.md §3, invariant 3):
  ``backup.claim`` (create-if-absent)  → archives as multipart uploads → ``backup_manifest``
  → optional ``backup_key.age`` → ``manifest.json`` LAST → ``backup.claim`` removed.
Until ``manifest.json`` exists nothing lists or restores the backup.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from storage.base import Storage, UploadedPart
from storage.errors import (
    BackupExists,
    ConfigError,
    ObjectExists,
    ObjectNotFound,
    UploadNotFound,
)
from storage.layout import Layout
from workers.location import StorageBound
from workers.staging import Stage

log = logging.getLogger(__name__)

CLAIM_NAME = "backup.claim"
WRAPPED_KEY_NAME = "backup_key.age"


class BackupRef(BaseModel):
    """Which backup: its name and the layout it lives in."""

    name: str
    cluster: str | None = None

    @property
    def layout(self) -> Layout:
        return Layout(cluster=self.cluster)

    def key(self, file_name: str) -> str:
        return self.layout.backup_prefix(self.name) + file_name

    def facts(self) -> dict[str, object]:
        facts: dict[str, object] = {"backup": self.name}
        if self.cluster:
            facts["cluster"] = self.cluster
        return facts


class ClaimRequest(StorageBound):
    backup: BackupRef
    # Shown to whoever finds the claim of a run that died: when, where, which run.
    run_id: str
    host: str
    started_at: str
    # The run rewrites ``heartbeat_at`` every ``heartbeat_every_s`` while it is alive, so that
    # ``cloud-dump cleanup`` tells a running backup from a dead one however long it runs.
    heartbeat_every_s: float | None = None
    heartbeat_at: str | None = None
    # Most parts the run puts in one object (its --s3-max-parts): more than the workers' store
    # takes would fail at the first object boundary, hours into a large backup. Not stored.
    parts_per_object: int | None = None

    def facts(self) -> dict[str, object]:
        return self.backup.facts() | {"run": self.run_id, "host": self.host}


class HeartbeatRequest(StorageBound):
    backup: BackupRef
    run_id: str
    at: str  # the coordinator's clock, ISO 8601

    def facts(self) -> dict[str, object]:
        return self.backup.facts() | {"run": self.run_id}


class OpenArchiveRequest(StorageBound):
    key: str

    def facts(self) -> dict[str, object]:
        return archive_facts(self.key)


class UploadPartRequest(StorageBound):
    key: str
    upload_id: str
    part_number: int
    size: int
    sha256: str
    ref: str
    # Where the part starts in its object (bytes; storage.base.Storage.upload_part). None from
    # a coordinator that does not say: the store places the part at completion.
    offset: int | None = None

    def facts(self) -> dict[str, object]:
        return archive_facts(self.key) | {"part": self.part_number, "bytes": self.size}


class UploadPartResult(BaseModel):
    part_number: int
    etag: str
    size: int
    sha256: str


class ArchiveUpload(BaseModel):
    key: str
    upload_id: str
    parts: list[UploadPartResult]


class FinalizeRequest(StorageBound):
    backup: BackupRef
    run_id: str
    archives: list[ArchiveUpload]
    backup_manifest_key: str
    backup_manifest_ref: str
    wrapped_key_ref: str | None = None
    manifest_ref: str

    def facts(self) -> dict[str, object]:
        return self.backup.facts() | _upload_totals(self.archives)


class FinalizeResult(BaseModel):
    """What a finalized backup holds: its archives, their parts and bytes (stored size)."""

    backup: str
    archives: int
    parts: int
    bytes: int
    objects: int | None = None  # when an archive is stored as several objects


class AbortRequest(StorageBound):
    backup: BackupRef
    run_id: str
    uploads: list[ArchiveUpload]

    def facts(self) -> dict[str, object]:
        return self.backup.facts() | {"run": self.run_id, "uploads": len(self.uploads)}


def archive_facts(key: str) -> dict[str, object]:
    """The backup and archive an archive key names (``[<cluster>/backup/]<name>/<archive>``)."""
    *_, backup, archive = ["", *key.split("/")]
    return {"backup": backup, "archive": archive}


def _upload_totals(archives: list[ArchiveUpload]) -> dict[str, int]:
    """Archives, parts and bytes of these uploads; with ``objects`` when an archive is stored
    as several (each object is an upload of its own)."""
    parts = [part for archive in archives for part in archive.parts]
    first = sum(1 for a in archives if not Layout.is_later_object(a.key))
    totals = {"archives": first, "parts": len(parts), "bytes": sum(p.size for p in parts)}
    if first != len(archives):
        totals["objects"] = len(archives)
    return totals


def claim_backup(storage: Storage, request: ClaimRequest) -> str:
    """Take the backup name, or raise ``BackupExists`` if a backup or another run has it.

    Returns where the claim is stored, in full (``<storage url>/<key>``): the object to delete
    should the run die without removing it.
    """
    backup = request.backup
    limit = storage.capabilities.max_part_count
    if request.parts_per_object is not None and request.parts_per_object > limit:
        raise ConfigError(
            f"the backup puts up to {request.parts_per_object} parts in one object "
            f"(--s3-max-parts), but the workers' store takes at most {limit} "
            "(their CLOUD_DUMP_S3_MAX_PARTS): set the same on both"
        )
    if _exists(storage, backup.layout.manifest_key(backup.name)):
        raise BackupExists(
            f"backup '{backup.name}' already exists in "
            f"{backup.layout.describe_backups_root(storage.url)}"
        )
    claim_key = backup.key(CLAIM_NAME)
    claim = json.dumps(request.model_dump(exclude={"backup", "parts_per_object"})).encode()
    try:
        storage.put(claim_key, claim, if_absent=True)
    except ObjectExists:
        holder = read_claim(storage, claim_key) or {}
        if holder.get("run_id") != request.run_id:
            raise BackupExists(
                f"backup '{backup.name}' is claimed by run {holder.get('run_id', '?')} started "
                f"{holder.get('started_at', '?')} on {holder.get('host', '?')}: it is running, "
                f"or it was killed (then 'cloud-dump cleanup' frees the name once its heartbeats "
                f"have stopped, or delete '{location_of(storage, claim_key)}'; or use another "
                "name)"
            ) from None
        # else: our own claim, written by an earlier attempt of this very task
    return location_of(storage, claim_key)


def heartbeat_backup(storage: Storage, request: HeartbeatRequest) -> bool:
    """Record in the run's claim that it is alive (``heartbeat_at``). False, writing nothing,
    when the claim is gone or another run's, or the backup is complete: a late heartbeat must
    not bring back a claim that finalize or cleanup removed (the window between reading and
    rewriting it is closed by the coordinator, which stops its heartbeats before finalize or
    abort)."""
    backup = request.backup
    claim_key = backup.key(CLAIM_NAME)
    claim = read_claim(storage, claim_key) or {}
    if claim.get("run_id") != request.run_id:
        return False
    if _exists(storage, backup.layout.manifest_key(backup.name)):
        return False
    claim["heartbeat_at"] = request.at
    storage.put(claim_key, json.dumps(claim).encode())
    return True


def location_of(storage: Storage, key: str) -> str:
    """A key in full, storage URL included, as an operator would look it up."""
    return f"{storage.url.rstrip('/')}/{key}"


def open_archive(storage: Storage, key: str) -> str:
    """Start the multipart upload of one archive; return its upload id."""
    return storage.create_multipart(key)


def upload_part(storage: Storage, stage: Stage, request: UploadPartRequest) -> UploadPartResult:
    """Upload one staged part; its bytes are checked against the SHA-256 the coordinator
    computed before the last of them reaches the store (``Stage.open_part``)."""
    # Read from the stage as it is sent: a worker holds a slice of the part, not all of it.
    body = stage.open_part(
        request.ref, size=request.size, sha256=request.sha256,
        what=f"staged part {request.part_number} of '{request.key}'",
    )  # fmt: skip
    part = storage.upload_part(
        request.key, request.upload_id, request.part_number, body, sha256=request.sha256,
        offset=request.offset,
    )  # fmt: skip
    return UploadPartResult(
        part_number=part.part_number, etag=part.etag, size=part.size, sha256=part.sha256
    )


def finalize_backup(storage: Storage, stage: Stage, request: FinalizeRequest) -> FinalizeResult:
    """Complete every archive, store the manifests (``manifest.json`` last), drop the claim;
    return what the backup holds."""
    for archive in request.archives:
        _complete_archive(storage, archive)
    storage.put(request.backup_manifest_key, stage.get(request.backup_manifest_ref))
    if request.wrapped_key_ref is not None:
        storage.put(request.backup.key(WRAPPED_KEY_NAME), stage.get(request.wrapped_key_ref))
    manifest = stage.get(request.manifest_ref)
    manifest_key = request.backup.layout.manifest_key(request.backup.name)
    try:
        storage.put(manifest_key, manifest, if_absent=True)
    except ObjectExists:
        # A re-run of this task after the write landed finds its own manifest: fine. Anything
        # else is another backup that took the name, which the claim should have prevented.
        if storage.get(manifest_key) != manifest:
            raise BackupExists(
                f"backup '{request.backup.name}' was completed by another run"
            ) from None
    _abort_strays(storage, request)
    storage.delete(request.backup.key(CLAIM_NAME))
    return FinalizeResult(backup=request.backup.name, **_upload_totals(request.archives))


def _abort_strays(storage: Storage, request: FinalizeRequest) -> None:
    """Abort uploads under the backup's prefix that are not part of it.

    ``open_archive`` sent again (its answer lost with a restarted broker) opens a second
    upload for the same key; the claim makes every upload under the prefix this run's.
    """
    kept = {(a.key, a.upload_id) for a in request.archives}
    prefix = request.backup.layout.backup_prefix(request.backup.name)
    for upload in storage.list_multipart_uploads(prefix):
        if (upload.key, upload.upload_id) not in kept:
            with contextlib.suppress(UploadNotFound):
                storage.abort_multipart(upload.key, upload.upload_id)
            log.info("aborted the stray upload %s of '%s'", upload.upload_id, upload.key)


def abort_backup(storage: Storage, request: AbortRequest) -> bool:
    """Undo a failed run: abort its uploads and remove what it stored, claim last.

    Every upload under the backup's prefix is aborted, not only those the coordinator knew of:
    it may have been stopped while an upload was being opened. The claim makes the prefix this
    run's alone. A complete backup (manifest.json) is never touched: True when that is what
    was found (the run failed or was stopped after finalize stored it), else False.
    """
    backup = request.backup
    if _exists(storage, backup.layout.manifest_key(backup.name)):
        return True
    prefix = backup.layout.backup_prefix(backup.name)
    known = {(u.key, u.upload_id) for u in request.uploads}
    listed = {(u.key, u.upload_id) for u in storage.list_multipart_uploads(prefix)}
    for key, upload_id in sorted(known | listed):
        with contextlib.suppress(UploadNotFound):
            storage.abort_multipart(key, upload_id)
    claim_key = backup.key(CLAIM_NAME)
    storage.delete_many([info.key for info in storage.list(prefix) if info.key != claim_key])
    holder = read_claim(storage, claim_key) or {}
    if holder.get("run_id") == request.run_id:
        storage.delete(claim_key)
    return False


def _complete_archive(storage: Storage, archive: ArchiveUpload) -> None:
    parts = [UploadedPart(p.part_number, p.etag, p.size, p.sha256) for p in archive.parts]
    try:
        storage.complete_multipart(archive.key, archive.upload_id, parts)
    except UploadNotFound:
        # Completed by an earlier run of this task: then the object is there, whole.
        if _size(storage, archive.key) != sum(p.size for p in parts):
            raise
        log.info("archive '%s' was already complete", archive.key)


def _exists(storage: Storage, key: str) -> bool:
    return _size(storage, key) >= 0


def _size(storage: Storage, key: str) -> int:
    """The object's size, or -1 when it does not exist."""
    try:
        return storage.head(key).size
    except ObjectNotFound:
        return -1


def read_claim(storage: Storage, key: str) -> dict[str, object] | None:
    """The claim at ``key``: None when there is none, {} when it is not a JSON object."""
    try:
        data = json.loads(storage.get(key))
    except ObjectNotFound:
        return None
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


# The backup's units of work by Celery task name (``tasks/backup.py`` registers each under it),
# for a coordinator that runs them in its own threads (``coordinator.runner.EmbeddedRunner``).
UNITS: dict[str, Callable[[Storage, Stage, Any], Any]] = {
    "cloud_dump.claim_backup": lambda storage, _stage, request: claim_backup(storage, request),
    "cloud_dump.open_archive": lambda storage, _stage, request: open_archive(storage, request.key),
    "cloud_dump.upload_part": upload_part,
    "cloud_dump.finalize_backup": finalize_backup,
    "cloud_dump.abort_backup": lambda storage, _stage, request: abort_backup(storage, request),
    "cloud_dump.heartbeat_backup": lambda storage, _stage, request: heartbeat_backup(
        storage, request
    ),
}
