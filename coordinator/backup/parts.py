"""Cutting one stored stream into multipart parts: part sizes, the cutter and the part thread.

Owns the last two stages of an archive's data path (DESIGN.md §3): bytes that are already
compressed and encrypted are cut into parts of exactly ``PartSizer.size_for(n)`` bytes (the last
part shorter), each part is hashed, and handed to a ``PartSink`` in order.

Threads: ``PartCutter.feed`` runs on whichever thread produces the stored bytes (the caller's,
or the age thread when encrypting); every ``PartSink.put_part`` call runs on one dedicated thread
per archive, named ``archive-parts``, and the whole-object hash on another, ``archive-hash``.
Hashing (twice per byte: the part and the whole object) costs more than anything else here
(SHA-256 ~1.8 GB/s per pass on this machine) and hashlib releases the GIL on large buffers: off
the caller's thread, and the two hashes side by side, pass-through went from ~750 MB/s to
~1.1 GB/s (bench/pipeline.py).

Memory: the part being filled, one part queued for each of the two threads and the one inside
``put_part``: at most about five parts, whatever the length of the stream.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from typing import Protocol

from storage.base import Capabilities, MiB
from storage.errors import PermanentStorageError
from storage.manifest import PartRecord

DEFAULT_TARGET_PART_BYTES = 8 * MiB  # --part-size-mib's default (options.declared)
# Parts waiting for each thread: one lets the cutter fill the next part while the previous one
# is hashed; more would only add memory, since a slow sink is what makes the queue fill.
_PARTS_QUEUED = 1


class PartSink(Protocol):
    """Where parts go (the dispatcher: stage in Redis, enqueue ``upload_part``).

    Called in part order from one thread, the archive's ``archive-parts`` thread, never from
    the thread that calls ``ArchiveWriter.write``. ``data`` is immutable and the sink may keep
    it. May block to apply backpressure: the writer's ``write`` then blocks too. An exception
    raised here fails the archive: ``ArchiveWriter.write``/``close`` re-raise it.
    """

    def put_part(self, part_number: int, data: bytes, sha256: str) -> None: ...


class PartSizer:
    """Part size from the archive's size estimate and the store's limits.

    Rule (N = ``max_part_count``, E = the estimate, 0 when unknown):

    - the initial size s0 = max(target, min part size, E * 1.25 / N rounded up to a MiB),
      capped at the max part size;
    - the size doubles every ``band_parts`` = (N - F) // (2 L) parts (at least 1), where
      F = ceil(E / s0) is the number of parts the estimate needs (at most 0.8 N, unless even
      max-size parts cannot hold 1.25 E) and L the number of doublings from s0 to the max part
      size; the first max(F, ``band_parts``) parts are s0, and no part exceeds the maximum.

    So parts stay small while the stream is within its estimate, and the ramp to the max part
    size uses at most half the parts left after the estimate: the N parts hold at least
    E + (N - F) / 2 * max part size bytes (``capacity_bytes``, which is exact). A stream up to
    that size never needs more than N parts. No rule can promise N * max part size to a stream
    whose first parts are smaller than the maximum.
    """

    def __init__(
        self,
        capabilities: Capabilities,
        estimate_bytes: int | None,
        *,
        target_part_bytes: int = DEFAULT_TARGET_PART_BYTES,
    ) -> None:
        self.capabilities = capabilities
        count = capabilities.max_part_count
        estimate = max(estimate_bytes or 0, 0)
        planned = _round_up(_ceil_div(estimate * 5, 4 * count), MiB)
        self.initial_part_bytes = min(
            max(target_part_bytes, capabilities.min_part_size_bytes, planned),
            capabilities.max_part_size_bytes,
        )
        self.estimated_parts = min(_ceil_div(estimate, self.initial_part_bytes), count)
        self.doublings = _doublings(self.initial_part_bytes, capabilities.max_part_size_bytes)
        remaining = count - self.estimated_parts
        self.band_parts = max(1, remaining // (2 * self.doublings)) if self.doublings else 1

    def size_for(self, part_number: int) -> int:
        """Size of part ``part_number`` (1-based) unless it is the last one."""
        if part_number < 1:
            raise ValueError(f"part numbers start at 1, got {part_number}")
        beyond = part_number - max(self.estimated_parts, self.band_parts)
        step = 0 if beyond <= 0 else 1 + (beyond - 1) // self.band_parts
        if step >= self.doublings:
            return self.capabilities.max_part_size_bytes
        return self.initial_part_bytes << step

    @property
    def capacity_bytes(self) -> int:
        """The longest stream that fits in ``max_part_count`` parts."""
        return sum(self.size_for(n) for n in range(1, self.capabilities.max_part_count + 1))


class PartThread:
    """Hashes parts and hands them to the sink, in order, on the ``archive-parts`` thread.

    The first exception from the sink (or from hashing) is kept: later ``submit`` calls raise
    it and the remaining parts are discarded, so a producer blocked on the queue is released.
    """

    def __init__(self, sink: PartSink) -> None:
        self._sink = sink
        self._queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue(maxsize=_PARTS_QUEUED)
        self._whole = _RunningHash()
        self._records: list[PartRecord] = []
        self._stored_bytes = 0
        self.discard = False  # set by abort: drop parts instead of calling the sink
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="archive-parts", daemon=True)
        self._thread.start()

    def submit(self, part_number: int, data: bytes) -> None:
        """Queue a part; blocks while the queue is full (the sink's backpressure)."""
        if self.error is not None:
            raise self.error
        self._queue.put((part_number, data))

    def close(self) -> tuple[list[PartRecord], int, str]:
        """Wait for every part to reach the sink: (records, stored bytes, whole-object sha256)."""
        self._stop()
        if self.error is not None:
            raise self.error
        return self._records, self._stored_bytes, self._whole.hexdigest()

    def abort(self) -> None:
        """Discard queued parts and wait for the thread (after any ``put_part`` in progress)."""
        self.discard = True
        self._stop()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._whole.stop()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is None and not self.discard:
                try:
                    self._put(*item)
                except BaseException as exc:  # handed to the producer by submit/close
                    self.error = exc

    def _put(self, part_number: int, data: bytes) -> None:
        self._whole.update(data)  # first, so that both hashes of this part run at once
        sha256 = hashlib.sha256(data).hexdigest()
        self._sink.put_part(part_number, data, sha256)
        self._records.append(PartRecord(number=part_number, size=len(data), sha256=sha256))
        self._stored_bytes += len(data)


class _RunningHash:
    """SHA-256 of the whole stream, updated on its own thread in parallel with the part hash."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_PARTS_QUEUED)
        self._thread = threading.Thread(target=self._run, name="archive-hash", daemon=True)
        self._thread.start()

    def update(self, data: bytes) -> None:
        self._queue.put(data)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.stop()
        return self._hash.hexdigest()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            self._hash.update(data)


class PartCutter:
    """Cuts a byte stream into parts of exactly ``sizer.size_for(n)`` bytes.

    Fills a preallocated buffer through memoryview slices and copies it out once per part:
    measured here, that beat both ``del buf[:n]`` and handing over fresh ``BytesIO`` buffers.
    """

    def __init__(self, sizer: PartSizer, parts: PartThread) -> None:
        self._sizer = sizer
        self._parts = parts
        self._max_parts = sizer.capabilities.max_part_count
        self._number = 1
        self._size = sizer.size_for(1)
        self._buffer = bytearray(self._size)
        self._view = memoryview(self._buffer)
        self._filled = 0
        self.discard = False  # set by abort: drop whatever still arrives

    def feed(self, data: bytes | memoryview) -> None:
        if self.discard:
            return
        view = memoryview(data).cast("B")
        while view:
            size = self._size  # _emit moves on to the next part's size
            if self._filled == 0 and len(view) >= size:
                # A whole part in one piece: one copy instead of two (none if it is all of data).
                if isinstance(data, bytes) and len(data) == len(view) == size:
                    self._emit(data)
                else:
                    self._emit(bytes(view[:size]))
                view = view[size:]
                continue
            n = min(size - self._filled, len(view))
            self._view[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == size:
                self._emit(bytes(self._buffer))

    def finish(self) -> None:
        """Emit the last, short part; an empty stream still gets one (empty) part."""
        if self.discard:
            return
        if self._filled or self._number == 1:
            self._emit(bytes(self._view[: self._filled]))
        self._view.release()

    def _emit(self, data: bytes) -> None:
        if self._number > self._max_parts:
            raise PermanentStorageError(
                f"stream exceeds the store's limit of {self._max_parts} parts "
                f"({self._sizer.capacity_bytes} bytes with this size estimate)"
            )
        self._parts.submit(self._number, data)
        self._number += 1
        self._filled = 0
        size = self._sizer.size_for(self._number)
        if size != self._size:
            # Rare (the size doubles per band): a new buffer instead of a resize, whose
            # contents would be copied for nothing.
            self._view.release()
            self._size = size
            self._buffer = bytearray(size)
            self._view = memoryview(self._buffer)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(value: int, unit: int) -> int:
    return _ceil_div(value, unit) * unit


def _doublings(initial: int, maximum: int) -> int:
    """How many doublings take ``initial`` to ``maximum`` (or beyond)."""
    steps = 0
    while initial << steps < maximum:
        steps += 1
    return steps
