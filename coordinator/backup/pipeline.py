"""The stream pipeline of one archive: compress, encrypt, cut into parts (DESIGN.md §3).

Push-based, because the replication reader pushes the archive's bytes at us::

    write(bytes) → [client compression] → [age, ONE stream per archive] → PartCutter → PartSink

Client compression runs only when the server did not compress (``client_compression="none"``
passes server-compressed bytes through). Every stored object reads back with the standard tools
(invariant 1): ``zstd -dc``, ``gzip -dc``, ``lz4 -dc``, ``age -d -i key``; an age stream cut
at any offset and concatenated is the same single ``.age`` file.

Threads, per archive: compression runs on the caller's thread (zstd adds its own worker
threads); age encryption on ``StreamEncryptor``'s thread; hashing and every ``put_part`` on the
``archive-parts`` thread (``coordinator.backup.parts``). Errors from any of them surface, unwrapped,
from the next ``write`` or from ``close``, after the writer has stopped its threads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import NoReturn

from coordinator.backup.parts import ObjectSummary, PartCutter, PartSink, PartSizer, PartThread
from coordinator.codecs import stream_compressor
from coordinator.crypto import StreamEncryptor
from storage.layout import Compression
from storage.manifest import PartRecord

__all__ = [
    "ArchiveSummary",
    "ArchiveWriter",
    "ObjectSummary",
    "PartSink",
    "PartSizer",
]

# Levels, checksums and the compressors themselves: coordinator.codecs (the backup levels are
# chosen for throughput there). What is the pipeline's own: zstd worker threads compress while
# the caller's thread goes back to reading the replication stream. On this 2-core machine, 2
# workers took client zstd from ~610 to ~700-1000 MB/s (bench/pipeline.py, which sets this);
# capped because each worker holds its own job buffers and the database server shares the
# host: 4 workers at level 1 outrun any upload link.
ZSTD_THREADS = min(os.cpu_count() or 1, 4)


@dataclass(frozen=True)
class ArchiveSummary:
    """What was stored for one archive; feeds ``ArchiveRecord`` in the manifest."""

    stored_size: int  # bytes after compression/encryption (what is stored)
    input_size: int  # bytes pushed in
    sha256: str  # hex SHA-256 of the stored bytes (the whole stream)
    parts: list[PartRecord]  # number, size, sha256 of each part, numbered across the stream
    objects: list[ObjectSummary]  # the objects the stream is stored in (almost always one)


class ArchiveWriter:
    """Push one archive's bytes in with ``write``; ``close`` returns what was stored.

    ``client_compression`` is "zstd", "gzip", "lz4" or "none" (server-compressed or raw bytes
    pass through; ``ConfigError`` for another name); ``compression_level`` None means the
    registry's backup level (``coordinator.codecs.Codec.backup_level``). With ``recipients``
    (age public keys) the stored bytes are one age stream.

    Use from one thread. ``sink.put_part`` is called on the writer's ``archive-parts`` thread,
    never the caller's. ``write`` may block while the sink applies backpressure. If anything
    fails (the sink, compression, encryption), ``write``/``close`` raise the
    original exception once the writer's threads are stopped; the writer is then unusable.
    Call ``abort`` to give up on an archive that will not be closed (safe at any time, also
    after a failure): it discards buffered data and joins the threads. It cannot interrupt a
    ``put_part`` in progress: a sink that blocks must be released by its owner first. So a
    ``KeyboardInterrupt`` raised in ``write``/``close`` leaves the threads to ``abort``, which
    the owner must call (after releasing its sink); any other failure joins them first.
    """

    def __init__(
        self,
        sink: PartSink,
        sizer: PartSizer,
        *,
        client_compression: Compression | str,
        compression_level: int | None = None,
        recipients: Sequence[str] | None = None,
    ) -> None:
        self._compressor = stream_compressor(
            client_compression, compression_level, threads=ZSTD_THREADS
        )
        self._parts = PartThread(sink, sizer.parts_per_object)
        self._cutter = PartCutter(sizer, self._parts)
        self._encryptor: StreamEncryptor | None = None
        self._stage_error: BaseException | None = None
        self._input_bytes = 0
        self._done = False
        if recipients:
            try:
                self._encryptor = StreamEncryptor(recipients, self._feed_encrypted)
            except BaseException:
                self.abort()
                raise

    def write(self, data: memoryview | bytes) -> None:
        self._check_open()
        try:
            if self._parts.error is not None:  # fail fast, not only when the next part is due
                raise self._parts.error
            self._input_bytes += data.nbytes if isinstance(data, memoryview) else len(data)
            if self._compressor is None:
                self._store(data)
            elif out := self._compressor.compress(data):
                self._store(out)
        except BaseException as exc:
            self._fail(exc)

    def close(self) -> ArchiveSummary:
        """Flush the compressor, finish the age stream, emit the last part, wait for the sink."""
        self._check_open()
        try:
            if self._compressor is not None and (tail := self._compressor.flush()):
                self._store(tail)
            if self._encryptor is not None:
                encryptor, self._encryptor = self._encryptor, None
                encryptor.close()
            self._cutter.finish()
            records, stored_size, sha256, objects = self._parts.close()
        except BaseException as exc:
            self._fail(exc)
        self._done = True
        return ArchiveSummary(stored_size, self._input_bytes, sha256, records, objects)

    def abort(self) -> None:
        """Stop the helper threads and discard buffered data; idempotent."""
        self._done = True
        self._cutter.discard = True
        self._parts.discard = True
        if self._encryptor is not None:
            encryptor, self._encryptor = self._encryptor, None
            with suppress(BaseException):  # the stream is being thrown away
                encryptor.close()
        self._parts.abort()

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Leaving the block without close() (an error, an early return) abandons the archive.
        if not self._done:
            self.abort()

    def _store(self, data: bytes | memoryview) -> None:
        if self._encryptor is not None:
            self._encryptor.write(data)
        else:
            self._cutter.feed(data)

    def _feed_encrypted(self, data: bytes) -> None:
        """The age thread's output; pyrage wraps what this raises, so keep the original."""
        try:
            self._cutter.feed(data)
        except BaseException as exc:
            self._stage_error = exc
            raise

    def _check_open(self) -> None:
        if self._done:
            raise ValueError("archive writer is closed or aborted")

    def _fail(self, exc: BaseException) -> NoReturn:
        # The sink's own exception beats the wrappers it travelled through (EncryptError).
        root = self._parts.error or self._stage_error or exc
        if root is exc and not isinstance(exc, Exception):
            # Ctrl-C or SIGTERM on the caller's thread, which is mostly waiting for room in
            # the part queue while the part thread waits on the sink (for a worker's answer):
            # joining that thread here waited as long as the sink did, which only the owner
            # can cut short (the backup abandons its window, then calls abort). A stopped
            # worker held a backup's Ctrl-C for ten minutes. What still arrives is dropped.
            self._cutter.discard = True
            self._parts.discard = True
            raise exc
        self.abort()
        if root is exc:
            raise exc
        raise root from None
