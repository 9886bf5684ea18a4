"""A thread that creates and writes restored files, in order, behind the tar walk.

Restore spends about as long in ``write(2)`` (copying into the page cache) as in decompressing
and parsing the tar: on one thread they add up; with the writes on a thread of their own (the
system call releases the GIL, and so does zstd) they overlap on two cores. ``WriteBehind`` runs
what it is given strictly in submission order, so whatever depends on a file existing (a hard
link to it) is submitted after it, and ``flush`` waits for all of it.

Write-back: every ``WRITEBACK_BYTES`` of a file, and at its close, the thread asks the kernel
to start writing what it just wrote to disk (``storage.kernelsync.start_writeback``), so that
the disk works while the archive is still decompressed, not all at the final sync.

Memory: at most ``max_jobs`` jobs wait, each holding at most one chunk of the tar walk
(``extract.CHUNK_BYTES``): 16 MiB with the defaults.

Errors: the first exception of a job is kept and raised in the caller's thread by the next
call (``open``, ``write``, ``finish``, ``call``) or by ``flush``; later jobs are skipped, and the
file the thread has open is closed at once. ``abandon`` (the caller failed) skips what is still
queued and waits for the thread: nothing is written after it returns, so the caller's clean-up
sees every file the restore made.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from storage.fsutil import naming, write_all
from storage.kernelsync import start_writeback

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_STOP = ("stop", None)
# Large enough that the disk gets whole extents to write, small enough to start early.
WRITEBACK_BYTES = 8 * 1024 * 1024


class WriteBehind:
    """Creates, writes and closes files (and runs other file-system calls) on one thread,
    in submission order. Use as a context manager (``flush`` on success, ``abandon`` on error).
    """

    def __init__(self, *, max_jobs: int = 32) -> None:
        self._jobs: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max_jobs)
        self._error: BaseException | None = None
        self._discard = False
        self._fd: int | None = None
        self._path: Path | None = None
        self._written = 0  # bytes written to the open file
        self._started = 0  # of which write-back was started for the first this many
        self._thread = threading.Thread(target=self._run, name="restore-writer", daemon=True)
        self._thread.start()

    def open(self, path: Path, mode: int, exists: Callable[[], NoReturn]) -> None:
        """Create ``path`` (a new file, never followed if it is a link) with exactly ``mode``;
        ``exists()`` raises the error for a name that is taken."""
        self._put("open", (path, mode, exists))

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` to the file opened last; an ``OSError`` names that file."""
        self._put("write", data)

    def finish(self) -> None:
        """Close the file opened last."""
        self._put("close", None)

    def call(self, function: Callable[[], object]) -> None:
        """Run ``function`` after everything submitted before it."""
        self._put("call", function)

    def flush(self) -> None:
        """Wait until everything submitted so far has run; raises the first job error."""
        done = threading.Event()
        self._jobs.put(("mark", done))
        done.wait()  # marks are honoured even after a failure
        self._raise_failure()

    def abandon(self) -> None:
        """Skip what is still queued, close the open file and stop the thread."""
        self._discard = True
        self._stop()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:
            self.abandon()
            return
        try:
            self.flush()
        finally:
            self._stop()

    # --- internals ------------------------------------------------------------------------------

    def _put(self, kind: str, payload: Any) -> None:
        self._raise_failure()
        self._jobs.put((kind, payload))

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join()

    def _run(self) -> None:
        while True:
            kind, payload = self._jobs.get()
            if kind == "stop":
                self._close_quietly()
                return
            if kind == "mark":
                payload.set()
            elif self._error is None and not self._discard:
                try:
                    self._do(kind, payload)
                except BaseException as exc:  # raised again in the caller's thread
                    self._error = exc
                    self._close_quietly()
            else:
                self._close_quietly()

    def _do(self, kind: str, payload: Any) -> None:
        if kind == "write":
            assert self._fd is not None and self._path is not None
            with naming(self._path):
                write_all(self._fd, payload)
                self._written += len(payload)
                if self._written - self._started >= WRITEBACK_BYTES:
                    start_writeback(self._fd, self._started, self._written - self._started)
                    self._started = self._written
        elif kind == "open":
            path, mode, exists = payload
            try:
                fd = os.open(path, _FLAGS, mode)
            except FileExistsError:
                exists()
            self._fd, self._path = fd, path
            self._written = self._started = 0
            with naming(path):
                os.fchmod(fd, mode)  # open() applied the umask to it
        elif kind == "close":
            self._close()
        else:
            payload()

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                if self._written > self._started and self._error is None:
                    assert self._path is not None
                    with naming(self._path):
                        start_writeback(fd, self._started, 0)
            finally:
                os.close(fd)

    def _close_quietly(self) -> None:
        """Close the open file after a failure or when stopping, keeping a close error only if
        it is the first: the thread must live on, as ``flush`` and ``_stop`` wait for it (a
        close can fail after a failed write, e.g. on NFS, which reports write-back errors there).
        """
        try:
            self._close()
        except OSError as exc:
            if self._error is None:
                self._error = exc
