"""The backup's units of work, typed: what the backup code calls instead of naming tasks.

``BackupWork`` turns each step (claim, open an archive, upload a part, finalize, abort) into one
unit sent through a ``coordinator.runner.Runner``, and validates the answer into its model, so
that the backup never knows whether its work runs on the Celery workers or in this process.
``open_work`` picks the runner: the workers when a broker is given, else threads here.
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from coordinator.runner import Handle, Runner, answer, run
from workers.backup import (
    AbortRequest,
    BackupRef,
    ClaimRequest,
    FinalizeRequest,
    HeartbeatRequest,
    OpenArchiveRequest,
    UploadPartRequest,
    UploadPartResult,
)
from workers.wal import OpenWalArchiveRequest, OpenWalArchiveResult

if TYPE_CHECKING:
    from coordinator.settings import BackupSettings
    from storage.base import Capabilities

# How long a failed backup tries to undo what it stored, at most: the broker or the workers
# may be the reason it failed, and an interrupted backup must end well within a service
# manager's stop timeout (systemd: 90 s, then SIGKILL). What it could not undo, it names.
ABORT_GRACE_S = 30.0
ABORT_TIMEOUT_S = 30.0


@dataclass
class BackupWork:
    """The backup's steps over ``runner``; claim, open and finalize are waited for at most
    ``task_timeout_s`` (``--task-timeout``)."""

    runner: Runner
    task_timeout_s: float
    _sent_claim: tuple[ClaimRequest, Handle] | None = field(default=None, init=False, repr=False)

    @property
    def resent(self) -> int:
        """Units sent again because they looked lost."""
        return self.runner.resent

    def claim(self, request: ClaimRequest) -> str:
        """Take the name; return where the claim is stored (for messages). A claim sent ahead
        with ``send_claim`` is not sent again: its answer is read."""
        sent, self._sent_claim = self._sent_claim, None
        if sent is not None and sent[0] == request:
            return str(answer(self.runner, sent[1]))
        return str(self._run("cloud_dump.claim_backup", request))

    def send_claim(self, request: ClaimRequest) -> None:
        """Send the claim now, for ``claim`` to read later: a backup sends it as soon as the
        broker answers, while the rest of the command starts."""
        self._sent_claim = (request, self._start("cloud_dump.claim_backup", request))

    def withdraw_claim(self) -> None:
        """Give up a claim sent ahead that no run will use: if it was taken, release it (best
        effort; a claim left behind is ``cloud-dump cleanup``'s to find)."""
        sent, self._sent_claim = self._sent_claim, None
        if sent is None:
            return
        request, handle = sent
        try:
            answer(self.runner, handle)
        except Exception:
            return  # not taken
        with contextlib.suppress(Exception):
            self.abort(AbortRequest(backup=request.backup, run_id=request.run_id, uploads=[]))

    def heartbeat(self, request: HeartbeatRequest, *, timeout_s: float) -> bool:
        """Record that the run is alive in its claim; False once the claim is not its own."""
        return bool(run(self.runner, "cloud_dump.heartbeat_backup", request, "a heartbeat",
                        timeout_s=timeout_s))  # fmt: skip

    def open_wal_archive(self, request: OpenWalArchiveRequest) -> OpenWalArchiveResult:
        return self.wal_archive(self.start_open_wal_archive(request))

    def start_open_wal_archive(self, request: OpenWalArchiveRequest) -> Handle:
        """Start reading the WAL archive's identity; ``wal_archive`` reads the answer."""
        # On the parts queue: the backup's workers may not consume the wal queue.
        return self._start("cloud_dump.open_wal_archive", request)

    def wal_archive(self, handle: Handle) -> OpenWalArchiveResult:
        """The answer of ``start_open_wal_archive``, waited for; raises its error."""
        return OpenWalArchiveResult.model_validate(answer(self.runner, handle))

    def start_open_archive(self, key: str) -> Handle:
        """Start opening the multipart upload of ``key``; ``upload_id`` reads the answer."""
        return self._start("cloud_dump.open_archive", OpenArchiveRequest(key=key))

    def upload_id(self, handle: Handle) -> str:
        """The upload ID ``start_open_archive`` asked for, waited for; raises its error."""
        return str(answer(self.runner, handle))

    def upload_part(self, request: UploadPartRequest, data: bytes) -> Handle:
        """Start uploading one part; ``part_result`` reads the handle's answer."""
        what = f"part {request.part_number} of '{request.key}'"
        return self.runner.start("cloud_dump.upload_part", request, what, {request.ref: data})

    @staticmethod
    def part_result(handle: Handle) -> UploadPartResult:
        """The uploaded part; raises the unit's error if it failed."""
        return UploadPartResult.model_validate(handle.result())

    def finalize(self, request: FinalizeRequest, payloads: dict[str, bytes]) -> None:
        """Finalize with ``payloads`` staged under the refs ``request`` names."""
        self._run("cloud_dump.finalize_backup", request, payloads)

    def abort(self, request: AbortRequest) -> bool:
        """Undo a failed run; gives up after a bounded time (``ABORT_*``). True when the
        backup turned out complete (finalize had stored it): then nothing was undone."""
        self.runner.revive(ABORT_GRACE_S)
        self.task_timeout_s = min(self.task_timeout_s, ABORT_TIMEOUT_S)
        return bool(self._run("cloud_dump.abort_backup", request))

    def release(self, handles: list[Handle]) -> None:
        """Drop the staged payloads and results of these parts: answered."""
        self.runner.release(handles)

    def give_up(self, handles: list[Handle]) -> None:
        """Drop the parts given up on (best effort) before returning; a wait for the broker
        stops now."""
        self.runner.interrupt()
        self.runner.release(handles, wait=True)

    def close(self) -> None:
        self.runner.close()

    def _run(
        self,
        task: str,
        request: ClaimRequest
        | OpenArchiveRequest
        | OpenWalArchiveRequest
        | FinalizeRequest
        | AbortRequest,
        payloads: dict[str, bytes] | None = None,
    ) -> object:
        return run(self.runner, task, request, f"'{task}'", payloads,
                   timeout_s=self.task_timeout_s)  # fmt: skip

    def _start(
        self, task: str, request: ClaimRequest | OpenArchiveRequest | OpenWalArchiveRequest
    ) -> Handle:
        return self.runner.start(task, request, f"'{task}'", timeout_s=self.task_timeout_s)


def new_claim(
    backup: BackupRef, heartbeat_every_s: float, parts_per_object: int | None = None
) -> ClaimRequest:
    """A run's claim of ``backup``'s name: a fresh run id, this host, the time now, and the
    most parts the run puts in one object (``--s3-max-parts``), for the workers to check."""
    started = datetime.now(UTC).isoformat()
    return ClaimRequest(
        backup=backup, run_id=uuid.uuid4().hex, host=socket.gethostname(), started_at=started,
        heartbeat_every_s=heartbeat_every_s, heartbeat_at=started,
        parts_per_object=parts_per_object,
    )  # fmt: skip


def open_work(args: BackupSettings) -> tuple[BackupWork, Capabilities]:
    """The backup's runner with the limits of the store it writes to: the Celery workers when
    a broker is given, else ``--parallel`` threads of this process."""
    if args.broker:
        from coordinator.broker.client import open_broker
        from coordinator.broker.flights import CeleryRunner
        from storage.base import (
            S3_MAX_PART_SIZE_BYTES,
            S3_MIN_PART_SIZE_BYTES,
            Capabilities,
        )
        from storage.urls import storage_url
        from tasks.config import PARTS_QUEUE

        # The workers hold the storage; told one, this backup must land there (every task
        # carries it, and a worker storing elsewhere refuses: exit 3).
        location = storage_url(args.storage) if args.storage else None
        broker = open_broker(args.broker, args.result_backend, args.staging_url)
        # A broker that goes away is waited for as long as a part may stay unconfirmed; a
        # staged payload nobody deleted expires after ten part timeouts, an hour at least.
        runner: Runner = CeleryRunner(
            broker, PARTS_QUEUE, storage_url=location, grace_s=args.part_timeout,
            payload_ttl_s=max(3600, int(args.part_timeout * 10)),
            resend_after_s=args.part_timeout,
        )  # fmt: skip
        # The store's limits come from the flags.
        capabilities = Capabilities(
            S3_MIN_PART_SIZE_BYTES, S3_MAX_PART_SIZE_BYTES, args.s3_max_parts
        )
        return BackupWork(runner, args.task_timeout), capabilities
    from coordinator.runner import EmbeddedRunner
    from coordinator.settings import open_store
    from storage.errors import StorageUnreachable
    from workers.backup import UNITS as BACKUP_UNITS
    from workers.wal import UNITS as WAL_UNITS

    storage = open_store(args)

    def overdue(what: str) -> BaseException:
        return StorageUnreachable(
            f"storage {storage.url} did not answer {what} in time (claim and finalize wait "
            f"--task-timeout, {args.task_timeout:.0f} s; a heartbeat one heartbeat period)"
        )

    runner = EmbeddedRunner(storage, BACKUP_UNITS | WAL_UNITS, threads=args.parallel,
                            overdue=overdue)  # fmt: skip
    return BackupWork(runner, args.task_timeout), storage.capabilities
