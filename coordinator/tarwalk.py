"""One pass over a tablespace tar, checksumming every regular file, and PostgreSQL's
``backup_manifest``: what restore (which writes the files) and ``verify --deep`` (which discards
them) share.

``walk_tar`` reads a tar stream once, front to back, and hands each member to a ``TarSink``:
restore's writes it under its target directory (``coordinator.restore.extract``), ``DISCARD``
drops the bytes. Names are made safe before a sink sees them: absolute names and
``..`` components are refused, device files and FIFOs too (restore would never write one), so
the verdict of a deep verify is the one a restore would reach. Every regular file's size and
checksum are computed from the bytes as the sink consumes them, in the algorithm the backup's
``backup_manifest`` uses (``new_checksum``), so no file is ever read twice.

``load_backup_manifest`` parses a ``backup_manifest`` after checking its own
``Manifest-Checksum``; ``manifest_problems`` names every file that differs from it (missing,
extra, size, checksum), ``verify_against_manifest`` raises the first. The format is PostgreSQL's
(src/backend/backup/backup_manifest.c; "Backup Manifest Format" in the documentation): version
1 or 2, one entry per file with ``Path`` (or hex ``Encoded-Path``), ``Size``,
``Checksum-Algorithm`` and ``Checksum``, then ``Manifest-Checksum``, the SHA-256 of every byte
before that line.

Imported by ``workers.verify`` too, so it sits below the workers (``.importlinter``).
"""

from __future__ import annotations

import binascii
import contextlib
import hashlib
import json
import os
import queue
import tarfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, BinaryIO, NoReturn, Protocol, cast

import crc32c

from storage.errors import IntegrityError

# The default chunk of a member's bytes. Larger ones made glibc map and unmap each one in the
# workers, which fix malloc's mmap threshold at 128 KiB (``coordinator.malloc``): 3x slower.
COPY_BYTES = 64 * 1024
_WHOLE_READ_BYTES = 1024 * 1024  # the pieces of a read to the end (only trailing padding)


@dataclass(frozen=True)
class FileFacts:
    """A file as read from the archive: its size and checksum in ``algorithm`` (None: not
    computed)."""

    size: int
    algorithm: str | None
    checksum: str


@dataclass
class WalkResult:
    """What one archive held: ``files`` maps manifest paths (``manifest_prefix`` + member name)
    to their facts; ``bytes`` is the sum of the regular files' sizes."""

    files: dict[str, FileFacts] = field(default_factory=dict)
    bytes: int = 0


class TarSink(Protocol):
    """Where ``walk_tar`` puts members; ``name`` is the safe, normalised member name.

    ``file`` must consume ``chunks`` (the walker checksums them as they pass); ``hardlink`` is
    called only for a link to a regular file seen before (``source``: its safe name).
    """

    def directory(self, member: tarfile.TarInfo, name: str) -> None: ...

    def file(
        self, member: tarfile.TarInfo, name: str, chunks: Iterable[bytes | memoryview]
    ) -> None: ...

    def symlink(self, member: tarfile.TarInfo, name: str) -> None: ...

    def hardlink(self, member: tarfile.TarInfo, name: str, source: str) -> None: ...


class _Discard:
    """Reads every file to its end and keeps nothing: the sink of ``verify --deep``."""

    def directory(self, member: tarfile.TarInfo, name: str) -> None:
        pass

    def file(
        self, member: tarfile.TarInfo, name: str, chunks: Iterable[bytes | memoryview]
    ) -> None:
        for _ in chunks:
            pass

    def symlink(self, member: tarfile.TarInfo, name: str) -> None:
        pass

    def hardlink(self, member: tarfile.TarInfo, name: str, source: str) -> None:
        pass


DISCARD: TarSink = _Discard()


def walk_tar(
    stream: BinaryIO,
    sink: TarSink,
    *,
    algorithm: str | None = "CRC32C",
    manifest_prefix: str = "",
    what: str = "archive",
    chunk_bytes: int = COPY_BYTES,
    read_ahead: int = 0,
) -> WalkResult:
    """Hand every member of the tar read from ``stream`` to ``sink``, checksumming files, then
    read ``stream`` to its end (the tar's trailing blocks; decoders check their last bytes).

    ``algorithm``: the backup_manifest checksum algorithm to compute (None: sizes only).
    ``chunk_bytes``: the most a chunk handed to ``sink.file`` holds (bytes or a memoryview).
    ``read_ahead``: read ``stream`` on a thread of its own, up to this many chunks ahead (0: in
    the caller's thread); ``stream`` is then not to be touched until ``walk_tar`` returns.
    ``IntegrityError`` naming ``what`` for an unreadable tar, a truncated member, or a member
    refused (``refuse``) by the walker or the sink; errors of the sink and of ``stream``
    propagate as they are.
    """
    result = WalkResult()
    source = _ForwardReader(stream, read_ahead, chunk_bytes)
    try:
        # Mode "r:", not the stream mode "r|": that one reads its source 10 KiB at a time and
        # copies every byte three times on the way (a join and two slices), which was a fifth of
        # a restore's CPU. tarfile only ever seeks forward here (``_ForwardReader``).
        with tarfile.open(fileobj=cast(IO[bytes], source), mode="r:") as tar:
            for member in tar:
                _walk_member(source, member, sink, algorithm, manifest_prefix, what, result,
                             chunk_bytes)  # fmt: skip
        source.drain()
    except (tarfile.TarError, EOFError) as exc:
        source.stop()
        raise IntegrityError(f"{what} is not a readable tar archive: {exc}") from exc
    except BaseException:
        source.stop()
        raise
    return result


def _walk_member(
    source: _ForwardReader,
    member: tarfile.TarInfo,
    sink: TarSink,
    algorithm: str | None,
    prefix: str,
    what: str,
    result: WalkResult,
    chunk_bytes: int,
) -> None:
    name = safe_name(member.name, what)
    if name is None:  # "./": the target itself
        return
    if member.isdir():
        sink.directory(member, name)
    elif member.isfile():
        if member.sparse is not None:  # PostgreSQL never writes one; restore would not hole it
            refuse(what, member.name, "is a sparse file")
        checksum = new_checksum(algorithm)
        counted = [0]
        sink.file(member, name, _checksummed(source, member, chunk_bytes, checksum, counted))
        if counted[0] != member.size:
            raise IntegrityError(f"{what} member '{member.name}' is truncated")
        result.bytes += counted[0]
        result.files[prefix + name] = FileFacts(counted[0], algorithm, checksum.hexdigest())
    elif member.issym():
        sink.symlink(member, name)
    elif member.islnk():
        source_name = safe_name(member.linkname, what)
        facts = result.files.get(prefix + (source_name or ""))
        if source_name is None or facts is None:
            refuse(what, member.name, f"is a hard link to '{member.linkname}', not to a file")
        sink.hardlink(member, name, source_name)
        result.files[prefix + name] = facts
    else:
        refuse(what, member.name, "is a device file or FIFO")


def _checksummed(
    source: _ForwardReader,
    member: tarfile.TarInfo,
    chunk_bytes: int,
    checksum: _Checksum | hashlib._Hash,
    counted: list[int],
) -> Iterator[bytes | memoryview]:
    """The member's bytes, straight from the source (each chunk is the decoder's own buffer or
    a view of it, never copied), checksummed and counted as they pass."""
    source.seek(member.offset_data)
    left = member.size
    while left and (chunk := source.read_some(min(left, chunk_bytes))):
        checksum.update(chunk)
        counted[0] += len(chunk)
        left -= len(chunk)
        yield chunk


class _ForwardReader:
    """A stream as tarfile's seeking mode wants it: ``tell``, and ``seek`` forward only (the
    bytes skipped are read and dropped). ``read(n)`` returns ``n`` bytes unless the stream ends;
    ``read_some(n)`` at most ``n``, without copying them.

    tarfile seeks to each header and member in order, and back only when asked for a member's
    bytes a second time, which ``walk_tar`` never does: that would raise ``StreamError``.

    With ``read_ahead`` (chunks), the stream is read on a thread of its own (``_ReadAhead``).
    """

    def __init__(self, stream: BinaryIO, read_ahead: int, chunk_bytes: int) -> None:
        self._stream = stream
        self._position = 0
        self._ahead = _ReadAhead(stream, read_ahead, chunk_bytes) if read_ahead else None
        self._view = memoryview(b"")  # the unread rest of the read-ahead's current chunk

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._position
        elif whence != os.SEEK_SET:
            raise tarfile.StreamError("cannot seek from the end of a stream")
        if offset < self._position:
            raise tarfile.StreamError("cannot seek backwards in a stream")
        while offset > self._position and self.read_some(offset - self._position):
            pass
        return self._position

    def read_some(self, size: int) -> bytes | memoryview:
        """At most ``size`` bytes (fewer where a decoder or a chunk ends); empty at the end."""
        if self._ahead is None:
            piece: bytes | memoryview = self._stream.read(size)
        else:
            if not self._view:
                self._view = self._ahead.next_chunk()
            piece, self._view = self._view[:size], self._view[size:]
        self._position += len(piece)
        return piece

    def read(self, size: int = -1) -> bytes:
        pieces = []
        got = 0
        while size < 0 or got < size:
            piece = self.read_some(_WHOLE_READ_BYTES if size < 0 else size - got)
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
        if len(pieces) == 1 and isinstance(pieces[0], bytes):
            return pieces[0]
        return b"".join(pieces)

    def drain(self) -> None:
        """Read to the end: the tar's trailing blocks, and what the decoders check there."""
        while self.read_some(_WHOLE_READ_BYTES):
            pass

    def stop(self) -> None:
        if self._ahead is not None:
            self._ahead.stop()


class _ReadAhead:
    """Reads a stream ``chunk_bytes`` at a time on a thread of its own, at most ``depth`` chunks
    ahead of ``next_chunk``.

    Why: decompressing (zstd, which releases the GIL) took half of the restoring thread's time,
    one after another with parsing the tar and checksumming; on its own thread it overlaps them.
    An error of the stream is raised by the ``next_chunk`` that would have returned what
    follows it. ``stop`` (the walk failed) lets the thread end after at most the read it is in:
    it is not waited for, as that read may be one a stalled network holds; the caller's closing
    of what it reads from ends it sooner.
    """

    def __init__(self, stream: BinaryIO, depth: int, chunk_bytes: int) -> None:
        self._stream = stream
        self._chunk_bytes = chunk_bytes
        self._chunks: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._stopping = False
        self._ended = False
        self._thread = threading.Thread(target=self._run, name="tar-read-ahead", daemon=True)
        self._thread.start()

    def next_chunk(self) -> memoryview:
        """The next chunk; empty at the end of the stream."""
        if self._ended:
            return memoryview(b"")
        item = self._chunks.get()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if not item:
            self._ended = True
            self._thread.join()  # it has put its last chunk and returns
        return memoryview(item)

    def stop(self) -> None:
        self._stopping = True
        # Room for the chunk the thread may be putting; it then sees ``_stopping`` and returns.
        with contextlib.suppress(queue.Empty):
            while True:
                self._chunks.get_nowait()

    def _run(self) -> None:
        try:
            while not self._stopping:
                chunk = self._stream.read(self._chunk_bytes)
                self._chunks.put(chunk)
                if not chunk:
                    return
        except BaseException as exc:  # raised again in the walking thread
            self._chunks.put(exc)


def safe_name(raw: str, what: str) -> str | None:
    """The member name relative to the target, or None for the target itself; refuses
    absolute names and ``..`` components."""
    if raw.startswith("/") or "\x00" in raw:
        refuse(what, raw, "has an absolute name")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        refuse(what, raw, "has a '..' component")
    return "/".join(parts) if parts else None


def refuse(what: str, member: str, reason: str) -> NoReturn:
    raise IntegrityError(f"{what} member '{member}' {reason}: refusing to extract it")


# --- PostgreSQL's backup_manifest ---------------------------------------------------------------

# Files PostgreSQL puts in a base backup without listing them in backup_manifest: the WAL that
# makes the backup consistent (pg_wal/), and the manifest itself.
_UNLISTED_NAMES = frozenset({"backup_manifest"})
_UNLISTED_PREFIXES = ("pg_wal/",)
_HASHLIB_ALGORITHMS = {
    "SHA224": "sha224",
    "SHA256": "sha256",
    "SHA384": "sha384",
    "SHA512": "sha512",
}


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    size: int
    algorithm: str | None
    checksum: str | None


class _Checksum:
    """Incremental CRC32C in PostgreSQL's manifest notation, or a no-op for "NONE"."""

    def __init__(self, crc: bool) -> None:
        self._crc: int | None = 0 if crc else None

    def update(self, data: bytes | memoryview) -> None:
        if self._crc is not None:
            self._crc = crc32c.crc32c(data, self._crc)

    def hexdigest(self) -> str:
        if self._crc is None:
            return ""
        # PostgreSQL prints the CRC's bytes as they lie in memory (pg_checksum_final memcpy),
        # i.e. little-endian on the x86/ARM servers it runs on: crc 0x2247748a -> "8a744722".
        return self._crc.to_bytes(4, "little").hex()


def new_checksum(algorithm: str | None) -> _Checksum | hashlib._Hash:
    """A fresh checksum object for a backup_manifest ``Checksum-Algorithm``."""
    if algorithm is None or algorithm == "NONE":
        return _Checksum(crc=False)
    if algorithm == "CRC32C":
        return _Checksum(crc=True)
    try:
        return hashlib.new(_HASHLIB_ALGORITHMS[algorithm])
    except KeyError:
        raise IntegrityError(
            f"backup_manifest uses unknown checksum algorithm '{algorithm}'"
        ) from None


def load_backup_manifest(manifest_json: bytes) -> list[ManifestEntry]:
    """The file entries of a backup_manifest, after checking its own Manifest-Checksum
    (``IntegrityError`` when it does not match, or the document is not a manifest)."""
    try:
        doc = json.loads(manifest_json)
        version = doc["PostgreSQL-Backup-Manifest-Version"]
        files = doc["Files"]
        declared = doc["Manifest-Checksum"]
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"backup_manifest is not a PostgreSQL backup manifest: {exc}") from exc
    if version not in (1, 2):
        raise IntegrityError(f"backup_manifest has unsupported version {version}")
    # The checksum covers every byte before the line that holds it (PostgreSQL's definition).
    cut = manifest_json.rfind(b'"Manifest-Checksum"')
    if hashlib.sha256(manifest_json[:cut]).hexdigest() != str(declared).lower():
        raise IntegrityError("backup_manifest does not match its own Manifest-Checksum")
    try:
        return [_entry(item) for item in files]
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"backup_manifest has a malformed file entry: {exc}") from exc


def manifest_algorithm(entries: list[ManifestEntry]) -> str | None:
    """The checksum algorithm to compute while reading (PostgreSQL uses one per backup)."""
    return next((e.algorithm for e in entries if e.algorithm is not None), None)


def manifest_problems(
    entries: Iterable[ManifestEntry],
    observed: Mapping[str, FileFacts],
    *,
    verb: str = "restored",
) -> list[str]:
    """Every difference between ``entries`` and the files ``observed``, one message each, in
    manifest order then archive order: a listed file missing, of another size or checksum; a
    file not listed that PostgreSQL does not leave out of the manifest (WAL, the manifest
    itself). ``verb`` says what happened to the files ("restored", "found in the archive")."""
    problems: list[str] = []
    listed = set()
    for entry in entries:
        listed.add(entry.path)
        facts = observed.get(entry.path)
        if facts is None:
            problems.append(f"file '{entry.path}' listed in backup_manifest was not {verb}")
        elif facts.size != entry.size:
            problems.append(
                f"file '{entry.path}' has {facts.size} bytes, backup_manifest says {entry.size}"
            )
        elif entry.algorithm not in (None, "NONE") and (
            facts.algorithm != entry.algorithm or facts.checksum != entry.checksum
        ):
            problems.append(
                f"file '{entry.path}' does not match its {entry.algorithm} checksum "
                "in backup_manifest"
            )
    for path in observed:
        if path not in listed and not _unlisted_by_postgres(path):
            problems.append(f"file '{path}' was {verb} but is not in backup_manifest")
    return problems


def verify_against_manifest(manifest_json: bytes, observed: Mapping[str, FileFacts]) -> None:
    """Raise ``IntegrityError`` naming the first file that differs from the backup_manifest."""
    problems = manifest_problems(load_backup_manifest(manifest_json), observed)
    if problems:
        raise IntegrityError(problems[0])


def _unlisted_by_postgres(path: str) -> bool:
    return path in _UNLISTED_NAMES or path.startswith(_UNLISTED_PREFIXES)


def _entry(item: dict[str, object]) -> ManifestEntry:
    if "Path" in item:
        path = str(item["Path"])
    else:
        # Names that are not valid UTF-8 are hex-encoded; tarfile decodes them the way
        # os.fsdecode does (surrogateescape), so compare in that form.
        path = os.fsdecode(binascii.unhexlify(str(item["Encoded-Path"])))
    algorithm = item.get("Checksum-Algorithm")
    checksum = item.get("Checksum")
    return ManifestEntry(
        path=path,
        size=int(str(item["Size"])),
        algorithm=str(algorithm) if algorithm is not None else None,
        checksum=str(checksum).lower() if checksum is not None else None,
    )
