"""WAL tasks: thin wrappers around ``workers.wal``, on the ``wal`` queue.

Few retries, short backoff: ``wal-push`` is waiting for the answer and PostgreSQL retries a
failed archive_command itself, so a store that stays down should be reported within seconds,
not after minutes of backoff. Permanent errors (``WalConflict``) fail at once and reach
``wal-push`` as themselves.
"""

from __future__ import annotations

from typing import Any

from storage.errors import TransientStorageError
from tasks.app import app, worker_stage, worker_storage
from tasks.config import EXPECTED_REFUSALS, WAL_QUEUE
from workers import wal

_RETRY: dict[str, Any] = {
    "autoretry_for": (TransientStorageError,),
    "throws": EXPECTED_REFUSALS,
    "retry_backoff": 1,
    "retry_backoff_max": 4,
    "max_retries": 2,
}


@app.task(name="cloud_dump.push_wal", queue=WAL_QUEUE, **_RETRY)  # type: ignore[untyped-decorator]
def push_wal_task(request: dict[str, Any]) -> dict[str, Any]:
    parsed = wal.PushWalRequest.model_validate(request)
    storage = worker_storage.get(parsed.storage_url)
    return wal.push_wal(storage, worker_stage.get(), parsed).model_dump()


@app.task(name="cloud_dump.open_wal_archive", queue=WAL_QUEUE, **_RETRY)  # type: ignore[untyped-decorator]
def open_wal_archive_task(request: dict[str, Any]) -> dict[str, Any]:
    parsed = wal.OpenWalArchiveRequest.model_validate(request)
    storage = worker_storage.get(parsed.storage_url)
    return wal.open_wal_archive(storage, worker_stage.get(), parsed).model_dump()
