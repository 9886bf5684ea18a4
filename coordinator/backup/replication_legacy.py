"""BASE_BACKUP as PostgreSQL 13 and 14 speak it: the legacy option syntax and framing.

After the start-LSN and tablespace-list result sets, the server sends one CopyOut per row of the
tablespace list, in that order (user tablespaces first, the base directory last), each a raw tar
without the two 512-byte zero blocks that end a tar archive, then one CopyOut holding the
backup_manifest. There are no typed messages: every CopyData is archive bytes, and no server
progress reports, so progress here counts the tar bytes received.

Only ``replication`` uses this module; it passes its ``BackupStream`` in, which this module
knows only by the protocols below (so that it does not import ``replication`` back).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from psycopg import pq


class BaseBackupRequest(Protocol):
    @property
    def label(self) -> str: ...
    @property
    def fast_checkpoint(self) -> bool: ...
    @property
    def max_rate_kbps(self) -> int | None: ...


class Tablespace(Protocol):
    @property
    def oid(self) -> int | None: ...
    @property
    def location(self) -> str | None: ...


class Sink(Protocol):
    def write(self, data: memoryview) -> None: ...
    def manifest(self, data: bytes) -> None: ...


class BackupStream(Protocol):
    """What ``replication.BackupStream`` offers the legacy framing."""

    done_bytes: int

    @property
    def pgconn(self) -> pq.abc.PGconn: ...
    @property
    def sink(self) -> Sink: ...
    @property
    def tablespaces(self) -> Sequence[Tablespace]: ...
    def begin_archive(self, server_name: str, location: str | None) -> None: ...
    def end_archive(self) -> None: ...
    def report_progress(self, done_bytes: int) -> None: ...
    def wait_for_input(self) -> None:
        """Wait for the server without holding the GIL (``replication.wait_for_input``)."""
        ...

# pg_basebackup appends the same: without it `tar` warns and a concatenation would misread.
TAR_END_OF_ARCHIVE = memoryview(bytes(1024))
# The legacy framing has no progress messages: report every this many bytes.
PROGRESS_STEP_BYTES = 64 * 1024 * 1024


def command(options: BaseBackupRequest) -> bytes:
    """BASE_BACKUP in the legacy syntax; the options mean what they do in the new one.

    No compression: these servers cannot compress; the caller does it client-side.
    """
    label = "'" + options.label.replace("'", "''") + "'"
    parts = [f"BASE_BACKUP LABEL {label}", "PROGRESS"]
    if options.fast_checkpoint:
        parts.append("FAST")
    parts += ["WAL", "NOWAIT", "MANIFEST 'yes'", "TABLESPACE_MAP"]
    if options.max_rate_kbps is not None:
        parts.append(f"MAX_RATE {options.max_rate_kbps}")
    return " ".join(parts).encode()


def read_copy(stream: BackupStream, index: int) -> None:
    """Read the ``index``-th CopyOut: a tablespace's archive, or the manifest after the last."""
    if index < len(stream.tablespaces):
        tablespace = stream.tablespaces[index]
        name = "base" if tablespace.oid is None else str(tablespace.oid)
        stream.begin_archive(f"{name}.tar", tablespace.location)
        _read_archive(stream)
        stream.end_archive()
    else:
        stream.sink.manifest(_read_all(stream))


def _read_archive(stream: BackupStream) -> None:
    """The hot loop: each CopyData straight to the sink, progress every PROGRESS_STEP_BYTES."""
    get_copy_data = stream.pgconn.get_copy_data
    write = stream.sink.write
    done = stream.done_bytes
    next_report = done + PROGRESS_STEP_BYTES
    while True:
        nbytes, data = get_copy_data(1)  # 0: nothing buffered; -1 at the end; -2 raises
        if nbytes <= 0:
            if nbytes == 0:
                stream.wait_for_input()
                continue
            break
        write(data)
        done += nbytes
        if done >= next_report:
            stream.report_progress(done)
            next_report = done + PROGRESS_STEP_BYTES
    write(TAR_END_OF_ARCHIVE)
    stream.report_progress(done)


def _read_all(stream: BackupStream) -> bytes:
    manifest = bytearray()
    while True:
        nbytes, data = stream.pgconn.get_copy_data(1)
        if nbytes == 0:
            stream.wait_for_input()
            continue
        if nbytes < 0:
            return bytes(manifest)
        manifest += data
