"""The in-flight window of part uploads: bounded memory, every part confirmed.

``submit`` hands a part to the runner (``BackupWork``), blocking while ``max_in_flight`` parts
are outstanding, so staged payloads (and the coordinator's memory, which keeps each unconfirmed
part to stage it again should the broker lose it) stay bounded whatever the backup size
(DESIGN.md §3, invariant 4). Results are collected as they come; a part's staged payload is
dropped once it is confirmed. Sending again what a dead worker or a restarted broker lost is
the runner's job (``coordinator.broker.flights``): here a part is done when its handle says so.
"""

from __future__ import annotations

import math
import threading
import uuid
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


@dataclass
class _Pending:
    request: UploadPartRequest
    handle: Handle


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

    def submit(self, key: str, upload_id: str, part_number: int, data: bytes, sha256: str) -> None:
        """Stage and send one part; blocks while the window is full."""
        with self._lock:
            wait_until(self._room, timeout_s=math.inf, first_s=_POLL_S)
            self._sequence += 1
            request = UploadPartRequest(
                key=key,
                upload_id=upload_id,
                part_number=part_number,
                size=len(data),
                sha256=sha256,
                ref=f"{self.run_id}:{self._sequence}",
            )
            handle = self.work.upload_part(request, data)
            self._pending[(key, part_number)] = _Pending(request, handle)

    def drain(self) -> dict[str, list[UploadPartResult]]:
        """Wait for every part sent; return the uploaded parts of each key, in order."""
        with self._lock:
            wait_until(self._all_done, timeout_s=math.inf, first_s=_POLL_S)
            return {k: [parts[n] for n in sorted(parts)] for k, parts in self._done.items()}

    def abandon(self) -> None:
        """Give up on the parts not confirmed yet: a ``submit`` waiting for room raises, and
        their staged payloads are dropped (best effort).

        Does not take the lock: the thread holding it may be the one waiting for a broker that
        will not come back (the runner stops that wait).
        """
        self._abandoned = True
        pending = list(self._pending.values())
        self.work.give_up([p.handle for p in pending])

    @property
    def redispatched(self) -> int:
        return self.work.resent

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def _room(self) -> bool:
        """Whether another part may be sent (taking in finished ones first); raises once the
        backup is abandoned, or a part's error."""
        while len(self._pending) >= self.max_in_flight:
            if self._abandoned:
                raise CloudDumpError("the backup was abandoned")
            if not self._collect():
                return False
        return True

    def _all_done(self) -> bool:
        """Whether every part sent is confirmed (taking in finished ones); raises a part's
        error."""
        while self._pending:
            if not self._collect():
                return False
        return True

    def _collect(self) -> bool:
        """Take in finished parts (raising a part's error). True if anything finished."""
        finished = [slot for slot, pending in self._pending.items() if pending.handle.done()]
        for slot in finished:
            pending = self._pending.pop(slot)
            try:
                result = self.work.part_result(pending.handle)
            finally:
                self.work.release([pending.handle])
            self._done.setdefault(pending.request.key, {})[result.part_number] = result
        return bool(finished)
