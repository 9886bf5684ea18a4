"""Who runs the units of work of a backup: Celery workers, or threads of this process.

Both runners expose the same small interface over ``workers.backup``, so the coordinator's
backup code never knows which one it has. ``CeleryRunner`` sends tasks by name to the ``parts``
queue and stages payloads in Redis; ``EmbeddedRunner`` (no broker configured) calls the same
functions in a thread pool with an in-memory stage, and needs storage credentials locally.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Protocol

from storage import Storage
from workers import backup
from workers.staging import MemoryStage, Stage


class PartHandle(Protocol):
    """An upload in flight."""

    def done(self) -> bool: ...

    def result(self) -> backup.UploadPartResult:
        """The uploaded part; raises the task's error if it failed."""
        ...


class Runner(Protocol):
    stage: Stage

    # Whether a part whose result is overdue should be sent again: only worth it when the work
    # runs on processes that can vanish without telling us.
    redispatches: bool

    def claim(self, request: backup.ClaimRequest) -> None: ...

    def open_archive(self, key: str) -> str: ...

    def upload_part(self, request: backup.UploadPartRequest) -> PartHandle: ...

    def finalize(self, request: backup.FinalizeRequest) -> None: ...

    def abort(self, request: backup.AbortRequest) -> None: ...

    def close(self) -> None: ...


class _FutureHandle:
    def __init__(self, future: concurrent.futures.Future[backup.UploadPartResult]) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> backup.UploadPartResult:
        return self._future.result()


class EmbeddedRunner:
    """Runs the work in this process: ``parallel`` upload threads, payloads in memory."""

    redispatches = False

    def __init__(self, storage: Storage, parallel: int) -> None:
        self._storage = storage
        self.stage: Stage = MemoryStage()
        self._pool = concurrent.futures.ThreadPoolExecutor(parallel, "upload")

    def claim(self, request: backup.ClaimRequest) -> None:
        backup.claim_backup(self._storage, request)

    def open_archive(self, key: str) -> str:
        return backup.open_archive(self._storage, key)

    def upload_part(self, request: backup.UploadPartRequest) -> PartHandle:
        future = self._pool.submit(backup.upload_part, self._storage, self.stage, request)
        return _FutureHandle(future)

    def finalize(self, request: backup.FinalizeRequest) -> None:
        backup.finalize_backup(self._storage, self.stage, request)

    def abort(self, request: backup.AbortRequest) -> None:
        backup.abort_backup(self._storage, request)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class CeleryRunner:
    """Sends the work to Celery workers; payloads go through the Redis stage."""

    redispatches = True

    def __init__(self, app: Any, stage: Stage, *, task_timeout_s: float) -> None:
        from coordinator import dispatch  # Celery is imported only on this path

        self._dispatch = dispatch
        self._app = app
        self.stage = stage
        self._timeout_s = task_timeout_s

    def claim(self, request: backup.ClaimRequest) -> None:
        self._call("cloud_dump.claim_backup", request.model_dump())

    def open_archive(self, key: str) -> str:
        return str(self._call("cloud_dump.open_archive", key))

    def upload_part(self, request: backup.UploadPartRequest) -> PartHandle:
        result = self._app.send_task(
            "cloud_dump.upload_part", args=[request.model_dump()], queue="parts"
        )
        return self._dispatch.CeleryPartHandle(result)

    def finalize(self, request: backup.FinalizeRequest) -> None:
        self._call("cloud_dump.finalize_backup", request.model_dump())

    def abort(self, request: backup.AbortRequest) -> None:
        self._call("cloud_dump.abort_backup", request.model_dump())

    def close(self) -> None:
        close = getattr(self.stage, "close", None)
        if close is not None:
            close()

    def _call(self, task_name: str, argument: Any) -> Any:
        return self._dispatch.call_task(self._app, task_name, argument, self._timeout_s)

