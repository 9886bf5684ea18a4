"""Cutting one stored stream into multipart parts: part sizes, the cutter and the part thread.

Owns the last two stages of an archive's data path (DESIGN.md §3): bytes that are already
compressed and encrypted are cut into parts of exactly ``PartSizer.part_bytes`` bytes (the last
part shorter), each part is hashed, and handed to a ``PartSink`` in order. Parts are numbered
across the whole stream; every ``PartSizer.parts_per_object`` of them make one stored object.

Threads: ``PartCutter.feed`` runs on whichever thread produces the stored bytes (the caller's,
or the age thread when encrypting); every ``PartSink.put_part`` call runs on one dedicated thread
per archive, named ``archive-parts``, and the whole-object hash on another, ``archive-hash``.
Hashing (twice per byte: the part and the whole object) costs more than anything else here
(SHA-256 ~1.8 GB/s per pass on this machine) and hashlib releases the GIL on large buffers: off
the caller's thread, and the two hashes side by side, pass-through went from ~750 MB/s to
~1.1 GB/s (bench/pipeline.py).

Memory: the part being filled, one part queued for each of the two threads and the one inside
``put_part``: at most about five parts of a fixed size, whatever the length of the stream.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass
from typing import Protocol

from storage.base import Capabilities, MiB
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
    """Part size and parts per stored object, from the store's limits.

    Every part is ``part_bytes`` = the target (``--part-size-mib``) within the store's part
    sizes, the last one shorter, whatever the archive's size: a store takes at most
    ``max_part_count`` parts per object (S3: 10,000), so part ``parts_per_object + 1`` begins a
    second object, and so on (``ArchiveRecord.objects``). Growing the parts instead would grow
    every buffer that holds one with the database: a 1 TB tablespace needed 125 MB parts.
    """

    def __init__(
        self, capabilities: Capabilities, *, target_part_bytes: int = DEFAULT_TARGET_PART_BYTES
    ) -> None:
        self.capabilities = capabilities
        self.part_bytes = min(
            max(target_part_bytes, capabilities.min_part_size_bytes),
            capabilities.max_part_size_bytes,
        )
        self.parts_per_object = capabilities.max_part_count

    def size_for(self, part_number: int) -> int:
        """Size of part ``part_number`` (1-based) unless it is the last one."""
        if part_number < 1:
            raise ValueError(f"part numbers start at 1, got {part_number}")
        return self.part_bytes

    def object_of(self, part_number: int) -> tuple[int, int]:
        """(object index from 0, part number within that object from 1) of a part."""
        index, within = divmod(part_number - 1, self.parts_per_object)
        return index, within + 1


@dataclass(frozen=True)
class ObjectSummary:
    """One stored object of an archive: its bytes, their SHA-256 (hex), its part count."""

    size: int
    sha256: str
    parts: int


class PartThread:
    """Hashes parts and hands them to the sink, in order, on the ``archive-parts`` thread.

    The first exception from the sink (or from hashing) is kept: later ``submit`` calls raise
    it and the remaining parts are discarded, so a producer blocked on the queue is released.
    """

    def __init__(self, sink: PartSink, parts_per_object: int) -> None:
        self._sink = sink
        self._parts_per_object = parts_per_object
        self._queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue(maxsize=_PARTS_QUEUED)
        self._whole = _RunningHash()
        self._object_sizes: list[int] = []
        self._object_parts: list[int] = []
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

    def close(self) -> tuple[list[PartRecord], int, str, list[ObjectSummary]]:
        """Wait for every part to reach the sink: (records, stored bytes, SHA-256 of the whole
        stream, the objects it is stored in)."""
        self._stop()
        if self.error is not None:
            raise self.error
        whole, objects = self._whole.hexdigests()
        counts = zip(self._object_sizes, objects, self._object_parts, strict=True)
        summaries = [ObjectSummary(size, sha256, parts) for size, sha256, parts in counts]
        return self._records, self._stored_bytes, whole, summaries

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
        starts_object = (part_number - 1) % self._parts_per_object == 0
        # First, so that both hashes of this part run at once.
        self._whole.update(data, starts_object=starts_object and part_number > 1)
        if starts_object:
            self._object_sizes.append(0)
            self._object_parts.append(0)
        self._object_sizes[-1] += len(data)
        self._object_parts[-1] += 1
        sha256 = hashlib.sha256(data).hexdigest()
        self._sink.put_part(part_number, data, sha256)
        self._records.append(PartRecord(number=part_number, size=len(data), sha256=sha256))
        self._stored_bytes += len(data)


class _RunningHash:
    """SHA-256 of the whole stream, and of each object it is stored in, updated on a thread of
    its own in parallel with the part hash.

    The first object's hash is the whole stream's up to its end (a copy), so an archive of one
    object, nearly every one, is hashed once; bytes past the first object are hashed twice.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._object: hashlib._Hash | None = None  # None: still in the first object
        self._objects: list[str] = []
        self._queue: queue.Queue[tuple[bytes, bool] | None] = queue.Queue(maxsize=_PARTS_QUEUED)
        self._thread = threading.Thread(target=self._run, name="archive-hash", daemon=True)
        self._thread.start()

    def update(self, data: bytes, *, starts_object: bool = False) -> None:
        """Hash ``data``; ``starts_object``: it is the first part of an object after the first."""
        self._queue.put((data, starts_object))

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def hexdigests(self) -> tuple[str, list[str]]:
        """(the whole stream's SHA-256, each object's), once every update is hashed."""
        self.stop()
        return self._hash.hexdigest(), [*self._objects, self._current()]

    def _current(self) -> str:
        return (self._object or self._hash).hexdigest()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            data, starts_object = item
            if starts_object:
                self._objects.append(self._current())
                self._object = hashlib.sha256()
            self._hash.update(data)
            if self._object is not None:
                self._object.update(data)


class PartCutter:
    """Cuts a byte stream into parts of exactly ``sizer.part_bytes`` bytes (the last shorter).

    Fills a preallocated buffer through memoryview slices and copies it out once per part:
    measured here, that beat both ``del buf[:n]`` and handing over fresh ``BytesIO`` buffers.
    """

    def __init__(self, sizer: PartSizer, parts: PartThread) -> None:
        self._sizer = sizer
        self._parts = parts
        self._number = 1
        self._size = sizer.part_bytes
        self._buffer = bytearray(self._size)
        self._view = memoryview(self._buffer)
        self._filled = 0
        self.discard = False  # set by abort: drop whatever still arrives

    def feed(self, data: bytes | memoryview) -> None:
        if self.discard:
            return
        view = memoryview(data).cast("B")
        while view:
            size = self._size
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
        self._parts.submit(self._number, data)
        self._number += 1
        self._filled = 0
