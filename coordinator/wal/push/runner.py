"""Where ``push_wal`` runs for wal-push: in this process (no broker) or on the Celery workers.

``CeleryWalRunner`` sends ``push_wal`` to the ``wal`` queue with the payload staged in Redis,
and follows each push with ``coordinator.broker.flights``: a push whose answer is overdue
(``CLOUD_DUMP_WAL_RETRY_S``), whose worker is gone, or that a restarted broker lost is sent
again, its payload staged again (``push_wal`` is idempotent). A broker that goes away is waited
for up to half the call's ``--timeout`` (at most ``BROKER_GRACE_MAX_S``), so that a Redis
restart does not fail archiving, and one that stays away is reported before the call gives up.
Its ``start``/``check`` pair is what the detached WAL pusher pipelines; ``push`` is the blocking
batch the synchronous path uses. When wal-push was told a storage (``--storage``,
``CLOUD_DUMP_STORAGE`` or ``--config``), every request carries that location and a worker
whose storage is elsewhere refuses it (``workers.location``, exit 3).

``EmbeddedWalRunner`` (no broker) runs the same functions in daemon threads of this process,
every call bounded by the call's ``--timeout``: a store that accepts a connection and never
answers must not hold PostgreSQL's archiver for the client library's own timeouts.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING, Any, TypeVar

from coordinator.broker.flights import Flight
from coordinator.wait import wait_until

if TYPE_CHECKING:
    from collections.abc import Callable

    from coordinator.broker.client import Broker
    from coordinator.settings import WalPushSettings
    from storage.base import Storage
    from workers.location import StorageBound
    from workers.staging import MemoryStage
    from workers.wal import (
        OpenWalArchiveRequest,
        OpenWalArchiveResult,
        PushWalRequest,
        PushWalResult,
    )

    Outcome = PushWalResult | BaseException

__all__ = ["CeleryWalRunner", "EmbeddedWalRunner", "Flight", "WalRunner", "open_runner"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

RETRY_ENV = "CLOUD_DUMP_WAL_RETRY_S"
# Safety net only: staged payloads are deleted once their push is answered.
STAGE_TTL_S = 3600
EMBEDDED_THREADS = 4
BROKER_GRACE_MAX_S = 60.0
_PUSH_POLL_FIRST_S = 0.005
_PUSH_POLL_MAX_S = 0.05


def open_runner(args: WalPushSettings) -> WalRunner:
    from options.declared import number_from_env

    retry_s = float(number_from_env(RETRY_ENV))
    timeout_s = float(args.timeout)
    if args.broker:
        from storage.urls import storage_url

        grace_s = min(BROKER_GRACE_MAX_S, timeout_s / 2)
        # Told a storage, the workers must be storing there (checked before connecting).
        location = storage_url(args.storage) if args.storage else None
        return CeleryWalRunner.connect(
            args.broker, args.result_backend, args.staging_url, retry_s, grace_s,
            storage_url=location,
        )  # fmt: skip
    from coordinator.settings import open_store

    return EmbeddedWalRunner(open_store(args), time.monotonic() + timeout_s)


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
    """No broker: the worker functions run in threads of this process, until ``deadline``."""

    def __init__(self, storage: Storage, deadline: float) -> None:
        from workers.staging import MemoryStage

        self._storage = storage
        self._stage: MemoryStage = MemoryStage()
        self._deadline = deadline
        self._timeout_s = max(0.0, deadline - time.monotonic())

    def stage_payload(self, ref: str, data: bytes) -> None:
        self._stage.put(ref, data, STAGE_TTL_S)

    def delete_staged(self, *refs: str) -> None:
        self._stage.delete(*refs)

    def open_archive(self, request: OpenWalArchiveRequest) -> OpenWalArchiveResult:
        from workers.wal import open_wal_archive

        future = _in_thread(open_wal_archive, self._storage, self._stage, request)
        wait_futures([future], timeout=max(0.0, self._deadline - time.monotonic()))
        if not future.done():
            raise self._overdue("the WAL archive's description")
        return future.result()

    def push(
        self, requests: list[PushWalRequest], own_name: str, deadline: float
    ) -> dict[str, Outcome]:
        from workers.wal import push_wal

        gate = threading.BoundedSemaphore(EMBEDDED_THREADS)

        def one(request: PushWalRequest) -> PushWalResult:
            with gate:
                return push_wal(self._storage, self._stage, request)

        futures = {r.file_name: _in_thread(one, r) for r in requests}
        until = min(deadline, self._deadline)
        wait_futures(list(futures.values()), timeout=max(0.0, until - time.monotonic()))
        outcomes: dict[str, Outcome] = {}
        for name, future in futures.items():
            if not future.done():
                outcomes[name] = self._overdue(f"WAL file '{name}'")
            elif (error := future.exception()) is not None:
                outcomes[name] = error
            else:
                outcomes[name] = future.result()
        return outcomes

    def close(self) -> None:
        self._storage.close()

    def _overdue(self, what: str) -> BaseException:
        from storage.errors import StorageUnreachable

        return StorageUnreachable(
            f"storage {self._storage.url} did not store {what} within {self._timeout_s:.0f} s "
            "(wal-push --timeout)"
        )


def _in_thread(function: Callable[..., _T], *args: Any) -> Future[_T]:
    """Run ``function`` in a daemon thread: one stuck in a storage call cannot keep the
    process from exiting once its deadline has passed."""
    future: Future[_T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(function(*args))
        except BaseException as exc:  # handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=run, name="wal-push", daemon=True).start()
    return future


class CeleryWalRunner(WalRunner):
    """Sends ``push_wal`` to the ``wal`` queue and follows it (``coordinator.broker.flights``).

    Payloads handed to ``stage_payload`` are kept here until ``delete_staged``, and staged in
    Redis with the task that needs them, and again whenever that task is sent again.
    """

    def __init__(
        self, broker: Broker, retry_s: float, grace_s: float, storage_url: str | None = None
    ) -> None:
        from coordinator.broker.flights import Sender
        from tasks.config import WAL_QUEUE

        self._sender = Sender(
            broker, WAL_QUEUE, storage_url=storage_url, grace_s=grace_s,
            payload_ttl_s=STAGE_TTL_S, resend_after_s=retry_s,
        )  # fmt: skip
        self._flights = self._sender.flights
        self._retry_s = retry_s
        self._held: dict[str, bytes] = {}
        self._held_lock = threading.Lock()

    @classmethod
    def connect(
        cls,
        broker: str,
        result_backend: str | None,
        staging_url: str | None,
        retry_s: float,
        grace_s: float = BROKER_GRACE_MAX_S,
        *,
        storage_url: str | None = None,
    ) -> CeleryWalRunner:
        from coordinator.broker.client import open_broker

        opened = open_broker(broker, result_backend, staging_url)
        return cls(opened, retry_s, grace_s, storage_url)

    def stage_payload(self, ref: str, data: bytes) -> None:
        with self._held_lock:
            self._held[ref] = data

    def delete_staged(self, *refs: str) -> None:
        # Staged in Redis only with their task, whose finish deleted them there.
        with self._held_lock:
            for ref in refs:
                self._held.pop(ref, None)

    def open_archive(self, request: OpenWalArchiveRequest) -> OpenWalArchiveResult:
        from workers.wal import OpenWalArchiveResult

        refs = [request.wrapped_identity_ref] if request.wrapped_identity_ref else []
        flight = self._flight(
            "cloud_dump.open_wal_archive", request, "the WAL archive", refs,
            timeout_s=self._retry_s * 4,
        )  # fmt: skip
        return OpenWalArchiveResult.model_validate(self._flights.run(flight))

    def push(
        self, requests: list[PushWalRequest], own_name: str, deadline: float
    ) -> dict[str, Outcome]:
        flights = {r.file_name: self.start(r, deadline) for r in requests}
        outcomes: dict[str, Outcome] = {}

        def all_answered() -> bool:
            for name, flight in flights.items():
                if name in outcomes or (outcome := self.check(flight)) is None:
                    continue
                outcomes[name] = outcome
                if name == own_name:
                    # Look-ahead pushes get one more retry period, not the whole timeout.
                    for other in flights.values():
                        limit = time.monotonic() - other.first_sent_at + self._retry_s
                        other.timeout_s = min(other.timeout_s or limit, limit)
            return len(outcomes) == len(flights)

        try:
            # No bound here: every flight has its own timeout (``deadline``), past which
            # ``check`` answers it with NoWorkerAvailable. From 5 ms, doubling up to 50 ms: a
            # push takes a few ms on an idle worker, seconds on a slow store.
            wait_until(all_answered, timeout_s=math.inf, first_s=_PUSH_POLL_FIRST_S,
                       max_s=_PUSH_POLL_MAX_S, factor=2.0)  # fmt: skip
        finally:
            self._flights.finish(*flights.values())
        return outcomes

    def start(self, request: PushWalRequest, deadline: float) -> Flight:
        """Send one push; ``check`` follows it up."""
        flight = self._flight(
            "cloud_dump.push_wal", request, f"WAL file '{request.file_name}'",
            [request.ref], timeout_s=max(0.0, deadline - time.monotonic()),
        )  # fmt: skip
        return self._flights.start(flight)

    def check(self, flight: Flight) -> Outcome | None:
        """The push's outcome once answered (or overdue); None while it is still running.

        Raises ``BrokerUnreachable`` only once the broker stayed away for the grace period.
        """
        from workers.wal import PushWalResult

        if not self._flights.poll(flight):
            return None
        if isinstance(flight.outcome, BaseException):
            return flight.outcome
        return PushWalResult.model_validate(flight.outcome)

    def finish(self, flight: Flight) -> None:
        self._flights.finish(flight)

    def close(self) -> None:
        self._sender.close()

    def _flight(
        self, task: str, request: StorageBound, what: str, refs: list[str], *, timeout_s: float
    ) -> Flight:
        """A flight with the payloads held under ``refs``, staged again with every copy."""
        with self._held_lock:
            payloads = {ref: self._held[ref] for ref in refs if ref in self._held}
        return self._sender.flight(task, request, what, payloads, timeout_s=timeout_s)
