"""verify --deep tasks: thin wrappers around ``workers.verify``, on the ``parts`` queue.

The keys come from the worker's own environment (``CLOUD_DUMP_IDENTITY_KEY``,
``CLOUD_DUMP_PASSPHRASE_FILE`` or ``CLOUD_DUMP_PASSPHRASE``), read when a task first needs them,
never from the task's arguments (Flower shows those). A worker without them reports each
encrypted archive or segment as one it cannot decrypt: the deep check fails, it does not pass.
Transient storage failures are retried as the backup's tasks retry them; what the check finds
comes back in the result.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from celery import Task

from coordinator.crypto import read_passphrase_file
from storage.errors import ConfigError, TransientStorageError
from tasks.app import app, settings, worker_storage
from tasks.config import EXPECTED_REFUSALS
from workers import verify

_RETRY: dict[str, Any] = {
    "autoretry_for": (TransientStorageError,),
    "throws": EXPECTED_REFUSALS,
    "retry_backoff": True,
    "retry_backoff_max": 60,
    "max_retries": 5,
}
_HINT = "set CLOUD_DUMP_IDENTITY_KEY or CLOUD_DUMP_PASSPHRASE_FILE in the worker's environment"
_keys: verify.VerifyKeys | None = None


def _passphrase() -> str | None:
    """The worker's passphrase: the first line of ``CLOUD_DUMP_PASSPHRASE_FILE``, else
    ``CLOUD_DUMP_PASSPHRASE``; ``ConfigError`` naming the file when it cannot be read."""
    if settings.passphrase_file:
        first = read_passphrase_file(settings.passphrase_file)
        if not first:
            raise ConfigError(f"passphrase file '{settings.passphrase_file}' is empty")
        return first
    return settings.passphrase.get_secret_value() if settings.passphrase else None


def _worker_keys(hostname: str | None) -> verify.VerifyKeys:
    """This process's keys, built once (an unwrapped key is kept for the next task)."""
    global _keys
    if _keys is None:
        paths = [Path(p.strip()) for p in (settings.identity_key or "").split(",") if p.strip()]
        holder = f"worker '{hostname or socket.gethostname()}'"
        _keys = verify.VerifyKeys(paths, _passphrase, holder, _HINT)
    return _keys


@app.task(name="cloud_dump.verify_archive", bind=True, **_RETRY)  # type: ignore[untyped-decorator]
def verify_archive_task(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    parsed = verify.ArchiveCheckRequest.model_validate(request)
    storage = worker_storage.get(parsed.storage_url)
    keys = _worker_keys(self.request.hostname)
    return verify.check_archive(storage, parsed, keys).model_dump()


@app.task(name="cloud_dump.verify_wal", bind=True, **_RETRY)  # type: ignore[untyped-decorator]
def verify_wal_task(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    parsed = verify.WalCheckRequest.model_validate(request)
    storage = worker_storage.get(parsed.storage_url)
    keys = _worker_keys(self.request.hostname)
    return verify.check_wal(storage, parsed, keys).model_dump()
