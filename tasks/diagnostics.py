"""``cloud_dump.ping_storage``: proves broker → worker → storage end to end."""

from __future__ import annotations

import socket
from typing import Any

from celery import Task

from storage.errors import TransientStorageError
from tasks.app import app, worker_storage
from workers.diagnostics import PingRequest, ping_storage


@app.task(  # type: ignore[untyped-decorator]
    name="cloud_dump.ping_storage",
    bind=True,
    autoretry_for=(TransientStorageError,),
    retry_backoff=True,
    max_retries=3,
)
def ping_storage_task(self: Task, request: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write, read back and delete a small object from this worker; return what it saw.

    ``request`` (a ``PingRequest``) may name the storage the caller expects: a worker whose
    storage is elsewhere refuses (``StorageMismatch``). Older callers send none.
    """
    parsed = PingRequest.model_validate(request or {})
    worker = self.request.hostname or socket.gethostname()
    return ping_storage(worker_storage.get(parsed.storage_url), worker).model_dump()
