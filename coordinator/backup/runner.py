"""Who runs the units of work of a backup: Celery workers, or threads of this process.

Both runners expose the same small interface over ``workers.backup``, so the coordinator's
backup code never knows which one it has. ``CeleryRunner`` sends tasks by name to the ``parts``
queue with their payloads staged in Redis, and follows them with ``coordinator.broker.flights``:
what the broker or a worker lost is sent again. Told a storage, it stamps every request with that
location, and a worker whose storage is elsewhere refuses it (``workers.location``).
``EmbeddedRunner`` (no broker configured) calls the same functions in a thread pool with an
in-memory stage, and needs storage credentials locally.
"""

from __future__ import annotations

import concurrent.futures
from typing import TYPE_CHECKING, Any, Protocol

from storage.base import Storage
from workers import backup, wal
from workers.staging import MemoryStage

if TYPE_CHECKING:
    from coordinator.broker.client import Broker
    from coordinator.broker.flights import Flight, Flights
    from workers.location import StorageBound

# How long a failed backup tries to undo what it stored, at most: the broker may be the
# reason it failed.
ABORT_GRACE_S = 30.0
ABORT_TIMEOUT_S = 120.0


class PartHandle(Protocol):
    """An upload in flight."""

    def done(self) -> bool: ...

    def result(self) -> backup.UploadPartResult:
        """The uploaded part; raises the task's error if it failed."""
        ...

    def release(self) -> None:
        """Drop the staged payload: the part is confirmed, or given up."""
        ...


class Runner(Protocol):
    @property
    def resent(self) -> int:
        """Units of work sent again because they looked lost."""
        ...

    def claim(self, request: backup.ClaimRequest) -> str:
        """Take the name; return where the claim is stored (for messages)."""
        ...

    def open_wal_archive(self, request: wal.OpenWalArchiveRequest) -> wal.OpenWalArchiveResult:
        ...

    def open_archive(self, key: str) -> str: ...

    def upload_part(self, request: backup.UploadPartRequest, data: bytes) -> PartHandle: ...

    def finalize(self, request: backup.FinalizeRequest, payloads: dict[str, bytes]) -> None:
        """Finalize with ``payloads`` staged under the refs ``request`` names."""
        ...

    def abort(self, request: backup.AbortRequest) -> None:
        """Undo a failed run; gives up after a bounded time (``ABORT_*``)."""
        ...

    def release(self, handles: list[PartHandle]) -> None:
        """Drop the staged payloads of parts given up on (best effort)."""
        ...

    def close(self) -> None: ...


class _FutureHandle:
    def __init__(
        self,
        future: concurrent.futures.Future[backup.UploadPartResult],
        stage: MemoryStage,
        ref: str,
    ) -> None:
        self._future = future
        self._stage = stage
        self._ref = ref

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> backup.UploadPartResult:
        return self._future.result()

    def release(self) -> None:
        self._stage.delete(self._ref)


class EmbeddedRunner:
    """Runs the work in this process: ``parallel`` upload threads, payloads in memory."""

    resent = 0

    def __init__(self, storage: Storage, parallel: int) -> None:
        self._storage = storage
        self.stage = MemoryStage()
        self._pool = concurrent.futures.ThreadPoolExecutor(parallel, "upload")

    def claim(self, request: backup.ClaimRequest) -> str:
        return backup.claim_backup(self._storage, request)

    def open_wal_archive(self, request: wal.OpenWalArchiveRequest) -> wal.OpenWalArchiveResult:
        return wal.open_wal_archive(self._storage, self.stage, request)

    def open_archive(self, key: str) -> str:
        return backup.open_archive(self._storage, key)

    def upload_part(self, request: backup.UploadPartRequest, data: bytes) -> PartHandle:
        self.stage.put(request.ref, data, 0)
        future = self._pool.submit(backup.upload_part, self._storage, self.stage, request)
        return _FutureHandle(future, self.stage, request.ref)

    def finalize(self, request: backup.FinalizeRequest, payloads: dict[str, bytes]) -> None:
        for ref, data in payloads.items():
            self.stage.put(ref, data, 0)
        try:
            backup.finalize_backup(self._storage, self.stage, request)
        finally:
            self.stage.delete(*payloads)

    def abort(self, request: backup.AbortRequest) -> None:
        backup.abort_backup(self._storage, request)

    def release(self, handles: list[PartHandle]) -> None:
        for handle in handles:
            handle.release()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _FlightHandle:
    """A part upload sent to the workers."""

    def __init__(self, flights: Flights, flight: Flight) -> None:
        self.flights = flights
        self.flight = flight

    def done(self) -> bool:
        return self.flights.poll(self.flight)

    def result(self) -> backup.UploadPartResult:
        return backup.UploadPartResult.model_validate(self.flight.result())

    def release(self) -> None:
        self.flights.finish(self.flight)


class CeleryRunner:
    """Sends the work to Celery workers; payloads go through the Redis stage.

    A broker that goes away is waited for up to ``part_timeout_s`` (what the operator allows a
    part to stay unconfirmed); what it lost is then sent again (``coordinator.broker.flights``).
    ``storage_url``: the storage this command was told (``storage.factory.storage_url`` form),
    carried by every request; None when it was told none (the workers' own is used).
    """

    def __init__(
        self,
        broker: Broker,
        *,
        task_timeout_s: float,
        part_timeout_s: float,
        storage_url: str | None = None,
    ) -> None:
        from coordinator.broker.flights import Sender
        from tasks.config import PARTS_QUEUE

        # A staged payload nobody deleted expires after ten part timeouts, an hour at least.
        self._sender = Sender(
            broker, PARTS_QUEUE, storage_url=storage_url, grace_s=part_timeout_s,
            payload_ttl_s=max(3600, int(part_timeout_s * 10)), resend_after_s=part_timeout_s,
        )  # fmt: skip
        self._flights = self._sender.flights
        self._task_timeout_s = task_timeout_s

    @property
    def resent(self) -> int:
        return self._flights.resent

    def claim(self, request: backup.ClaimRequest) -> str:
        return str(self._call("cloud_dump.claim_backup", request))

    def open_wal_archive(self, request: wal.OpenWalArchiveRequest) -> wal.OpenWalArchiveResult:
        # On the parts queue: the backup's workers may not consume the wal queue.
        answer = self._call("cloud_dump.open_wal_archive", request)
        return wal.OpenWalArchiveResult.model_validate(answer)

    def open_archive(self, key: str) -> str:
        request = backup.OpenArchiveRequest(key=key)
        return str(self._call("cloud_dump.open_archive", request))

    def upload_part(self, request: backup.UploadPartRequest, data: bytes) -> PartHandle:
        flight = self._sender.flight(
            "cloud_dump.upload_part",
            request,
            f"part {request.part_number} of '{request.key}'",
            payloads={request.ref: data},
        )
        return _FlightHandle(self._flights, self._flights.start(flight))

    def finalize(self, request: backup.FinalizeRequest, payloads: dict[str, bytes]) -> None:
        self._call("cloud_dump.finalize_backup", request, payloads)

    def abort(self, request: backup.AbortRequest) -> None:
        self._flights.revive(ABORT_GRACE_S)
        self._task_timeout_s = min(self._task_timeout_s, ABORT_TIMEOUT_S)
        self._call("cloud_dump.abort_backup", request)

    def release(self, handles: list[PartHandle]) -> None:
        self._flights.interrupt()  # a thread waiting for the broker gives up now
        flights = [h.flight for h in handles if isinstance(h, _FlightHandle)]
        self._flights.finish(*flights)

    def close(self) -> None:
        self._sender.close()

    def _call(
        self, task: str, request: StorageBound, payloads: dict[str, bytes] | None = None
    ) -> Any:
        return self._sender.run(task, request, f"'{task}'", payloads,
                                timeout_s=self._task_timeout_s)  # fmt: skip
