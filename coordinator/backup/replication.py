"""The PostgreSQL replication protocol: the only module that speaks it.

Owns a physical replication connection (``ReplicationConnection``): IDENTIFY_SYSTEM, and
BASE_BACKUP read as a stream of archive events handed to a ``BackupSink``. Both wire framings are
reduced to the same events (begin_archive, write..., end_archive per archive, then manifest):

- PG 15+ (read here): new option syntax; start-LSN result set, tablespace list, then ONE CopyOut
  of typed messages (``n`` new archive, ``d`` data, ``p`` progress, ``m`` manifest follows: the
  ``d`` messages after it are the manifest), then the end-LSN result set.
- PG 13/14 (``replication_legacy``): legacy syntax, same result sets around one CopyOut of raw
  tar per tablespace and one CopyOut holding the manifest.

Archive order, observed on 13 to 18 and the same in both framings: the server lists the user
tablespaces first and the base directory (PGDATA, with the WAL appended at its end) last, and
streams the archives in that order; the manifest comes after base.

psycopg exceptions are translated here, once: ``DatabaseUnreachable`` when we cannot connect,
authenticate or get a walsender slot, ``DatabaseError`` when a command fails or the stream is cut.
Data messages go to the sink as memoryviews over libpq's buffer: never copied, never accumulated,
except the backup_manifest.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import select
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import NoReturn, Protocol

import psycopg
from psycopg import pq
from psycopg.conninfo import make_conninfo

from coordinator import pgconn
from coordinator.backup import inplace, replication_legacy
from coordinator.codecs import DEFAULT_COMPRESSION, codec
from storage.errors import ConfigError, DatabaseError, DatabaseUnreachable
from storage.layout import COMPRESSIONS, Compression, compression_of_suffix
from storage.walnames import format_lsn, parse_lsn, segment_name

log = logging.getLogger(__name__)

# Compressions, their levels (what we accept, what we ask for by default, zstd's workers) and
# why: coordinator.codecs; the archive names the server gives (base.tar.zst ...): storage.layout.
MAX_RATE_RANGE_KBPS = range(32, 1048577)  # the server's own limits for MAX_RATE
MAX_LABEL_BYTES = 1023  # MAXPGPATH - 1
OLDEST_SERVER = 130000  # backup manifests start with 13
NEW_FRAMING = 150000
# The server rejects a compression specification (unknown algorithm, not built in, bad detail)
# with syntax_error; zstd rejecting a worker count while setting up reports internal_error.
SQLSTATE_SYNTAX_ERROR = "42601"
SQLSTATE_INTERNAL_ERROR = "XX000"


@dataclass(frozen=True)
class SystemInfo:
    system_identifier: str
    timeline: int
    xlogpos: str
    server_version_num: int
    server_version: str
    wal_segment_size: int


@dataclass(frozen=True)
class ArchiveInfo:
    """One archive of a base backup; ``compression`` is what its bytes are as streamed."""

    name: str  # "base" for PGDATA, else the tablespace oid
    tablespace_oid: int | None
    location: str | None
    size_estimate_bytes: int | None
    compression: str


class BackupSink(Protocol):
    """Receives a base backup. Archives arrive one after the other, never interleaved.

    The archives are complete only once ``base_backup`` returns: a failure after some
    ``end_archive`` calls still means the whole backup is void. ``progress`` counts archive
    bytes before compression against the server's estimate of the data directories, which
    leaves out the WAL added to base.tar: ``done_bytes`` may pass ``total_bytes``.
    """

    def begin_archive(self, archive: ArchiveInfo) -> None: ...
    def write(self, data: memoryview) -> None: ...  # must not keep ``data`` after returning
    def end_archive(self) -> None: ...
    def manifest(self, data: bytes) -> None: ...
    def progress(self, done_bytes: int, total_bytes: int | None) -> None: ...


@dataclass(frozen=True)
class BaseBackupOptions:
    """``server_compression`` is what to ask for; the server may refuse (see ``base_backup``)."""

    label: str
    server_compression: str = DEFAULT_COMPRESSION
    compression_level: int | None = None
    fast_checkpoint: bool = True
    max_rate_kbps: int | None = None
    # PG 13-15: refuse when the server cannot be asked for in-place tablespaces (False: warn).
    require_tablespace_check: bool = True

    def __post_init__(self) -> None:
        if self.server_compression not in COMPRESSIONS:
            raise ConfigError(f"unknown compression '{self.server_compression}'")
        levels = codec(self.server_compression).levels
        if self.compression_level is not None and (
            levels is None or self.compression_level not in levels
        ):
            raise ConfigError(
                f"compression level {self.compression_level} is not valid for "
                f"'{self.server_compression}'"
            )
        if self.max_rate_kbps is not None and self.max_rate_kbps not in MAX_RATE_RANGE_KBPS:
            raise ConfigError(f"max rate must be 32 to 1048576 kB/s, not {self.max_rate_kbps}")
        if len(self.label.encode()) > MAX_LABEL_BYTES or "\0" in self.label:
            raise ConfigError("backup label is too long or holds a NUL byte")

    def compression_detail(self, workers: bool) -> str | None:
        """COMPRESSION_DETAIL for the requested algorithm ("level=1", with ``workers`` and an
        algorithm that has server workers "level=1,workers=2"), None for "none". The level is
        ``compression_level`` or the registry's server level (``Codec.server_level``)."""
        entry = codec(self.server_compression)
        level = self.compression_level or entry.server_level
        if level is None:
            return None
        detail = f"level={level}"
        if workers and entry.server_workers is not None:
            return f"{detail},workers={entry.server_workers}"
        return detail


@dataclass(frozen=True)
class BaseBackupResult:
    start_lsn: str
    start_timeline: int
    end_lsn: str
    end_timeline: int
    server_compression: str
    archives: list[ArchiveInfo]


# --- LSNs and WAL file names ---------------------------------------------------------------------
# The arithmetic is storage.walnames'; these are the names the server's replies are read with here
# (and that tests/coordinator/test_replication.py imports).

lsn_to_int = parse_lsn
int_to_lsn = format_lsn


def wal_file_name(timeline: int, lsn: str, wal_segment_size: int) -> str:
    """Name of the WAL segment of ``timeline`` holding the byte at ``lsn`` (LSN text such as
    the server returns, ``"0/3000060"``) for ``wal_segment_size``-byte segments (PostgreSQL's
    XLByteToSeg and XLogFileName: ``storage.walnames.segment_name``). ``ConfigError`` for a
    malformed LSN or an invalid segment size."""
    return segment_name(timeline, parse_lsn(lsn), wal_segment_size)


# --- errors ------------------------------------------------------------------------------------

class _CompressionRefused(Exception):
    """The server rejected the compression we asked for, before doing any work."""


# --- the connection ------------------------------------------------------------------------------


class ReplicationConnection:
    """A physical replication connection (``replication=true``), in autocommit."""

    def __init__(
        self,
        conn: psycopg.Connection[tuple[object, ...]],
        target: str,
        params: dict[str, str] | None = None,
    ) -> None:
        self._conn = conn
        self._target = target  # "host:port" for messages
        self._params = params  # how we connected: the in-place tablespace check reuses it
        conn.add_notice_handler(self._log_notice)

    @classmethod
    def connect(cls, dsn: str) -> ReplicationConnection:
        """Connect with a URL or key=value conninfo; physical replication is forced on."""
        params = _parse_dsn(dsn)
        target = pgconn.describe_target(params)
        try:
            conn = psycopg.connect(make_conninfo("", **params), autocommit=True)
        except psycopg.Error as exc:
            reason = pgconn.redact(pgconn.connect_reason(str(exc)), params.get("password"))
            raise DatabaseUnreachable(f"cannot connect to postgres at {target}: {reason}") from exc
        return cls(conn, target, params)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ReplicationConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _log_notice(self, diag: psycopg.errors.Diagnostic) -> None:
        # Checksum failures, for one, reach us as WARNINGs during the stream.
        log.warning("postgres at %s: %s", self._target, diag.message_primary)

    def _pgconn(self) -> pq.abc.PGconn:
        if self._conn.closed:
            raise DatabaseError(f"the replication connection to {self._target} is closed")
        return self._conn.pgconn

    def _exec_row(self, command: bytes) -> list[bytes | None]:
        """First row of a simple-protocol command (the walsender refuses the extended one)."""
        result = self._pgconn().exec_(command)
        if result.status != pq.ExecStatus.TUPLES_OK:
            failure = psycopg.errors.error_from_result(result)
            raise DatabaseError(
                f"'{command.decode()}' failed on {self._target}: {pgconn.message(failure)}"
            ) from failure
        if result.ntuples < 1:
            raise DatabaseError(f"'{command.decode()}' returned no row on {self._target}")
        return [result.get_value(0, column) for column in range(result.nfields)]

    def identify_system(self) -> SystemInfo:
        systemid, timeline, xlogpos = self._exec_row(b"IDENTIFY_SYSTEM")[:3]
        (segment_size,) = self._exec_row(b"SHOW wal_segment_size")
        (version,) = self._exec_row(b"SHOW server_version")
        return SystemInfo(
            system_identifier=_text(systemid),
            timeline=int(_text(timeline)),
            xlogpos=_text(xlogpos),
            server_version_num=self._conn.pgconn.server_version,
            server_version=_text(version).split()[0],  # "15.18 (Debian 15.18-0+deb12u1)"
            wal_segment_size=_parse_size(_text(segment_size)),
        )

    def base_backup(self, options: BaseBackupOptions, sink: BackupSink) -> BaseBackupResult:
        """Stream a base backup with its WAL and manifest into ``sink``.

        On PG 15+ the server compresses as asked if it can. When it refuses the algorithm (a
        build without zstd or lz4), which it does before any work, the command is sent again
        without compression: ``server_compression`` in the result then says "none" and the
        caller compresses. Any exception leaves the connection closed.
        """
        version = self._pgconn().server_version
        if version < OLDEST_SERVER:
            raise DatabaseError(
                f"postgres at {self._target} is version {version // 10000}; cloud-dump needs 13+"
            )
        try:
            if version < inplace.SENT_SINCE:
                self._refuse_in_place_tablespaces(version, options.require_tablespace_check)
            self._hold_wal(version)
            if version < NEW_FRAMING:
                return self._run(replication_legacy.command(options), sink, "none")
            return self._run_with_fallback(options, sink)
        except BaseException:
            self.close()
            raise

    def _hold_wal(self, version: int) -> None:
        """Keep the WAL this backup will include from being removed while it runs.

        BASE_BACKUP with WAL reads the segments from its start to its end out of pg_wal once
        the files are sent; a checkpoint in between (another backup's, a busy server's, or any
        once they are archived) may remove or recycle the first of them, and the backup then
        fails with "requested WAL segment ... has already been removed". A temporary physical
        slot reserving WAL, made on this connection, holds them from now on and goes away with
        the connection (CREATE_REPLICATION_SLOT, "Streaming Replication Protocol" in the
        PostgreSQL docs; pg_basebackup makes one for its WAL stream). Where none can be made
        (max_replication_slots all taken, or 0), the backup goes on without and says so: what
        it risks is that error, nothing worse.
        """
        # Slot names: lowercase letters, digits and underscores, at most 63 bytes.
        name = f"cloud_dump_{os.getpid()}_{secrets.token_hex(4)}"
        reserve = "(RESERVE_WAL)" if version >= NEW_FRAMING else "RESERVE_WAL"
        command = f"CREATE_REPLICATION_SLOT {name} TEMPORARY PHYSICAL {reserve}".encode()
        result = self._pgconn().exec_(command)
        if result.status != pq.ExecStatus.TUPLES_OK:
            failure = psycopg.errors.error_from_result(result)
            log.warning(
                "postgres at %s made no temporary replication slot for this backup (%s): a "
                "checkpoint while it runs may remove WAL it includes; free a slot "
                "(max_replication_slots) or keep WAL with wal_keep_size",
                self._target, pgconn.message(failure),
            )  # fmt: skip

    def _refuse_in_place_tablespaces(self, version: int, required: bool) -> None:
        """PG 13-15 send nothing of an in-place tablespace (``coordinator.backup.inplace``).

        When the server cannot be asked (a role admitted for replication only, a URL naming a
        database that does not exist), the backup is refused unless ``required`` is False
        (``--allow-unchecked-tablespaces``): a backup that completes, verifies and restores
        without a tablespace's data is worse than one that does not start.
        """
        if self._params is None:
            return
        found, reason = inplace.find_in_place_tablespaces(self._params)
        if found is None:
            why = (f"could not check postgres at {self._target} for in-place tablespaces, "
                   f"which postgres {version // 10000} leaves out of a base backup ({reason})")
            if required:
                raise DatabaseError(
                    f"{why}: allow this role an ordinary connection to database "
                    f"'{inplace.ordinary_database(self._params)}' (pg_hba.conf: 'host "
                    "<database> <role> <address> scram-sha-256'), or, if the cluster has none, "
                    "back up with --allow-unchecked-tablespaces"
                )
            log.warning("%s: backing up anyway (--allow-unchecked-tablespaces)", why)
        elif found:
            named = ", ".join(f"'{t.name}' ({t.location})" for t in found)
            raise DatabaseError(
                f"postgres {version // 10000} at {self._target} leaves in-place tablespace "
                f"{named} out of a base backup: the backup would lack its data; move what it "
                "holds to a tablespace with a location (ALTER TABLE/INDEX ... SET TABLESPACE), "
                "or back up with postgres 16 or later"
            )

    def _run_with_fallback(self, options: BaseBackupOptions, sink: BackupSink) -> BaseBackupResult:
        attempts: list[tuple[str, str | None]] = []
        if options.server_compression != "none":
            algorithm = options.server_compression
            if codec(algorithm).server_workers is not None:
                # Asked first (why: coordinator.codecs); a server whose zstd has no threads
                # refuses the worker count, and the next attempt goes without.
                attempts.append((algorithm, options.compression_detail(workers=True)))
            attempts.append((algorithm, options.compression_detail(workers=False)))
        attempts.append(("none", None))
        for algorithm, detail in attempts:
            command = _new_command(options, algorithm, detail)
            try:
                return self._run(command, sink, algorithm)
            except _CompressionRefused as exc:
                log.info(
                    "postgres at %s refused compression %s (%s): %s",
                    self._target, algorithm, detail, exc,
                )  # fmt: skip
        raise AssertionError("the uncompressed attempt never raises _CompressionRefused")

    def _run(self, command: bytes, sink: BackupSink, compression: str) -> BaseBackupResult:
        pgconn = self._conn.pgconn
        stream = BackupStream(pgconn, sink)
        pgconn.send_query(command)
        failure: psycopg.Error | None = None
        try:
            while (result := next_result(pgconn)) is not None:
                if result.status == pq.ExecStatus.TUPLES_OK:
                    stream.add_result_set(result)
                elif result.status == pq.ExecStatus.COPY_OUT:
                    stream.read_copy(legacy=pgconn.server_version < NEW_FRAMING)
                elif result.status != pq.ExecStatus.COMMAND_OK and failure is None:
                    # Keep reading to the end: a retry needs an idle connection.
                    failure = psycopg.errors.error_from_result(result)
        except psycopg.OperationalError as exc:  # get_copy_data returned -2: the link broke
            result = pgconn.get_result()
            failure = exc if result is None else psycopg.errors.error_from_result(result)
        if failure is not None:
            self._raise_failed(failure, stream, compression, command)
        return stream.result(compression)

    def _raise_failed(
        self, failure: psycopg.Error, stream: BackupStream, compression: str, command: bytes
    ) -> NoReturn:
        refusals = {SQLSTATE_SYNTAX_ERROR}
        if b"workers=" in command:
            refusals.add(SQLSTATE_INTERNAL_ERROR)
        if compression != "none" and not stream.started and failure.sqlstate in refusals:
            raise _CompressionRefused(pgconn.message(failure)) from failure
        raise DatabaseError(
            f"base backup on {self._target} failed: {pgconn.message(failure)}"
        ) from failure


def _streamed_compression(suffix: str) -> Compression:
    """What an archive's bytes are as streamed, from what follows the stem of the name the
    server gives it (".tar", ".tar.zst", ".tar.gz", ".tar.lz4"); "none" for anything else."""
    if not suffix.startswith(".tar"):
        return "none"
    return compression_of_suffix(suffix.removeprefix(".tar")) or "none"


def _new_command(options: BaseBackupOptions, compression: str, detail: str | None) -> bytes:
    """BASE_BACKUP in the PG 15+ syntax.

    WAL: the segments needed to make the backup consistent go into base.tar, so a plain
    restore needs no archive; WAIT false because we do not depend on archiving them.
    TABLESPACE_MAP, as pg_basebackup -Ft does: base.tar gets a tablespace_map file (oid and
    location) instead of pg_tblspc symlinks, so restore can remap a tablespace by editing it.
    MANIFEST_CHECKSUMS stays the default CRC32C: cheaper for the server than SHA256.
    """
    parts = [
        f"LABEL {_quote(options.label)}",
        "PROGRESS",
        f"CHECKPOINT '{'fast' if options.fast_checkpoint else 'spread'}'",
        "WAL",
        "WAIT false",
        "MANIFEST 'yes'",
        "TABLESPACE_MAP",
    ]
    if options.max_rate_kbps is not None:
        parts.append(f"MAX_RATE {options.max_rate_kbps}")
    if compression != "none":
        parts.append(f"COMPRESSION {_quote(compression)}")
        if detail is not None:
            parts.append(f"COMPRESSION_DETAIL {_quote(detail)}")
    return f"BASE_BACKUP ( {', '.join(parts)} )".encode()


def _quote(value: str) -> str:
    """A replication-command string literal: quotes doubled, no backslash escapes."""
    return "'" + value.replace("'", "''") + "'"


# --- one BASE_BACKUP run -------------------------------------------------------------------------


@dataclass(frozen=True)
class TablespaceRow:
    oid: int | None  # None for the base directory
    location: str | None
    size_bytes: int | None


@dataclass
class BackupStream:
    """State of one BASE_BACKUP: result sets seen, the open archive, progress, the manifest."""

    pgconn: pq.abc.PGconn
    sink: BackupSink
    result_sets: int = 0
    lsns: list[tuple[str, int]] = field(default_factory=list)
    tablespaces: list[TablespaceRow] = field(default_factory=list)
    archives: list[ArchiveInfo] = field(default_factory=list)
    copies: int = 0
    done_bytes: int = 0
    total_bytes: int | None = None
    started: bool = False
    archive_open: bool = False

    def add_result_set(self, result: pq.abc.PGresult) -> None:
        """Result sets arrive as: start LSN, tablespace list, (the COPY data), end LSN."""
        self.started = True
        self.result_sets += 1
        rows = [
            [_optional_text(result.get_value(row, col)) for col in range(result.nfields)]
            for row in range(result.ntuples)
        ]
        if self.result_sets == 2:
            self.tablespaces = [_tablespace_row(row) for row in rows]
            sizes = [t.size_bytes for t in self.tablespaces]
            self.total_bytes = None if None in sizes else sum(s or 0 for s in sizes)
        else:
            lsn, timeline = rows[0][0], rows[0][1]
            self.lsns.append((lsn or "", int(timeline or 0)))

    def wait_for_input(self) -> None:
        wait_for_input(self.pgconn)

    def read_copy(self, legacy: bool) -> None:
        self.started = True
        if legacy:
            replication_legacy.read_copy(self, self.copies)
        else:
            self._read_typed_copy()
        self.copies += 1

    def _read_typed_copy(self) -> None:
        """The PG 15+ CopyOut. The hot loop: one get_copy_data and one call per message."""
        pgconn = self.pgconn
        get_copy_data = pgconn.get_copy_data
        write: Callable[[memoryview], object] = self.sink.write
        manifest: bytearray | None = None
        while True:
            nbytes, data = get_copy_data(1)  # 0: nothing buffered; -1 at the end; -2 raises
            if nbytes <= 0:
                if nbytes == 0:
                    wait_for_input(pgconn)
                    continue
                break
            kind = data[0]
            if kind == 0x64:  # 'd'
                write(data[1:])
            elif kind == 0x6E:  # 'n' archive name \0 tablespace location \0
                name, location = bytes(data[1:]).decode().split("\0")[:2]
                self.begin_archive(name, location or None)
            elif kind == 0x70:  # 'p' int64: bytes the server has sent so far, uncompressed
                self.report_progress(int.from_bytes(data[1:9], "big"))
            elif kind == 0x6D:  # 'm': what follows is the backup_manifest
                self.end_archive()
                manifest = bytearray()
                write = manifest.extend
        self.end_archive()
        if manifest is not None:
            self.sink.manifest(bytes(manifest))

    def begin_archive(self, server_name: str, location: str | None) -> None:
        """Open the archive the server calls ``server_name`` ("base.tar.zst", "16385.tar")."""
        self.end_archive()
        stem, dot, suffix = server_name.partition(".")
        oid = None if stem == "base" else int(stem)
        row = next((t for t in self.tablespaces if t.oid == oid), None)
        archive = ArchiveInfo(
            name=stem,
            tablespace_oid=oid,
            location=location,
            size_estimate_bytes=row.size_bytes if row else None,
            compression=_streamed_compression(dot + suffix),
        )
        self.archives.append(archive)
        self.archive_open = True
        self.sink.begin_archive(archive)

    def end_archive(self) -> None:
        if self.archive_open:
            self.archive_open = False
            self.sink.end_archive()

    def report_progress(self, done_bytes: int) -> None:
        self.done_bytes = done_bytes
        self.sink.progress(done_bytes, self.total_bytes)

    def result(self, compression: str) -> BaseBackupResult:
        if len(self.lsns) != 2:
            raise DatabaseError("base backup ended without its start and end positions")
        (start_lsn, start_tli), (end_lsn, end_tli) = self.lsns
        done = {a.compression for a in self.archives}
        return BaseBackupResult(
            start_lsn=start_lsn,
            start_timeline=start_tli,
            end_lsn=end_lsn,
            end_timeline=end_tli,
            server_compression=compression if done == {compression} else "none",
            archives=list(self.archives),
        )


def _tablespace_row(row: list[str | None]) -> TablespaceRow:
    oid, location, size_kb = row[:3]
    return TablespaceRow(
        oid=int(oid) if oid else None,
        location=location or None,
        size_bytes=int(size_kb) * 1024 if size_kb else None,
    )


# --- small parsers -------------------------------------------------------------------------------


def _parse_dsn(dsn: str) -> dict[str, str]:
    """Conninfo as a dict (``coordinator.pgconn``), with replication=true unless it asks for it
    already; another replication mode is refused (``ConfigError``)."""
    params = pgconn.parse_conninfo(dsn)
    replication = params.setdefault("replication", "true").lower()
    if replication not in ("true", "on", "yes", "1"):
        raise ConfigError(
            f"the database url asks for replication={replication}; a physical backup needs "
            "replication=true"
        )
    return params


SIZE_UNITS = {"": 1, "B": 1, "kB": 1024, "MB": 1024**2, "GB": 1024**3}


def _parse_size(text: str) -> int:
    """SHOW's human form of a size: "16MB" → 16777216."""
    match = re.fullmatch(r"(\d+)\s*([kMG]?B?)", text.strip())
    if match is None or match[2] not in SIZE_UNITS:
        raise DatabaseError(f"unexpected wal_segment_size '{text}'")
    return int(match[1]) * SIZE_UNITS[match[2]]


def _text(value: bytes | None) -> str:
    if value is None:
        raise DatabaseError("the server returned NULL where a value was expected")
    return value.decode()


def _optional_text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def wait_for_input(pgconn: pq.abc.PGconn) -> None:
    """Wait until the server sends more, then take it in: without holding the GIL.

    psycopg's C implementation calls PQgetResult and PQgetCopyData holding the GIL, so a
    blocking call would stop every other thread of the coordinator (part uploads, heartbeats,
    following tasks on the broker) for as long as the server is silent: its start-of-backup
    checkpoint, or the wait for the last WAL segment to be archived. ``select`` releases it.
    Raises ``psycopg.OperationalError`` when the connection broke.
    """
    select.select([pgconn.socket], [], [])
    pgconn.consume_input()


def next_result(pgconn: pq.abc.PGconn) -> pq.abc.PGresult | None:
    """``pgconn.get_result()``, waited for without holding the GIL (``wait_for_input``)."""
    while pgconn.is_busy():
        wait_for_input(pgconn)
    return pgconn.get_result()
