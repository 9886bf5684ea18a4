"""The compression registry: every compression's levels, defaults, frame flags, compressors and
decoders, in one place.

One ``Codec`` per compression in ``CODECS`` (``codec(name)`` looks one up), for its three uses:

- *backup, client side*: ``stream_compressor``, the archive pipeline's streaming compressor
  (``coordinator.backup.pipeline``), used when the server sent the archive uncompressed;
- *backup, server side*: the level asked for in BASE_BACKUP's ``COMPRESSION_DETAIL``
  (``coordinator.backup.replication``); PostgreSQL compresses, with its own frame flags;
- *WAL*: ``compress_wal``, one segment (or history/backup file) in one call
  (``coordinator.wal.push.encode``).

And back: ``open_plaintext`` decrypts and decompresses a stored backup archive as a stream
(restore); ``decompress_wal`` a stored WAL object in one call (wal-fetch, its prefetcher,
restore's timeline search). Every decoder failure is reported as damaged bytes
(``IntegrityError`` naming the object); ``Codec.damaged`` says which library exceptions mean it.

Names and key suffixes live below, in ``storage.layout`` (``COMPRESSIONS``,
``COMPRESSION_SUFFIXES``), because storage and the workers need them; ``options.declared`` keeps
its own copy of the names (it is standard library only and below storage), held equal to them by
``tests/coordinator/test_codecs.py``.

The third-party libraries (zstandard, lz4) are imported only when a compressor or decoder is
built, so that looking up a level or a suffix costs nothing.

Levels: the registry's ``levels`` is what ``--compression-level`` accepts for the algorithm, for
both backup uses (the same level goes to the server, or to the client when the server cannot
compress). Each range is where PostgreSQL's ``validate_compress_specification``
(src/common/compression.c, 15+) and the Python library agree and the level means something:

- zstd 1-22: PostgreSQL takes ZSTD_minCLevel()..ZSTD_maxCLevel() (negative "fast" levels too),
  zstandard refuses above 22 (``ValueError``) and takes 0 and negatives; the negatives are not
  offered (one range for both sides, and the numbers read as "more is smaller");
- gzip 1-9: PostgreSQL refuses 0 (and everything but -1, its default, outside 1-9), zlib refuses
  above 9 and below -1 (``ValueError``/``zlib.error``);
- lz4 1-12: PostgreSQL takes 1-12 and 0 (its default, "fast mode"); python-lz4 refuses nothing
  but LZ4F clamps above LZ4HC_CLEVEL_MAX (12: same bytes as 12), and levels below
  LZ4HC_CLEVEL_MIN (3) are all the same fast mode (0, 1 and 2 give the same bytes).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol, cast

from storage.errors import DecryptionFailed, IntegrityError
from storage.layout import COMPRESSION_SUFFIXES, CompressedBy, Compression, compression_named

__all__ = [
    "CODECS",
    "DEFAULT_COMPRESSION",
    "Codec",
    "StreamCompressor",
    "codec",
    "compress_wal",
    "compressed_by",
    "decompress_wal",
    "describe_levels",
    "open_plaintext",
    "stream_compressor",
]


@dataclass(frozen=True)
class Codec:
    """One compression, for each use. Levels are the library's own numbers.

    ``suffix``: ``storage.layout.COMPRESSION_SUFFIXES``' (key suffix of its stored objects).
    ``levels``: what ``--compression-level`` accepts (None: it takes no level).
    ``backup_level``, ``server_level``, ``wal_level``: the default level of each use (None for
    "none"). ``server_workers``: zstd worker threads asked of the server (None: not asked).
    ``backup_checksum``, ``wal_checksum``: whether the frames we write carry a checksum of the
    content (gzip always has its CRC-32; the server's frames are PostgreSQL's choice).
    ``damaged``: names of the exceptions its decoder raises for damaged bytes (``damaged_errors``
    turns them into the classes, importing the library).
    """

    name: Compression
    suffix: str
    levels: range | None
    backup_level: int | None
    server_level: int | None
    wal_level: int | None
    server_workers: int | None
    backup_checksum: bool
    wal_checksum: bool
    damaged: tuple[str, ...]


# Why each default is what it is.
#
# Backup, client side (zstd 1, gzip 1, lz4 1): the pipeline runs on the thread that reads the
# replication stream, so compression must keep up with it; measured on pgbench-like pages
# (bench/pipeline.py): zstd 1 ~700 MB/s per core at 7.7x; gzip 1 ~230 MB/s at 5.6x where gzip 6
# manages ~47 MB/s for 6.1x. lz4 was python-lz4's default, 0: the same LZ4F fast mode, with the
# same bytes, as 1 (levels below 3 are one mode; test_codecs holds it), so 1, which is inside
# the range the CLI accepts and the same as the server's.
#
# Backup, server side (zstd 1, gzip 1, lz4 1): the fastest level of each, because the CPU is the
# database host's: server zstd level 1 ran ~800 MB/s for a 5.7x ratio on pgbench data. lz4 1 is
# PostgreSQL's default (0, fast mode) in effect. zstd gets ``workers=2``: measured no faster on
# 2 cores, kept for larger database hosts; a server whose zstd has no threads refuses it and
# ``coordinator.backup.replication`` asks again without.
#
# WAL (zstd 1, gzip 6, lz4 1). zstd was 3 (its own default, ZSTD_CLEVEL_DEFAULT) until measured
# on WAL that is not blank filler: on the bench-peers `prod` WAL (pgbench plus md5-text updates,
# full-page images) 16 segments took 1.70 s at level 3 and 0.54 s at level 1 for the same ratio
# (2.23x and 2.24x); on pgbench segments level 1 was ~560 MB/s at 6.3x against ~400 MB/s at 6.2x.
# The pusher's compression was most of wal-push's CPU (10.4 of 18.9 s per GB), so level 1 is the
# default (wal-push has no level option). Stored WAL may change bytes without harm: a push
# compares raw SHA-256s, never stored bytes. gzip 6 and lz4 1 are zlib's default
# (Z_DEFAULT_COMPRESSION, what `gzip` writes: ~70 MB/s at 5.7x, gzip 1 ~210 MB/s at 5.4x) and
# python-lz4's, unchanged: gzip is chosen for compatibility, not speed.
# lz4 1 writes the same bytes as python-lz4's default (0), which wal-push always used.
#
# Checksums. Backup streams we write carry one (zstd frame checksum, lz4 content checksum) so that
# `zstd -t`/`lz4 -t` and restore's decoder catch corruption without the manifest. WAL objects
# carry none (zstandard's and python-lz4's defaults, unchanged since the first push): every WAL
# object is checked after decompression against the SHA-256 of the original file recorded with
# it (storage.layout.WAL_RAW_SHA256), which a frame checksum could only repeat; and new bytes for
# the same WAL would make no difference to the archive (a push compares raw SHA-256s). Server
# streams have what PostgreSQL writes: zstd without checksum, lz4 without content checksum in
# 256 KiB blocks (basebackup_zstd.c, basebackup_lz4.c); the manifest's SHA-256 of each stored
# object covers them.
CODECS: Mapping[Compression, Codec] = {
    "zstd": Codec(
        name="zstd", suffix=COMPRESSION_SUFFIXES["zstd"], levels=range(1, 23),
        backup_level=1, server_level=1, wal_level=1, server_workers=2,
        backup_checksum=True, wal_checksum=False, damaged=("zstandard.ZstdError",),
    ),
    "gzip": Codec(
        name="gzip", suffix=COMPRESSION_SUFFIXES["gzip"], levels=range(1, 10),
        backup_level=1, server_level=1, wal_level=6, server_workers=None,
        backup_checksum=True, wal_checksum=True,
        damaged=("gzip.BadGzipFile", "zlib.error", "EOFError"),
    ),
    "lz4": Codec(
        name="lz4", suffix=COMPRESSION_SUFFIXES["lz4"], levels=range(1, 13),
        backup_level=1, server_level=1, wal_level=1, server_workers=None,
        backup_checksum=True, wal_checksum=False,
        # RuntimeError: what lz4.frame raises for a damaged frame; EOFError: for a cut one.
        damaged=("RuntimeError", "EOFError"),
    ),
    "none": Codec(
        name="none", suffix=COMPRESSION_SUFFIXES["none"], levels=None,
        backup_level=None, server_level=None, wal_level=None, server_workers=None,
        backup_checksum=False, wal_checksum=False, damaged=(),
    ),
}  # fmt: skip

# What backup and wal-push use when not told (--compression's default in options.declared, and
# what the seed's --compress means): a better ratio than gzip at several times its speed, and
# more than lz4's (measured above: zstd 1 6.3x, gzip 1 5.4x, lz4 3.9x on the same segments).
DEFAULT_COMPRESSION: Compression = "zstd"


def codec(name: str) -> Codec:
    """The registry's entry for ``name``; ``ConfigError`` naming the choices if unknown."""
    return CODECS[compression_named(name)]


def describe_levels() -> str:
    """The level ranges for help and the README: "zstd 1-22, gzip 1-9, lz4 1-12"."""
    return ", ".join(
        f"{c.name} {c.levels.start}-{c.levels.stop - 1}"
        for c in CODECS.values()
        if c.levels is not None
    )


def damaged_errors(name: str) -> tuple[type[BaseException], ...]:
    """The exception classes ``name``'s decoder raises for damaged bytes (``Codec.damaged``),
    importing its library; ``ConfigError`` if ``name`` is unknown."""
    found: list[type[BaseException]] = []
    for dotted in codec(name).damaged:
        module, _, attribute = dotted.rpartition(".")
        if module == "zstandard":
            import zstandard

            found.append(cast(type[BaseException], getattr(zstandard, attribute)))
        elif module == "gzip":
            import gzip

            found.append(cast(type[BaseException], getattr(gzip, attribute)))
        elif module == "zlib":
            import zlib

            found.append(cast(type[BaseException], getattr(zlib, attribute)))
        else:
            import builtins

            found.append(cast(type[BaseException], getattr(builtins, attribute)))
    return tuple(found)


def compressed_by(requested: str, streamed: str) -> CompressedBy:
    """Who compressed an archive, for its manifest record: "none" when ``requested`` (the
    backup's compression) is "none", else "server" when the server streamed it compressed
    (``streamed`` is not "none"), else "client"."""
    if requested == "none":
        return "none"
    return "server" if streamed != "none" else "client"


# --- compressing ---------------------------------------------------------------------------------


class StreamCompressor(Protocol):
    """A streaming compressor: ``compress`` returns what is ready (maybe b""), ``flush`` the
    rest and the end of the frame; the concatenation is one standard frame (gzip member)."""

    def compress(self, data: bytes | memoryview) -> bytes: ...

    def flush(self) -> bytes: ...


class _Lz4Compressor:
    """lz4 frame format (what ``lz4 -dc`` reads), with its content checksum."""

    def __init__(self, level: int, *, checksum: bool) -> None:
        import lz4.frame

        self._frame = lz4.frame.LZ4FrameCompressor(
            compression_level=level, content_checksum=checksum
        )
        self._header: bytes | None = self._frame.begin()

    def compress(self, data: bytes | memoryview) -> bytes:
        out: bytes = self._frame.compress(data)
        if self._header is not None:
            out, self._header = self._header + out, None
        return out

    def flush(self) -> bytes:
        tail: bytes = self._frame.flush()
        return (self._header or b"") + tail


def stream_compressor(
    name: str, level: int | None = None, *, threads: int = 0
) -> StreamCompressor | None:
    """The client-side backup compressor for ``name`` (None for "none"), writing the standard
    format with the backup checksum flags.

    ``level`` None means ``Codec.backup_level``; a level the library refuses raises its
    ``ValueError`` (the CLI checks ``Codec.levels`` first). ``threads``: zstd worker threads
    (0: compress on the caller's thread); the others ignore it. ``ConfigError`` for an unknown
    ``name``.
    """
    entry = codec(name)
    if entry.name == "none":
        return None
    chosen = entry.backup_level if level is None else level
    assert chosen is not None  # every compression but "none" has a backup level
    if entry.name == "zstd":
        import zstandard

        cctx = zstandard.ZstdCompressor(
            level=chosen, threads=threads, write_checksum=entry.backup_checksum
        )
        return cast(StreamCompressor, cctx.compressobj())
    if entry.name == "gzip":
        import zlib

        # wbits 16 + MAX_WBITS: a gzip member (header, deflate, CRC-32 and size).
        return cast(StreamCompressor, zlib.compressobj(chosen, zlib.DEFLATED, 16 + zlib.MAX_WBITS))
    return _Lz4Compressor(chosen, checksum=entry.backup_checksum)


def compress_wal(data: bytes, name: str) -> bytes:
    """``data`` (one WAL file) as one frame (gzip member) at ``Codec.wal_level``, readable by
    ``zstd -d``, ``gzip -d`` or ``lz4 -d``; ``data`` itself for "none".

    The bytes are a function of ``data`` alone: zstd with the content size and no checksum, gzip
    with mtime 0 (written by zlib), lz4 with the content size and no content checksum.
    ``ConfigError`` naming the choices for an unknown ``name``.
    """
    entry = codec(name)
    level = entry.wal_level
    if level is None:  # "none"
        return data
    if entry.name == "zstd":
        import zstandard

        cctx = zstandard.ZstdCompressor(level=level, write_checksum=entry.wal_checksum)
        return bytes(cctx.compress(data))
    if entry.name == "gzip":
        import gzip

        return gzip.compress(data, compresslevel=level, mtime=0)
    import lz4.frame

    return bytes(
        lz4.frame.compress(data, compression_level=level, content_checksum=entry.wal_checksum)
    )


# --- decoding ------------------------------------------------------------------------------------


class _ArchiveStream(io.RawIOBase):
    """The plaintext of one archive; decoder failures become ``IntegrityError`` naming it.

    The key was already proven on backup_manifest when an archive fails to decrypt, so that
    failure too means damaged bytes, not a wrong key.
    """

    def __init__(
        self, inner: BinaryIO, what: str, decoder_errors: tuple[type[BaseException], ...]
    ) -> None:
        super().__init__()
        self._inner = inner
        self._what = what
        # EOFError for every compression, as always: how a cut stream may surface.
        self._errors: tuple[type[BaseException], ...] = (EOFError, *decoder_errors)

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        try:
            return self._inner.read(-1 if size is None else size)
        except DecryptionFailed as exc:
            # The identities opened backup_manifest: a stanza of theirs that does not open
            # here was changed after the backup encrypted it.
            raise IntegrityError(
                f"{self._what} is damaged: its age header does not open with the key that "
                "opened the backup's backup_manifest"
            ) from exc
        except self._errors as exc:
            raise IntegrityError(f"{self._what} is damaged: {exc}") from exc

    def readinto(self, target: Any) -> int:
        data = self.read(len(memoryview(target)))
        memoryview(target).cast("B")[: len(data)] = data
        return len(data)

    def close(self) -> None:
        """Close the decoders too (a decrypting reader's thread stops); zstd's and lz4's
        readers close the source they read as well, gzip's does not."""
        if not self.closed:
            try:
                self._inner.close()
            finally:
                super().close()


def open_plaintext(
    source: BinaryIO,
    compression: str,
    *,
    identities: Sequence[str] | None,
    what: str,
) -> _ArchiveStream:
    """``source`` (one stored object, read from its start) decrypted with age when
    ``identities`` is given, then decompressed: a binary stream of the original bytes.

    Reads raise ``IntegrityError`` "<what> is damaged: ..." for what ``damaged_errors`` lists and
    for a failed decryption. zstd reads across frames (a stream may be several frames, as other
    tools write them). Not detected here: a zstd stream cut at a frame boundary or inside a
    frame ends early without an error, and frames without a checksum decode damaged bytes
    silently; the callers' SHA-256 checks (the manifest's of the stored object, a WAL object's
    of the original file) catch both. ``IntegrityError`` for an unknown ``compression`` (a
    manifest or key this version does not know).
    """
    stream: BinaryIO = source
    if identities is not None:
        from coordinator.crypto import decrypting_reader

        stream = cast(BinaryIO, decrypting_reader(source, identities, what))
    if compression == "zstd":
        import zstandard

        stream = cast(
            BinaryIO,
            zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True),
        )
    elif compression == "gzip":
        import gzip

        stream = cast(BinaryIO, gzip.GzipFile(fileobj=stream, mode="rb"))
    elif compression == "lz4":
        import lz4.frame

        stream = cast(BinaryIO, lz4.frame.LZ4FrameFile(stream, mode="rb"))
    elif compression != "none":
        raise IntegrityError(f"{what} has unknown compression '{compression}'")
    return _ArchiveStream(stream, what, damaged_errors(compression))


def decompress_wal(data: bytes, compression: str, what: str) -> bytes:
    """The original bytes of one stored WAL object (already decrypted), in one call.

    Same decoders and errors as ``open_plaintext`` (``IntegrityError`` "<what> is damaged: ..."),
    so it reads what the seed tool stored too; the caller checks the result's SHA-256.
    """
    if compression == "none":
        return data
    return open_plaintext(io.BytesIO(data), compression, identities=None, what=what).read(-1)
