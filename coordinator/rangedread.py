"""Parallel ranged reads of one stored object, consumed as an ordinary file (DESIGN.md §6).

``RangedReader`` cuts the object into consecutive ranges of ``range_bytes``, keeps at most
``parallel`` of them streaming on a thread pool (``Storage.open_range_stream``) and hands the
bytes out strictly in order. A range is not held whole: each streams into a buffer of at most
``buffer_bytes`` and waits while that is full, so memory stays under
``parallel * (buffer_bytes + CHUNK_BYTES)`` whatever the range and object sizes. Ranges can
therefore be large (few requests: moto reads the whole object for each ranged GET, S3 charges
per request) without costing memory; with ranges no larger than ``buffer_bytes`` (real S3's
recommended 8-16 MiB) every range downloads whole in parallel, as plain ranged GETs would. It also
checks the object against what ``manifest.json`` says about it: every range must come back whole
(a short range means the object is shorter than recorded) and, at end of file, the SHA-256 of the
whole object must match, before the caller sees EOF and could believe the data complete.

An archive stored as several objects (``ArchiveRecord.objects``) is read by ``ObjectsReader``, one
``RangedReader`` after the other (``open_objects`` picks).

``coordinator.codecs.open_plaintext`` stacks age decryption and decompression on such a reader, so
that restore sees one plaintext tar stream per archive.

Retries: the backends retry each request a few times (``--storage-max-attempts``), which rides
out a blip but not an outage of a few seconds. A backup survives one, because its uploads are
retried again with backoff; so does a restore: a range whose read fails with a
``TransientStorageError`` (``StorageUnreachable`` included), when opened or mid-body, is read
again from the first byte it lacks, with backoff (0.5 s doubling to 10 s) until
``retry_budget_s`` (60 s) after its first failure (bytes received since start the budget
again), then the last error is raised. Only the ranged reads retry this way: the small reads
before them (``manifest.json``, ``backup_manifest``) come first, and a store that fails those
is down or wrong from the start, which is better said at once.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from coordinator.wait import wait_until
from storage.base import Storage
from storage.errors import (
    DecryptionFailed,
    IntegrityError,
    ObjectNotFound,
    TransientStorageError,
)
from storage.manifest import StoredObject

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# DESIGN.md §6: moto reads the whole object for every ranged GET, and real S3 charges per request.
MIN_RANGE_BYTES = 64 * MiB
# What a range buffers ahead of the reader: with --parallel 4, 32 MiB in all (the restore's peak
# RSS is ~60 MB of interpreter and boto3 besides). A range no larger is fetched whole at once.
BUFFER_BYTES = 8 * MiB
# Read size of a range's body: large enough that the per-read cost (a Python call, a lock) is
# small against the copy, small enough that glibc serves it from its heap.
CHUNK_BYTES = 1 * MiB
RETRY_BUDGET_S = 60.0
_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 10.0


def _read_all(read: Callable[[int], bytes]) -> bytes:
    """Everything ``read`` still returns, asked in ``CHUNK_BYTES`` (io's default asks 8 KiB)."""
    chunks = []
    while chunk := read(CHUNK_BYTES):
        chunks.append(chunk)
    return b"".join(chunks)


def range_size_for(part_size_bytes: int) -> int:
    """The range size restore uses: the larger of the upload's part size and 64 MiB."""
    return max(part_size_bytes, MIN_RANGE_BYTES)


class RangedReader(io.RawIOBase):
    """A readable, non-seekable file over ``key``, which must be exactly ``size`` bytes.

    ``sha256`` (hex), when given, is checked at end of file: a mismatch raises
    ``IntegrityError`` from the read that would have returned EOF. ``backup`` names the backup
    in messages. ``on_bytes`` is called with the size of each chunk as it is consumed.
    ``buffer_bytes``: what each range in flight may hold ahead of the reader.
    """

    def __init__(
        self,
        storage: Storage,
        key: str,
        size: int,
        *,
        range_bytes: int,
        parallel: int,
        sha256: str | None = None,
        backup: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
        retry_budget_s: float = RETRY_BUDGET_S,
        buffer_bytes: int = BUFFER_BYTES,
    ) -> None:
        super().__init__()
        if range_bytes <= 0 or parallel <= 0 or size < 0 or buffer_bytes <= 0:
            raise ValueError(f"invalid ranged read size={size} range={range_bytes} x{parallel}")
        self._storage = storage
        self._key = key
        self._size = size
        self._range_bytes = range_bytes
        self._parallel = parallel
        self._buffer_bytes = buffer_bytes
        self._expected_sha256 = sha256
        self._backup = backup
        self._on_bytes = on_bytes
        self._retry_budget_s = retry_budget_s
        self._closing = threading.Event()  # stops streams and wakes retries waiting out a backoff
        self._digest = hashlib.sha256()
        self._received = 0
        self._next_offset = 0  # start of the next range to submit
        self._pending: collections.deque[_Range] = collections.deque()
        self._buffer = memoryview(b"")
        self._verified = False
        self._submitted_any = False
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="ranged-get")
        self._fill_window()

    @property
    def bytes_read(self) -> int:
        """Bytes of the object received so far, in order (handed out, buffered for the reader,
        or in a range that failed its check): what a reader that stopped at an error read."""
        return self._received

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        # Overridden so that a read costs one copy out of the chunk, not two.
        self._check_open()
        if size is None or size < 0:
            return self.readall()
        if not self._ensure_buffer():
            return b""
        n = min(size, len(self._buffer))
        out = bytes(self._buffer[:n])
        self._buffer = self._buffer[n:]
        return out

    def readall(self) -> bytes:
        return _read_all(self.read)

    def readinto(self, target: Any) -> int:
        self._check_open()
        if not self._ensure_buffer():
            return 0
        view = memoryview(target).cast("B")
        n = min(len(view), len(self._buffer))
        view[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def drain(self) -> None:
        """Read to the end (verifying the checksum) and discard what is left."""
        while self._ensure_buffer():
            self._buffer = memoryview(b"")

    def close(self) -> None:
        """Stop the streams and drop buffered bytes; does not wait for running reads."""
        if not self.closed:
            self._closing.set()
            for pending in self._pending:
                pending.stop()
            self._pending.clear()
            self._buffer = memoryview(b"")
            self._pool.shutdown(wait=False, cancel_futures=True)
        super().close()

    # --- internals -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed RangedReader")

    def _fill_window(self) -> None:
        # An empty object still gets one GET, so that a missing object is noticed.
        while len(self._pending) < self._parallel and (
            self._next_offset < self._size or not self._submitted_any
        ):
            self._submitted_any = True
            pending = _Range(
                self._next_offset, min(self._range_bytes, self._size - self._next_offset)
            )
            self._pool.submit(self._stream, pending)
            self._pending.append(pending)
            self._next_offset += pending.length

    def _stream(self, pending: _Range) -> None:
        """The thread of one range: its bytes into its buffer, then ``done`` (or ``error``)."""
        try:
            if pending.length == 0:
                self._storage.get_range(self._key, pending.start, 0)  # missing: ObjectNotFound
            else:
                self._stream_retrying(pending)
        except BaseException as exc:  # handed to the reader's thread
            pending.finish(exc)
        else:
            pending.finish(None)

    def _stream_retrying(self, pending: _Range) -> None:
        """Stream the range, opened again at its first missing byte after transient failures
        (see the module docstring); bytes received after a failure start a new budget."""
        errors: list[TransientStorageError] = []
        if self._attempt(pending, 0.0, errors) == [True]:
            return
        while errors:
            log.warning("reading '%s' at offset %d failed (%s): retrying for up to %.0f s",
                        self._key, pending.start + pending.received, errors[-1],
                        self._retry_budget_s)  # fmt: skip
            since = time.monotonic()
            attempt = functools.partial(self._attempt, pending, since, errors)
            # Paused first: the read has just failed. Until the budget is spent or close().
            outcome = wait_until(attempt, timeout_s=self._retry_budget_s, first_s=_FIRST_BACKOFF_S,
                                 max_s=_MAX_BACKOFF_S, factor=2.0, pause_first=True,
                                 interrupt=self._closing)  # fmt: skip
            if outcome is None:
                if not self._closing.is_set():
                    raise errors[-1]
                return
            if outcome[0]:
                return

    def _attempt(
        self, pending: _Range, since: float, errors: list[TransientStorageError]
    ) -> list[bool]:
        """[True] when the range is read; [False] when it broke off after receiving bytes
        (a new failure); [] when it failed again without any (wait and retry)."""
        try:
            self._stream_once(pending)
        except TransientStorageError as exc:
            errors.append(exc)
            return [False] if pending.progressed_since(since) else []
        return [True]

    def _stream_once(self, pending: _Range) -> None:
        offset = pending.start + pending.received
        stream = self._storage.open_range_stream(
            self._key, offset, pending.length - pending.received
        )
        with contextlib.closing(stream):
            if stream.object_size is not None and stream.object_size > self._size:
                # Longer than recorded: what follows the recorded bytes would never be read,
                # and a copy of the objects made by hand would carry it into the stream.
                raise IntegrityError(f"object '{self._key}' is {stream.object_size} bytes, "
                                     f"manifest.json records {self._size}")  # fmt: skip
            while pending.received < pending.length and not self._closing.is_set():
                chunk = stream.read(min(CHUNK_BYTES, pending.length - pending.received))
                if not chunk:
                    return  # the object ends early: the reader says so
                pending.put(chunk, self._buffer_bytes)

    def _ensure_buffer(self) -> bool:
        """Make the buffer non-empty; False at end of the object (after verifying it)."""
        while not self._buffer:
            if not self._pending:
                self._verify_whole()
                return False
            pending = self._pending[0]
            chunk = pending.take()
            if chunk is None:  # the range is over
                self._pending.popleft()
                self._end_of_range(pending)
                self._fill_window()
                continue
            self._received += len(chunk)
            self._digest.update(chunk)
            self._buffer = memoryview(chunk)
            if self._on_bytes is not None:
                self._on_bytes(len(chunk))
        return True

    def _end_of_range(self, pending: _Range) -> None:
        if isinstance(pending.error, ObjectNotFound):
            owner = f"backup '{self._backup}'" if self._backup else "the backup"
            raise IntegrityError(f"{owner} is missing object '{self._key}'") from pending.error
        if pending.error is not None:
            raise pending.error
        if pending.received != pending.length:
            # Every range before this one came back whole: the object ends here.
            raise IntegrityError(
                f"object '{self._key}' is shorter than the backup manifest says: it ends "
                f"after {pending.start + pending.received} of {self._size} bytes"
            )

    def _verify_whole(self) -> None:
        if self._verified or self._expected_sha256 is None:
            return
        actual = self._digest.hexdigest()
        if actual != self._expected_sha256.lower():
            raise IntegrityError(
                f"object '{self._key}' does not match its recorded sha256 "
                f"(expected {self._expected_sha256}, got {actual})"
            )
        self._verified = True


@dataclass
class _Range:
    """One range in flight: chunks its thread received that the reader has not taken yet."""

    start: int
    length: int
    received: int = 0
    error: BaseException | None = None
    done: bool = False
    stopped: bool = False
    last_progress: float = 0.0
    chunks: collections.deque[bytes] = field(default_factory=collections.deque)
    buffered: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)

    def put(self, chunk: bytes, limit: int) -> None:
        """Add a chunk, first waiting while ``limit`` bytes are buffered (the reader is behind)."""
        with self.changed:
            while self.buffered >= limit and not self.stopped:
                self.changed.wait()
            self.chunks.append(chunk)
            self.buffered += len(chunk)
            self.received += len(chunk)
            self.last_progress = time.monotonic()
            self.changed.notify_all()

    def take(self) -> bytes | None:
        """The next chunk, waiting for it; None once the range's thread finished and every
        chunk was taken."""
        with self.changed:
            while not self.chunks and not self.done:
                self.changed.wait()
            if not self.chunks:
                return None
            chunk = self.chunks.popleft()
            self.buffered -= len(chunk)
            self.changed.notify_all()
            return chunk

    def finish(self, error: BaseException | None) -> None:
        with self.changed:
            self.error = error
            self.done = True
            self.changed.notify_all()

    def stop(self) -> None:
        """Unblock the range's thread for good (the reader is closing)."""
        with self.changed:
            self.stopped = True
            self.chunks.clear()
            self.buffered = 0
            self.changed.notify_all()

    def progressed_since(self, when: float) -> bool:
        with self.changed:
            return self.last_progress > when


class ObjectsReader(io.RawIOBase):
    """A readable, non-seekable file over the concatenation of ``objects`` (an archive stored as
    several: ``storage.manifest.ArchiveRecord.stored_objects``), each read by a ``RangedReader``
    that checks its size and SHA-256 at its own end. The next object's reads start when the
    previous one's end is checked (one request's wait per object of up to 10,000 parts).
    Keyword arguments go to every ``RangedReader``; ``bytes_read`` counts across objects.
    """

    def __init__(
        self, storage: Storage, objects: Sequence[StoredObject], **reader_args: Any
    ) -> None:
        super().__init__()
        if not objects:
            raise ValueError("no objects to read")
        self._storage = storage
        self._objects = collections.deque(objects)
        self._reader_args = reader_args
        self._done_bytes = 0  # of the objects already read to their end
        self._current_key = objects[0].key
        self._current = self._open_next()

    @property
    def current_key(self) -> str:
        """The object being read."""
        return self._current_key

    @property
    def bytes_read(self) -> int:
        """Bytes received so far, of every object (``RangedReader.bytes_read``)."""
        return self._done_bytes + self._current.bytes_read

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if size == 0:
            return b""
        while not (data := self._current.read(size)) and self._advance():
            pass
        return data

    def readall(self) -> bytes:
        return _read_all(self.read)

    def readinto(self, target: Any) -> int:
        if not memoryview(target).nbytes:
            return 0
        while not (n := self._current.readinto(target)) and self._advance():
            pass
        return n

    def drain(self) -> None:
        """Read every object to its end (each checksum verified) and discard what is left."""
        self._current.drain()
        while self._advance():
            self._current.drain()

    def close(self) -> None:
        if not self.closed:
            self._current.close()
        super().close()

    def _open_next(self) -> RangedReader:
        stored = self._objects.popleft()
        self._current_key = stored.key
        return RangedReader(
            self._storage, stored.key, stored.size, sha256=stored.sha256, **self._reader_args
        )

    def _advance(self) -> bool:
        """At the current object's checked end: on to the next one; False after the last."""
        if not self._objects:
            return False
        self._done_bytes += self._current.bytes_read
        self._current.close()
        self._current = self._open_next()
        return True


@contextlib.contextmanager
def naming_the_object(reader: io.RawIOBase) -> Iterator[None]:
    """Say which object ``reader`` (an ``ObjectsReader``) was reading when what is stacked on it
    (age, decompression, the tar walk) found the archive damaged: its messages name the archive
    only. The damage may lie just before that object, in a chunk that straddles the two."""
    try:
        yield
    except (IntegrityError, DecryptionFailed) as exc:
        if isinstance(reader, ObjectsReader) and reader.current_key not in str(exc):
            raise type(exc)(f"{exc} (found reading its object '{reader.current_key}')") from exc
        raise


def open_objects(
    storage: Storage, objects: Sequence[StoredObject], **reader_args: Any
) -> RangedReader | ObjectsReader:
    """A reader of ``objects`` in order: a ``RangedReader`` for one, else an ``ObjectsReader``;
    ``reader_args`` as ``RangedReader`` takes them (``range_bytes``, ``parallel``...)."""
    if len(objects) == 1:
        (stored,) = objects
        return RangedReader(
            storage, stored.key, stored.size, sha256=stored.sha256, **reader_args
        )
    return ObjectsReader(storage, objects, **reader_args)
