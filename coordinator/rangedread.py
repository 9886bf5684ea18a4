"""Parallel ranged reads of one stored object, consumed as an ordinary file (DESIGN.md §6).

``RangedReader`` cuts the object into consecutive ranges of ``range_bytes``, keeps at most
``parallel`` ``get_range`` calls in flight on a thread pool and hands the bytes out strictly in
order, so memory stays under ``range_bytes * (parallel + 1)`` whatever the object's size. It also
checks the object against what ``manifest.json`` says about it: every range must come back whole
(a short range means the object is shorter than recorded) and, at end of file, the SHA-256 of the
whole object must match, before the caller sees EOF and could believe the data complete.

``coordinator.codecs.open_plaintext`` stacks age decryption and decompression on such a reader, so
that restore sees one plaintext tar stream per archive.

Retries: the backends retry each request a few times (``--storage-max-attempts``), which rides
out a blip but not an outage of a few seconds. A backup survives one, because its uploads are
retried again with backoff; so does a restore: a range whose read fails with a
``TransientStorageError`` (``StorageUnreachable`` included) is read again with backoff
(0.5 s doubling to 10 s) until ``retry_budget_s`` (60 s) after its first failure, then the last
error is raised. Only the ranged reads retry this way: the small reads before them
(``manifest.json``, ``backup_manifest``) come first, and a store that fails those is down or
wrong from the start, which is better said at once.
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from coordinator.wait import wait_until
from storage.base import Storage
from storage.errors import IntegrityError, ObjectNotFound, TransientStorageError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# DESIGN.md §6: moto reads the whole object for every ranged GET, and real S3 charges per request.
MIN_RANGE_BYTES = 64 * MiB
RETRY_BUDGET_S = 60.0
_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 10.0


def range_size_for(part_size_bytes: int) -> int:
    """The range size restore uses: the larger of the upload's part size and 64 MiB."""
    return max(part_size_bytes, MIN_RANGE_BYTES)


class RangedReader(io.RawIOBase):
    """A readable, non-seekable file over ``key``, which must be exactly ``size`` bytes.

    ``sha256`` (hex), when given, is checked at end of file: a mismatch raises
    ``IntegrityError`` from the read that would have returned EOF. ``backup`` names the backup
    in messages. ``on_bytes`` is called with the size of each range as it is consumed.
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
    ) -> None:
        super().__init__()
        if range_bytes <= 0 or parallel <= 0 or size < 0:
            raise ValueError(f"invalid ranged read size={size} range={range_bytes} x{parallel}")
        self._storage = storage
        self._key = key
        self._size = size
        self._range_bytes = range_bytes
        self._parallel = parallel
        self._expected_sha256 = sha256
        self._backup = backup
        self._on_bytes = on_bytes
        self._retry_budget_s = retry_budget_s
        self._closing = threading.Event()  # wakes retries waiting out a backoff
        self._digest = hashlib.sha256()
        self._received = 0
        self._next_offset = 0  # start of the next range to submit
        self._pending: collections.deque[tuple[int, int, Future[bytes]]] = collections.deque()
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
        # Overridden so that a read costs one copy out of the range buffer, not two.
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
        chunks = []
        while chunk := self.read(self._range_bytes):
            chunks.append(chunk)
        return b"".join(chunks)

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
        while self.read(self._range_bytes):
            pass

    def close(self) -> None:
        """Cancel ranges not started yet and drop buffered bytes; does not wait for running GETs."""
        if not self.closed:
            self._closing.set()
            for _, _, future in self._pending:
                future.cancel()
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
            length = min(self._range_bytes, self._size - self._next_offset)
            start = self._next_offset
            future = self._pool.submit(self._get_range, start, length)
            self._pending.append((start, length, future))
            self._next_offset += length

    def _get_range(self, start: int, length: int) -> bytes:
        """One range, read again after transient failures (see the module docstring)."""
        try:
            return self._storage.get_range(self._key, start, length)
        except TransientStorageError as exc:
            error = exc
        log.warning("reading '%s' at offset %d failed (%s): retrying for up to %.0f s",
                    self._key, start, error, self._retry_budget_s)  # fmt: skip

        def read() -> list[bytes]:  # a list: an empty range is an answer too
            nonlocal error
            try:
                return [self._storage.get_range(self._key, start, length)]
            except TransientStorageError as exc:
                error = exc
                return []

        # Paused first: the read has just failed. Until the budget is spent or close() is called.
        data = wait_until(read, timeout_s=self._retry_budget_s, first_s=_FIRST_BACKOFF_S,
                          max_s=_MAX_BACKOFF_S, factor=2.0, pause_first=True,
                          interrupt=self._closing)  # fmt: skip
        if data is None:
            raise error
        return data[0]

    def _ensure_buffer(self) -> bool:
        """Make the buffer non-empty; False at end of the object (after verifying it)."""
        while not self._buffer:
            if not self._pending:
                self._verify_whole()
                return False
            start, length, future = self._pending.popleft()
            data = self._result(start, future)
            self._received += len(data)
            if len(data) != length:
                # Every range before this one came back whole: the object ends here.
                raise IntegrityError(
                    f"object '{self._key}' is shorter than the backup manifest says: it ends "
                    f"after {start + len(data)} of {self._size} bytes"
                )
            self._digest.update(data)
            self._buffer = memoryview(data)
            self._fill_window()
            if self._on_bytes is not None:
                self._on_bytes(length)
        return True

    def _result(self, start: int, future: Future[bytes]) -> bytes:
        try:
            return future.result()
        except ObjectNotFound as exc:
            owner = f"backup '{self._backup}'" if self._backup else "the backup"
            raise IntegrityError(f"{owner} is missing object '{self._key}'") from exc

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
