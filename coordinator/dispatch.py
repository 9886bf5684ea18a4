"""The coordinator's side of Celery: reaching the broker and sending work to workers.

The only coordinator module that imports Celery. Kombu, redis and Celery exceptions are
translated here into the project's error tree.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from celery.utils.nodenames import worker_direct
from kombu.exceptions import OperationalError

from storage.errors import (
    BrokerUnreachable,
    CloudDumpError,
    NoWorkerAvailable,
    RemoteTaskFailed,
)
from storage.redact import redact_url
from tasks.config import PARTS_QUEUE, WAL_QUEUE, make_app
from workers.backup import UploadPartResult

START_WORKER_HINT = "start one with 'celery -A tasks.app worker -Q parts,wal'"


def connect_broker(broker_url: str, result_backend: str | None = None) -> Celery:
    """A Celery client app whose broker answered; raise ``BrokerUnreachable`` otherwise."""
    app = make_app(broker_url, result_backend)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=5)
    except (OperationalError, OSError) as exc:
        raise BrokerUnreachable(
            f"cannot reach broker '{redact_url(broker_url)}': {_reason(exc)}"
        ) from exc
    return app


def live_workers(app: Celery, timeout_s: float = 2.0) -> dict[str, list[str]]:
    """Workers answering a broadcast ping, each with the queues it consumes."""
    try:
        replies = app.control.inspect(timeout=timeout_s).active_queues() or {}
    except (OperationalError, OSError) as exc:
        raise BrokerUnreachable(f"broker stopped answering: {_reason(exc)}") from exc
    return {
        worker: sorted(q["name"] for q in queues if not q["name"].endswith(".dq2"))
        for worker, queues in replies.items()
    }


def require_queue_consumers(workers: dict[str, list[str]]) -> None:
    """Raise unless at least one worker consumes each of the ``parts`` and ``wal`` queues."""
    if not workers:
        raise NoWorkerAvailable(f"no worker answered on the broker: {START_WORKER_HINT}")
    for queue in (PARTS_QUEUE, WAL_QUEUE):
        if not any(queue in queues for queues in workers.values()):
            raise NoWorkerAvailable(f"no worker consumes queue '{queue}': {START_WORKER_HINT}")


def run_on_worker(app: Celery, worker: str, task_name: str, timeout_s: float) -> Any:
    """Run ``task_name`` (no arguments) on one named worker and return its result."""
    result = app.send_task(task_name, queue=worker_direct(worker), expires=timeout_s)
    return _wait(result, f"'{task_name}' on '{worker}'", timeout_s)


def call_task(app: Celery, task_name: str, argument: Any, timeout_s: float) -> Any:
    """Run ``task_name(argument)`` on any worker of the ``parts`` queue and return its result."""
    result = app.send_task(task_name, args=[argument], queue=PARTS_QUEUE)
    return _wait(result, f"'{task_name}'", timeout_s)


class CeleryPartHandle:
    """A part upload sent to the workers (``coordinator.runners.PartHandle``)."""

    def __init__(self, result: AsyncResult) -> None:
        self._result = result

    def done(self) -> bool:
        try:
            return bool(self._result.ready())
        except (OperationalError, OSError) as exc:
            raise BrokerUnreachable(f"broker stopped answering: {_reason(exc)}") from exc

    def result(self) -> UploadPartResult:
        payload = _wait(self._result, "'cloud_dump.upload_part'", timeout_s=30)
        return UploadPartResult.model_validate(payload)


def _wait(result: AsyncResult, what: str, timeout_s: float) -> Any:
    """The task's return value; its failure re-raised as a project error."""
    try:
        return result.get(timeout=timeout_s, propagate=True)
    except CeleryTimeout as exc:
        raise NoWorkerAvailable(
            f"no worker finished {what} within {timeout_s:.0f} s: {START_WORKER_HINT}"
        ) from exc
    except (OperationalError, OSError) as exc:
        raise BrokerUnreachable(f"broker stopped answering: {_reason(exc)}") from exc
    except CloudDumpError:
        # Celery re-created the worker's own error (BackupExists, ChecksumMismatch, ...).
        raise
    except Exception as exc:
        raise RemoteTaskFailed(f"{what} failed on a worker: {exc}") from exc
    finally:
        result.forget()


def _reason(exc: BaseException) -> str:
    """The innermost, most specific cause, in lower case (e.g. 'connection refused')."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.split("\n")[0].rstrip(".").lower()
