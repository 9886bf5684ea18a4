"""``cloud_dump.ping_storage``: proves broker → worker → storage end to end."""

from __future__ import annotations

import socket
from typing import Any

from celery import Task

from storage.errors import TransientStorageError
from tasks.app import app, worker_storage
from workers.diagnostics import ping_storage


@app.task(  # type: ignore[untyped-decorator]
    name="cloud_dump.ping_storage",
    bind=True,
    autoretry_for=(TransientStorageError,),
    retry_backoff=True,
    max_retries=3,
)
def ping_storage_task(self: Task) -> dict[str, Any]:
    """Write, read back and delete a small object from this worker; return what it saw."""
    worker = self.request.hostname or socket.gethostname()
    return ping_storage(worker_storage.get(), worker).model_dump()
