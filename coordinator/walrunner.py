"""Where ``push_wal`` runs for wal-push: in this process (no broker) or on the Celery workers.

``CeleryWalRunner`` sends ``push_wal`` to the ``wal`` queue with the payload staged in Redis,
and re-sends a push whose answer is overdue: a worker killed mid-task takes its message with it
(DESIGN.md §3, invariant 5), and ``push_wal`` is idempotent. Its ``send_push``/``poll`` pair is
what the detached WAL pusher pipelines; ``push`` is the blocking batch the synchronous path uses.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

    from storage import Storage
    from workers.staging import MemoryStage, RedisStage
    from workers.wal import (
        OpenWalArchiveRequest,
        OpenWalArchiveResult,
        PushWalRequest,
        PushWalResult,
    )

    Outcome = PushWalResult | BaseException

log = logging.getLogger(__name__)

RETRY_ENV = "CLOUD_DUMP_WAL_RETRY_S"
# Safety net only: staged payloads are deleted once their push is answered.
STAGE_TTL_S = 3600
EMBEDDED_THREADS = 4
DEFAULT_RETRY_S = 15.0


def open_runner(args: argparse.Namespace) -> WalRunner:
    from storage.errors import ConfigError

    try:
        retry_s = float(os.environ.get(RETRY_ENV) or DEFAULT_RETRY_S)
    except ValueError:
        raise ConfigError(f"environment variable {RETRY_ENV} is not a number") from None
    if args.broker:
        return CeleryWalRunner.connect(args.broker, args.result_backend, args.staging_url, retry_s)
    from coordinator.commands import open_store

    return EmbeddedWalRunner(open_store(args))


class WalRunner:
    """Where ``push_wal`` runs; the two implementations below."""

    def stage_payload(self, ref: str, data: bytes) -> None:
        raise NotImplementedError

    def delete_staged(self, *refs: str) -> None:
        raise NotImplementedError

    def open_archive(self, request: OpenWalArchiveRequest) -> OpenWalArchiveResult:
        raise NotImplementedError

    def push(
        self, requests: list[PushWalRequest], own_name: str, deadline: float
    ) -> dict[str, Outcome]:
        """Each file's result, or the error that stopped it; never raises for one file."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class EmbeddedWalRunner(WalRunner):
    """No broker: the worker functions run in threads of this process."""

    def __init__(self, storage: Storage) -> None:
        from workers.staging import MemoryStage

        self._storage = storage
        self._stage: MemoryStage = MemoryStage()

    def stage_payload(self, ref: str, data: bytes) -> None:
        self._stage.put(ref, data, STAGE_TTL_S)

    def delete_staged(self, *refs: str) -> None:
        self._stage.delete(*refs)

    def open_archive(self, request: OpenWalArchiveRequest) -> OpenWalArchiveResult:
        from workers.wal import open_wal_archive

        return open_wal_archive(self._storage, self._stage, request)

    def push(
        self, requests: list[PushWalRequest], own_name: str, deadline: float
    ) -> dict[str, Outcome]:
        import concurrent.futures

        from workers.wal import push_wal

        threads = min(EMBEDDED_THREADS, len(requests))
        with concurrent.futures.ThreadPoolExecutor(threads, "wal-push") as pool:
            futures = {
                r.file_name: pool.submit(push_wal, self._storage, self._stage, r) for r in requests
            }
            outcomes: dict[str, Outcome] = {}
            for name, future in futures.items():
                error = future.exception()
                outcomes[name] = error if error is not None else future.result()
        return outcomes

    def close(self) -> None:
        self._storage.close()


@dataclass
class Flight:
    """One ``push_wal`` on its way: every copy sent, and when to give up."""

    name: str
    payload: dict[str, object]
    results: list[AsyncResult]
    last_sent: float
    deadline: float


class CeleryWalRunner(WalRunner):
    """Sends ``push_wal`` to the ``wal`` queue, payloads through the Redis stage, and re-sends
    a push whose answer is overdue (its worker may have died with the message)."""

    def __init__(self, app: Celery, stage: RedisStage, retry_s: float) -> None:
        self._app = app
        self._stage = stage
        self._retry_s = retry_s

    @classmethod
    def connect(
        cls, broker: str, result_backend: str | None, staging_url: str | None, retry_s: float
    ) -> CeleryWalRunner:
        from coordinator.dispatch import connect_broker
        from workers.staging import RedisStage

        app = connect_broker(broker, result_backend)
        return cls(app, RedisStage(staging_url or broker), retry_s)

    def stage_payload(self, ref: str, data: bytes) -> None:
        self._stage.put(ref, data, STAGE_TTL_S)

    def delete_staged(self, *refs: str) -> None:
        from storage.errors import BrokerUnreachable

        try:
            self._stage.delete(*refs)
        except BrokerUnreachable as exc:  # the TTL removes them later
            log.warning("staged WAL payloads left to expire: %s", exc)

    def open_archive(self, request: OpenWalArchiveRequest) -> OpenWalArchiveResult:
        from workers.wal import OpenWalArchiveResult

        deadline = time.monotonic() + self._retry_s * 4
        outcome = self._await_one("cloud_dump.open_wal_archive", request.model_dump(), deadline)
        if isinstance(outcome, BaseException):
            raise outcome
        return OpenWalArchiveResult.model_validate(outcome)

    def push(
        self, requests: list[PushWalRequest], own_name: str, deadline: float
    ) -> dict[str, Outcome]:
        flights = {r.file_name: self.start(r, deadline) for r in requests}
        outcomes: dict[str, Outcome] = {}
        pause_s = 0.005
        while len(outcomes) < len(flights):
            for name, flight in flights.items():
                if name in outcomes or (outcome := self.check(flight)) is None:
                    continue
                outcomes[name] = outcome
                if name == own_name:
                    # Look-ahead pushes get one more retry period, not the whole timeout.
                    for other in flights.values():
                        other.deadline = min(other.deadline, time.monotonic() + self._retry_s)
            time.sleep(pause_s)
            pause_s = min(pause_s * 2, 0.05)
        for flight in flights.values():
            self.finish(flight)
        return outcomes

    def start(self, request: PushWalRequest, deadline: float) -> Flight:
        """Send one push; ``check`` follows it up."""
        payload = request.model_dump()
        result = self._send("cloud_dump.push_wal", payload)
        return Flight(request.file_name, payload, [result], time.monotonic(), deadline)

    def check(self, flight: Flight) -> Outcome | None:
        """The push's outcome once answered (or overdue); None while it is still running.

        A push unanswered for ``retry_s`` is sent again: the first worker may have died with
        the message, and whichever copy answers first decides.
        """
        from workers.wal import PushWalResult

        done = next((r for r in flight.results if self._ready(r)), None)
        if done is not None:
            answer = self._answer(done, f"'cloud_dump.push_wal' of '{flight.name}'")
            if isinstance(answer, BaseException):
                return answer
            return PushWalResult.model_validate(answer)
        now = time.monotonic()
        if now >= flight.deadline:
            return self._overdue(flight.name, flight.deadline)
        if now - flight.last_sent >= self._retry_s:
            log.warning(
                "no answer for WAL file '%s' after %.0f s: sending it again",
                flight.name,
                now - flight.last_sent,
            )
            flight.results.append(self._send("cloud_dump.push_wal", flight.payload))
            flight.last_sent = now
        return None

    def finish(self, flight: Flight) -> None:
        for result in flight.results:
            self._forget(result)

    def _await_one(self, task: str, payload: object, deadline: float) -> object:
        results = [self._send(task, payload)]
        last_sent = time.monotonic()
        while not (done := next((r for r in results if self._ready(r)), None)):
            now = time.monotonic()
            if now >= deadline:
                return self._overdue(task, deadline)
            if now - last_sent >= self._retry_s:
                results.append(self._send(task, payload))
                last_sent = now
            time.sleep(0.01)
        answer = self._answer(done, f"'{task}'")
        for result in results:
            self._forget(result)
        return answer

    def _overdue(self, what: str, deadline: float) -> BaseException:
        from coordinator.dispatch import START_WORKER_HINT
        from storage.errors import NoWorkerAvailable

        return NoWorkerAvailable(f"no worker confirmed '{what}' in time: {START_WORKER_HINT}")

    def _send(self, task: str, payload: object) -> AsyncResult:
        from tasks.config import WAL_QUEUE

        with self._broker_errors():
            return self._app.send_task(task, args=[payload], queue=WAL_QUEUE)

    def _ready(self, result: AsyncResult) -> bool:
        with self._broker_errors():
            return bool(result.ready())

    def _answer(self, result: AsyncResult, what: str) -> object:
        """The task's return value, or its error as a project error (not raised)."""
        from storage.errors import CloudDumpError, RemoteTaskFailed

        try:
            with self._broker_errors():
                return result.get(timeout=10, propagate=True)
        except CloudDumpError as exc:  # Celery re-created the worker's own error
            return exc
        except Exception as exc:
            return RemoteTaskFailed(f"{what} failed on a worker: {exc}")

    def _forget(self, result: AsyncResult) -> None:
        import contextlib

        with contextlib.suppress(Exception):  # results expire anyway
            result.forget()

    def _broker_errors(self) -> _BrokerErrors:
        return _BrokerErrors()

    def close(self) -> None:
        self._stage.close()


class _BrokerErrors:
    """Translate kombu/redis connection failures into ``BrokerUnreachable``."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        from kombu.exceptions import OperationalError
        from redis import RedisError

        from storage.errors import BrokerUnreachable

        if isinstance(exc, OperationalError | RedisError | OSError):
            raise BrokerUnreachable(f"broker stopped answering: {exc}") from exc
