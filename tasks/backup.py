"""Backup tasks: thin wrappers that validate a request, call ``workers.backup``, return JSON.

Each request carries the storage location its coordinator was told, if any; a worker whose
storage is elsewhere refuses it (``StorageMismatch``, not retried). Transient storage failures
are retried here with backoff; permanent ones fail the task at once
and reach the coordinator as the error they are (Celery re-creates project exceptions from
their JSON form, so ``BackupExists`` stays ``BackupExists``).
"""

from __future__ import annotations

from typing import Any

from storage.errors import TransientStorageError
from tasks.app import app, worker_stage, worker_storage
from tasks.config import EXPECTED_REFUSALS
from workers import backup

_RETRY: dict[str, Any] = {
    "autoretry_for": (TransientStorageError,),
    "throws": EXPECTED_REFUSALS,
    "retry_backoff": True,
    "retry_backoff_max": 60,
    "max_retries": 5,
}


@app.task(name="cloud_dump.claim_backup", **_RETRY)  # type: ignore[untyped-decorator]
def claim_backup_task(request: dict[str, Any]) -> str:
    parsed = backup.ClaimRequest.model_validate(request)
    return backup.claim_backup(worker_storage.get(parsed.storage_url), parsed)


@app.task(name="cloud_dump.open_archive", **_RETRY)  # type: ignore[untyped-decorator]
def open_archive_task(request: dict[str, Any] | str) -> str:
    # A bare key: sent by a coordinator from before requests carried their storage location.
    parsed = backup.OpenArchiveRequest.model_validate(
        {"key": request} if isinstance(request, str) else request
    )
    return backup.open_archive(worker_storage.get(parsed.storage_url), parsed.key)


@app.task(name="cloud_dump.upload_part", **_RETRY)  # type: ignore[untyped-decorator]
def upload_part_task(request: dict[str, Any]) -> dict[str, Any]:
    parsed = backup.UploadPartRequest.model_validate(request)
    storage = worker_storage.get(parsed.storage_url)
    return backup.upload_part(storage, worker_stage.get(), parsed).model_dump()


@app.task(name="cloud_dump.finalize_backup", **_RETRY)  # type: ignore[untyped-decorator]
def finalize_backup_task(request: dict[str, Any]) -> dict[str, Any]:
    parsed = backup.FinalizeRequest.model_validate(request)
    storage = worker_storage.get(parsed.storage_url)
    return backup.finalize_backup(storage, worker_stage.get(), parsed).model_dump()


@app.task(name="cloud_dump.abort_backup", **_RETRY)  # type: ignore[untyped-decorator]
def abort_backup_task(request: dict[str, Any]) -> bool:
    parsed = backup.AbortRequest.model_validate(request)
    return backup.abort_backup(worker_storage.get(parsed.storage_url), parsed)


@app.task(name="cloud_dump.heartbeat_backup", **_RETRY)  # type: ignore[untyped-decorator]
def heartbeat_backup_task(request: dict[str, Any]) -> bool:
    parsed = backup.HeartbeatRequest.model_validate(request)
    return backup.heartbeat_backup(worker_storage.get(parsed.storage_url), parsed)
