"""The coordinator's side of Celery: reaching the broker and sending work to workers.

The only coordinator module that imports Celery. Kombu, redis and Celery exceptions are
translated here into the project's error tree.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.utils.nodenames import worker_direct
from kombu.exceptions import OperationalError

from storage.errors import BrokerUnreachable, NoWorkerAvailable, RemoteTaskFailed
from storage.redact import redact_url
from tasks.config import PARTS_QUEUE, WAL_QUEUE, make_app

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
    try:
        return result.get(timeout=timeout_s, propagate=True)
    except CeleryTimeout as exc:
        raise NoWorkerAvailable(
            f"worker '{worker}' did not answer '{task_name}' within {timeout_s:.0f} s"
        ) from exc
    except (OperationalError, OSError) as exc:
        raise BrokerUnreachable(f"broker stopped answering: {_reason(exc)}") from exc
    except Exception as exc:
        # Whatever the worker raised, re-created by Celery from its JSON result.
        raise RemoteTaskFailed(f"'{task_name}' failed on '{worker}': {exc}") from exc
    finally:
        result.forget()


def _reason(exc: BaseException) -> str:
    """The innermost, most specific cause, in lower case (e.g. 'connection refused')."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.split("\n")[0].rstrip(".").lower()
