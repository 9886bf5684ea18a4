"""wal-push's units of work, typed: pushing one WAL file and opening the archive, over a
``coordinator.runner.Runner`` (the Celery workers, or threads of this process).

Through a broker, ``push_wal`` goes to the ``wal`` queue with its payload staged in Redis, and
``coordinator.broker.flights`` follows it: a push whose answer is overdue
(``CLOUD_DUMP_WAL_RETRY_S``), whose worker is gone, or that a restarted broker lost is sent
again, its payload staged again (``push_wal`` is idempotent). A broker that goes away is waited
for up to half the call's ``--timeout`` (at most ``BROKER_GRACE_MAX_S``), so that a Redis
restart does not fail archiving, and one that stays away is reported before the call gives up.
When wal-push was told a storage (``--storage``, ``CLOUD_DUMP_STORAGE`` or ``--config``),
every request carries that location and a worker whose storage is elsewhere refuses it
(``workers.location``, exit 3).

Without a broker the same functions run in daemon threads of this process, every call bounded
by the call's ``--timeout``: a store that accepts a connection and never answers must not hold
PostgreSQL's archiver for the client library's own timeouts.

``start``/``check`` is what the detached WAL pusher pipelines; ``push`` is the blocking batch
the synchronous path uses.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coordinator.runner import Handle, Runner, run
from coordinator.wait import wait_until

if TYPE_CHECKING:
    from coordinator.settings import WalPushSettings
    from workers.wal import (
        OpenWalArchiveRequest,
        OpenWalArchiveResult,
        PushWalRequest,
        PushWalResult,
    )

    Outcome = PushWalResult | BaseException

RETRY_ENV = "CLOUD_DUMP_WAL_RETRY_S"
# Safety net only: staged payloads are deleted once their push is answered.
STAGE_TTL_S = 3600
EMBEDDED_THREADS = 4
BROKER_GRACE_MAX_S = 60.0
# From 5 ms, doubling up to 50 ms: a push takes a few ms on an idle worker, seconds on a slow
# store.
_PUSH_POLL_FIRST_S = 0.005
_PUSH_POLL_MAX_S = 0.05


@dataclass
class WalWork:
    """wal-push's units over ``runner``; ``retry_s``: how long a push stays unanswered before
    it is sent again (``CLOUD_DUMP_WAL_RETRY_S``)."""

    runner: Runner
    retry_s: float

    def open_archive(
        self, request: OpenWalArchiveRequest, payloads: dict[str, bytes] | None = None
    ) -> OpenWalArchiveResult:
        """The archive's identity (``workers.wal.open_wal_archive``), ``payloads`` staged under
        the refs ``request`` names."""
        from workers.wal import OpenWalArchiveResult

        answer = run(self.runner, "cloud_dump.open_wal_archive", request, "the WAL archive",
                     payloads, timeout_s=self.retry_s * 4)  # fmt: skip
        return OpenWalArchiveResult.model_validate(answer)

    def start(self, request: PushWalRequest, payload: bytes, deadline: float) -> Handle:
        """Send one push of ``payload`` (staged under ``request.ref``); ``check`` follows it up.
        Unanswered at ``deadline`` (``time.monotonic()``): overdue."""
        return self.runner.start(
            "cloud_dump.push_wal", request, f"WAL file '{request.file_name}'",
            {request.ref: payload}, timeout_s=max(0.0, deadline - time.monotonic()),
        )  # fmt: skip

    @staticmethod
    def check(handle: Handle) -> Outcome | None:
        """The push's outcome once answered (or overdue); None while it is still running.

        Raises ``BrokerUnreachable`` only once the broker stayed away for the grace period.
        """
        from workers.wal import PushWalResult

        if not handle.done():
            return None
        try:
            answer = handle.result()
        except Exception as exc:  # the push's own error, or overdue: its outcome
            return exc
        return PushWalResult.model_validate(answer)

    def push(
        self, pushes: list[tuple[PushWalRequest, bytes]], own_name: str, deadline: float
    ) -> dict[str, Outcome]:
        """Each file's result, or the error that stopped it; never raises for one file.

        Once ``own_name`` (the file the call was asked for) is answered, the others (pushed
        ahead of PostgreSQL) get one more retry period, not the whole timeout.
        """
        handles = {r.file_name: self.start(r, payload, deadline) for r, payload in pushes}
        outcomes: dict[str, Outcome] = {}

        def all_answered() -> bool:
            for name, handle in handles.items():
                if name in outcomes or (outcome := self.check(handle)) is None:
                    continue
                outcomes[name] = outcome
                if name == own_name:
                    for other in handles.values():
                        other.shorten(self.retry_s)
            return len(outcomes) == len(handles)

        try:
            # No bound here: every push is answered or overdue by ``deadline``.
            wait_until(all_answered, timeout_s=math.inf, first_s=_PUSH_POLL_FIRST_S,
                       max_s=_PUSH_POLL_MAX_S, factor=2.0)  # fmt: skip
        finally:
            self.runner.release(handles.values())
        return outcomes

    def release(self, handle: Handle) -> None:
        self.runner.release([handle])

    def close(self) -> None:
        self.runner.close()


def open_work(args: WalPushSettings) -> WalWork:
    """wal-push's runner: the workers when a broker is given, else threads of this process,
    none running past the call's ``--timeout``."""
    from options.declared import number_from_env

    retry_s = float(number_from_env(RETRY_ENV))
    timeout_s = float(args.timeout)
    if args.broker:
        from coordinator.broker.client import open_broker
        from coordinator.broker.flights import CeleryRunner
        from storage.urls import storage_url
        from tasks.config import WAL_QUEUE

        # Told a storage, the workers must be storing there (checked before connecting).
        location = storage_url(args.storage) if args.storage else None
        broker = open_broker(args.broker, args.result_backend, args.staging_url)
        runner: Runner = CeleryRunner(
            broker, WAL_QUEUE, storage_url=location,
            grace_s=min(BROKER_GRACE_MAX_S, timeout_s / 2),
            payload_ttl_s=STAGE_TTL_S, resend_after_s=retry_s,
        )  # fmt: skip
        return WalWork(runner, retry_s)
    from coordinator.runner import EmbeddedRunner
    from coordinator.settings import open_store
    from storage.errors import StorageUnreachable
    from workers.wal import UNITS

    storage = open_store(args)

    def overdue(what: str) -> BaseException:
        return StorageUnreachable(
            f"storage {storage.url} did not store {what} within {timeout_s:.0f} s "
            "(wal-push --timeout)"
        )

    runner = EmbeddedRunner(storage, UNITS, threads=EMBEDDED_THREADS, overdue=overdue,
                            deadline=time.monotonic() + timeout_s)  # fmt: skip
    return WalWork(runner, retry_s)
