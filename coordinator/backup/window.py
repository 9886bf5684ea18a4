"""The in-flight window of part uploads: bounded memory, every part confirmed.

``submit`` hands a part to the runner (``BackupWork``), blocking while ``max_in_flight`` parts
are outstanding, so staged payloads stay bounded whatever the backup size (DESIGN.md §3,
invariant 4). Results are collected as they come; a part's staged payload is dropped once it is
confirmed. Sending again what a dead worker or a restarted broker lost is the runner's job
(``coordinator.broker.flights``): here a part is done when its handle says so.

Parts are sent by ``SENDERS`` threads, not by the thread that cuts them: staging a part with
its task is a round trip to the broker, which costs nothing on loopback and 50 ms with the
broker 50 ms away, where one part after another (two round trips each, then) capped a backup at
about ten parts a second (bench/backup.py, broker 50 ms away). At most ``SENDERS`` parts wait
for or are in a sender, so the coordinator holds at most that many parts beyond the archive
pipeline's own (the runner keeps unconfirmed ones in files, not memory). The runner drops
confirmed parts' results and payloads off the cutting thread.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field

from coordinator.backup.work import BackupWork
from coordinator.runner import Handle
from coordinator.wait import wait_until
from storage.errors import CloudDumpError
from workers.backup import UploadPartRequest, UploadPartResult

# How often a full window looks for finished parts (fixed): a part takes seconds to upload, so
# seeing it 10 ms late costs nothing. No bound on the wait: the runner sends again a part not
# confirmed after ``--part-timeout``, fails the backup when the broker stays away that long
# (``coordinator.broker.flights``), and ``abandon`` ends the wait.
_POLL_S = 0.01
# How often a sender waiting for an upload's opening looks whether the backup was abandoned.
_ABANDON_CHECK_S = 0.1
SENDERS = 4

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    key: str
    sending: Future[Handle]  # the handle, once a sender has staged and sent the part


@dataclass
class PartWindow:
    work: BackupWork
    max_in_flight: int
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    _pending: dict[tuple[str, int], _Pending] = field(default_factory=dict)
    _done: dict[str, dict[int, UploadPartResult]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sequence: int = 0
    _abandoned: bool = False
    senders: int = SENDERS
    _pool: ThreadPoolExecutor | None = None

    def submit(
        self,
        key: str,
        upload_id: Future[str],
        part_number: int,
        data: bytes,
        sha256: str,
        offset: int | None = None,
    ) -> None:
        """Stage and send one part (``offset``: where it starts in the object, in bytes, when
        known); blocks while the window is full.

        ``upload_id`` is the opening of ``key``'s multipart upload, waited for by the sender,
        not here: the thread cutting parts goes on reading the stream while the upload is
        opened (with the broker 50 ms away, the first part waited two round trips for it).
        """
        with self._lock:
            wait_until(self._room, timeout_s=math.inf, first_s=_POLL_S)
            if self._abandoned:  # room, but the senders are gone
                raise CloudDumpError("the backup was abandoned")
            self._sequence += 1
            ref = f"{self.run_id}:{self._sequence}"

            def send() -> Handle:
                request = UploadPartRequest(
                    key=key, upload_id=self._opened(upload_id), part_number=part_number,
                    size=len(data), sha256=sha256, ref=ref, offset=offset,
                )  # fmt: skip
                return self.work.upload_part(request, data)

            self._pending[(key, part_number)] = _Pending(key, self._senders().submit(send))

    def drain(self) -> dict[str, list[UploadPartResult]]:
        """Wait for every part sent; return the uploaded parts of each key, in order."""
        with self._lock:
            wait_until(self._all_done, timeout_s=math.inf, first_s=_POLL_S)
            self.close()
            return {k: [parts[n] for n in sorted(parts)] for k, parts in self._done.items()}

    def close(self) -> None:
        """Stop the senders once what they were given is done."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def abandon(self) -> None:
        """Give up on the parts not confirmed yet: a ``submit`` waiting for room raises, and
        their staged payloads are dropped (best effort).

        Does not take the lock: the thread holding it may be the one waiting for a broker that
        will not come back (the runner stops that wait).
        """
        self._abandoned = True
        pending = list(self._pending.values())
        for p in pending:
            p.sending.cancel()  # not picked up by a sender yet: never will be
        # A sender in the middle of a send finishes it: stop its wait for the broker first,
        # then wait for it, so that the part it sent is given up with the others (its task
        # would otherwise still reach a worker while the upload is being aborted).
        self.work.give_up([])
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        sent = [p.sending.result() for p in pending if p.sending.done()
                and not p.sending.cancelled() and p.sending.exception() is None]  # fmt: skip
        self.work.give_up(sent)

    def _opened(self, upload_id: Future[str]) -> str:
        """The upload's id once it is opened; raises once the backup is abandoned first (the
        opening waits for a worker, up to --task-timeout: ``abandon`` must not)."""
        while not self._abandoned:
            done, _ = futures_wait([upload_id], timeout=_ABANDON_CHECK_S)
            if done:
                return upload_id.result()
        raise CloudDumpError("the backup was abandoned")

    @property
    def redispatched(self) -> int:
        return self.work.resent

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def _room(self) -> bool:
        """Whether another part may be sent (taking in finished ones first); raises once the
        backup is abandoned, or a part's error."""
        while len(self._pending) >= self.max_in_flight or self._unsent() >= self.senders:
            if self._abandoned:
                raise CloudDumpError("the backup was abandoned")
            if not self._collect():
                return False
        return True

    def _unsent(self) -> int:
        return sum(1 for p in self._pending.values() if not p.sending.done())

    def _all_done(self) -> bool:
        """Whether every part sent is confirmed (taking in finished ones); raises a part's
        error."""
        while self._pending:
            if not self._collect():
                return False
        return True

    def _collect(self) -> bool:
        """Take in finished parts (raising a part's error, or a failure to send one). True if
        anything finished."""
        finished = [
            slot
            for slot, pending in self._pending.items()
            if pending.sending.done() and pending.sending.result().done()
        ]
        handles = []
        try:
            for slot in finished:
                pending = self._pending.pop(slot)
                handle = pending.sending.result()
                handles.append(handle)
                result = self.work.part_result(handle)
                self._done.setdefault(pending.key, {})[result.part_number] = result
        finally:
            if handles:
                self._release(handles)
        return bool(finished)

    def _release(self, handles: list[Handle]) -> None:
        """Drop answered parts' results and payloads (best effort; the runner does it off
        this thread, ``Runner.release``)."""
        try:
            self.work.release(handles)
        except Exception:
            log.debug("dropping answered parts failed", exc_info=True)

    def _senders(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.senders, thread_name_prefix="part-sender")
        return self._pool
