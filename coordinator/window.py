"""The in-flight window of part uploads: bounded memory, and no part lost with a worker.

``submit`` stages a part and sends it, blocking while ``max_in_flight`` parts are outstanding,
so staged payloads (and the coordinator's memory) stay bounded whatever the backup size
(DESIGN.md §3, invariant 4). Results are collected as they come; a staged payload is deleted
once its part is confirmed.

Re-dispatch: Redis redelivers the message of a worker killed mid-task only after its visibility
timeout (measured: not within 60 s), so a part whose result is overdue is sent again. Uploading
a part number twice stores the same bytes twice, which is harmless; the first answer wins.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from coordinator.runners import PartHandle, Runner
from workers.backup import UploadPartRequest, UploadPartResult

log = logging.getLogger(__name__)

_POLL_S = 0.01


@dataclass
class _Pending:
    request: UploadPartRequest
    handles: list[PartHandle]
    sent_at: float
    attempts: int = 1


@dataclass
class PartWindow:
    runner: Runner
    max_in_flight: int
    part_timeout_s: float
    payload_ttl_s: int
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    _pending: dict[tuple[str, int], _Pending] = field(default_factory=dict)
    _done: dict[str, dict[int, UploadPartResult]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    redispatched: int = 0
    _sequence: int = 0

    def submit(self, key: str, upload_id: str, part_number: int, data: bytes, sha256: str) -> None:
        """Stage and send one part; blocks while the window is full."""
        with self._lock:
            while len(self._pending) >= self.max_in_flight:
                if not self._collect():
                    time.sleep(_POLL_S)
            self._sequence += 1
            ref = f"{self.run_id}:{self._sequence}"
            self.runner.stage.put(ref, data, self.payload_ttl_s)
            request = UploadPartRequest(
                key=key,
                upload_id=upload_id,
                part_number=part_number,
                size=len(data),
                sha256=sha256,
                ref=ref,
            )
            handle = self.runner.upload_part(request)
            self._pending[(key, part_number)] = _Pending(request, [handle], time.monotonic())

    def drain(self) -> dict[str, list[UploadPartResult]]:
        """Wait for every part sent; return the uploaded parts of each key, in order."""
        with self._lock:
            while self._pending:
                if not self._collect():
                    time.sleep(_POLL_S)
            return {k: [parts[n] for n in sorted(parts)] for k, parts in self._done.items()}

    def outstanding_refs(self) -> list[str]:
        return [p.request.ref for p in self._pending.values()]

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def _collect(self) -> bool:
        """Take in finished parts; re-send overdue ones. True if anything finished."""
        finished = []
        now = time.monotonic()
        for slot, pending in self._pending.items():
            result = _settle(pending)
            if result is not None:
                self._done.setdefault(pending.request.key, {})[result.part_number] = result
                finished.append(slot)
            elif self.runner.redispatches and now - pending.sent_at > self.part_timeout_s:
                self._redispatch(pending, now)
        for slot in finished:
            self.runner.stage.delete(self._pending.pop(slot).request.ref)
        return bool(finished)

    def _redispatch(self, pending: _Pending, now: float) -> None:
        request = pending.request
        log.warning(
            "part %d of '%s' not confirmed after %.0f s (attempt %d): sending it again",
            request.part_number,
            request.key,
            now - pending.sent_at,
            pending.attempts,
        )
        pending.handles.append(self.runner.upload_part(request))
        pending.sent_at = now
        pending.attempts += 1
        self.redispatched += 1


def _settle(pending: _Pending) -> UploadPartResult | None:
    """The part's result once any attempt succeeded; raise once every attempt failed."""
    errors: list[Exception] = []
    for handle in pending.handles:
        if handle.done():
            try:
                return handle.result()
            except Exception as exc:  # the task's own error, re-raised below if nothing wins
                errors.append(exc)
    if errors and len(errors) == len(pending.handles):
        raise errors[-1]
    return None
