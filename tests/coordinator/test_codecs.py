"""The compression registry (coordinator.codecs, storage.layout's names and suffixes): round trips
for backup streams and WAL, the stored bytes as they always were, the level ranges against what
each library does at their ends, suffixes both ways, damaged streams, and the option table."""

from __future__ import annotations

import gzip
import io
import os
import zlib
from typing import cast

import lz4.frame
import pytest
import zstandard

from coordinator.backup.replication import BaseBackupOptions, _streamed_compression
from coordinator.codecs import (
    CODECS,
    DEFAULT_COMPRESSION,
    StreamCompressor,
    codec,
    compress_wal,
    compressed_by,
    damaged_errors,
    decompress_wal,
    describe_levels,
    open_plaintext,
    stream_compressor,
)
from options.declared import BACKUP, WAL_PUSH, option_for
from options.declared import COMPRESSIONS as OPTION_COMPRESSIONS
from storage.errors import ConfigError, IntegrityError
from storage.layout import (
    COMPRESSION_SUFFIXES,
    COMPRESSIONS,
    WAL_OBJECT_SUFFIXES,
    Layout,
    compression_of_suffix,
    compression_suffix,
)

COMPRESSED = [name for name in COMPRESSIONS if name != "none"]
# Something like a data page: incompressible bytes, then zeros, repeated (about 1.6 MB).
DATA = (os.urandom(3000) + bytes(5000)) * 200


def _in_pieces(compressor: StreamCompressor, data: bytes) -> bytes:
    """``data`` through ``compressor`` in 64 KiB writes, as the pipeline feeds it."""
    view = memoryview(data)
    out = [compressor.compress(view[i : i + 65536]) for i in range(0, len(view), 65536)]
    return b"".join([*out, compressor.flush()])


def _backup_stream(name: str, data: bytes = DATA, level: int | None = None) -> bytes:
    """What the pipeline stores for ``data`` compressed client side."""
    compressor = stream_compressor(name, level, threads=2)
    return data if compressor is None else _in_pieces(compressor, data)


def _read_stream(stored: bytes, name: str) -> bytes:
    return open_plaintext(io.BytesIO(stored), name, identities=None, what="archive 'x'").read(-1)


def _damaged(stored: bytes) -> bytes:
    middle = bytearray(stored)
    middle[len(middle) // 2] ^= 0xFF
    return bytes(middle)


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", COMPRESSIONS)
def test_a_backup_stream_reads_back(name: str) -> None:
    stored = _backup_stream(name)
    assert _read_stream(stored, name) == DATA
    if name != "none":
        assert len(stored) < len(DATA) * 0.7


@pytest.mark.parametrize("name", COMPRESSIONS)
def test_a_wal_file_reads_back(name: str) -> None:
    stored = compress_wal(DATA, name)
    assert decompress_wal(stored, name, "archived WAL 'x'") == DATA
    if name != "none":
        assert len(stored) < len(DATA) * 0.7


@pytest.mark.parametrize("name", COMPRESSED)
def test_the_other_uses_decoder_reads_each_form(name: str) -> None:
    """A WAL object through the streaming decoder and a backup stream through the one-shot one:
    one set of decoders reads whatever the flags of the writer."""
    assert _read_stream(compress_wal(DATA, name), name) == DATA
    assert decompress_wal(_backup_stream(name), name, "archived WAL 'x'") == DATA


def test_several_zstd_frames_read_as_one_stream() -> None:
    """Other tools (the seed's among them) may write a stream as several frames."""
    stored = compress_wal(DATA[:1000], "zstd") + compress_wal(DATA[1000:], "zstd")
    assert decompress_wal(stored, "zstd", "archived WAL 'x'") == DATA


# --- the stored bytes, as before the registry -------------------------------------------------


def test_wal_bytes_are_what_wal_push_writes() -> None:
    """zstd 1 without checksum (3 before issue 12: see codecs' WAL levels), gzip 6 with mtime 0,
    lz4.frame's defaults (level 0)."""
    assert compress_wal(DATA, "zstd") == zstandard.ZstdCompressor(level=1).compress(DATA)
    assert compress_wal(DATA, "gzip") == gzip.compress(DATA, compresslevel=6, mtime=0)
    assert compress_wal(DATA, "lz4") == lz4.frame.compress(DATA)
    assert compress_wal(DATA, "none") == DATA


def test_backup_bytes_are_what_the_pipeline_always_wrote() -> None:
    """zstd 1 with checksum, a gzip member at 1, lz4 at python-lz4's default 0 with content
    checksum: the client's lz4 level moved from 0 to 1 without changing a byte."""
    cctx = zstandard.ZstdCompressor(level=1, threads=2, write_checksum=True)
    zstd_before = _in_pieces(cast(StreamCompressor, cctx.compressobj()), DATA)
    gzip_obj = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    gzip_before = _in_pieces(cast(StreamCompressor, gzip_obj), DATA)
    frame = lz4.frame.LZ4FrameCompressor(compression_level=0, content_checksum=True)
    header = frame.begin()
    lz4_pieces = [frame.compress(DATA[i : i + 65536]) for i in range(0, len(DATA), 65536)]
    lz4_before = b"".join([header, *lz4_pieces, frame.flush()])

    assert _backup_stream("zstd") == zstd_before
    assert _backup_stream("gzip") == gzip_before
    assert _backup_stream("lz4") == lz4_before


# --- levels ------------------------------------------------------------------------------------


def test_every_compression_but_none_has_a_default_level_for_each_use_inside_its_range() -> None:
    for entry in CODECS.values():
        if entry.name == "none":
            assert entry.levels is None
            assert (entry.backup_level, entry.server_level, entry.wal_level) == (None,) * 3
            continue
        assert entry.levels is not None
        for level in (entry.backup_level, entry.server_level, entry.wal_level):
            assert level in entry.levels


@pytest.mark.parametrize("name", ["zstd", "gzip"])
def test_the_library_takes_both_ends_and_refuses_above(name: str) -> None:
    levels = codec(name).levels
    assert levels is not None
    for level in (levels.start, levels.stop - 1):
        assert _read_stream(_backup_stream(name, DATA[:50_000], level), name) == DATA[:50_000]
    with pytest.raises((ValueError, zlib.error)):
        _backup_stream(name, DATA[:1000], levels.stop)


def test_zstd_takes_levels_below_the_range_that_are_not_offered() -> None:
    """zstd's 0 and negative levels are valid for the library (and PostgreSQL) but left out."""
    assert codec("zstd").levels == range(1, 23)
    assert _read_stream(_backup_stream("zstd", DATA[:1000], 0), "zstd") == DATA[:1000]
    assert _read_stream(_backup_stream("zstd", DATA[:1000], -5), "zstd") == DATA[:1000]


def test_gzip_below_the_range_is_no_compression_or_refused() -> None:
    """gzip 0 stores (PostgreSQL 15+ refuses it), below -1 zlib refuses."""
    stored = _backup_stream("gzip", DATA[:10_000], 0)
    assert len(stored) > 10_000
    with pytest.raises(ValueError):
        _backup_stream("gzip", DATA[:1000], -2)


def test_lz4_levels_outside_the_range_are_clamped_not_refused() -> None:
    """python-lz4 refuses no level: LZ4F runs everything below 3 as one fast mode and clamps
    above 12. So 1-12 is every distinct lz4 level, and 0 (python-lz4's and PostgreSQL's
    default) is 1."""
    assert codec("lz4").levels == range(1, 13)
    fast = {_backup_stream("lz4", DATA, level) for level in (0, 1, 2)}
    assert len(fast) == 1
    assert _backup_stream("lz4", DATA, 3) not in fast
    assert _backup_stream("lz4", DATA, 13) == _backup_stream("lz4", DATA, 12)
    assert _backup_stream("lz4", DATA, 99) == _backup_stream("lz4", DATA, 12)


def test_the_server_is_asked_for_the_registry_level_and_zstd_workers() -> None:
    zstd = BaseBackupOptions(label="x", server_compression="zstd")
    assert zstd.compression_detail(workers=True) == "level=1,workers=2"
    assert zstd.compression_detail(workers=False) == "level=1"
    for name in ("gzip", "lz4"):
        options = BaseBackupOptions(label="x", server_compression=name)
        assert options.compression_detail(workers=True) == "level=1"
    chosen = BaseBackupOptions(label="x", server_compression="gzip", compression_level=9)
    assert chosen.compression_detail(workers=False) == "level=9"
    assert BaseBackupOptions(label="x", server_compression="none").compression_detail(True) is None


# --- names and suffixes ------------------------------------------------------------------------


def test_suffixes_map_to_names_and_back() -> None:
    assert tuple(CODECS) == COMPRESSIONS == tuple(COMPRESSION_SUFFIXES)
    assert COMPRESSION_SUFFIXES == {"zstd": ".zst", "gzip": ".gz", "lz4": ".lz4", "none": ""}
    for name in COMPRESSIONS:
        suffix = compression_suffix(name)
        assert codec(name).suffix == suffix
        assert compression_of_suffix(suffix) == name
    for unknown in (".zstd", ".bz2", ".age", ".tar"):
        assert compression_of_suffix(unknown) is None
    with pytest.raises(ConfigError, match="unknown compression 'brotli': use one of zstd, gzip"):
        codec("brotli")


def test_wal_object_suffixes_are_a_compression_then_maybe_age() -> None:
    expected = {"", ".zst", ".gz", ".lz4", ".age", ".zst.age", ".gz.age", ".lz4.age"}
    assert expected == WAL_OBJECT_SUFFIXES
    layout = Layout()
    assert layout.wal_key("000000010000000000000001", "gzip", encrypted=True) == (
        "wal_archive/000000010000000000000001.gz.age"
    )


@pytest.mark.parametrize(("server_name", "expected"), [
    ("base.tar", "none"),
    ("base.tar.zst", "zstd"),
    ("16385.tar.gz", "gzip"),
    ("base.tar.lz4", "lz4"),
    ("base.tar.bz2", "none"),
    ("base.zst", "none"),
])  # fmt: skip
def test_the_servers_archive_names_say_what_it_streamed(server_name: str, expected: str) -> None:
    _, dot, suffix = server_name.partition(".")
    assert _streamed_compression(dot + suffix) == expected


def test_compressed_by() -> None:
    assert compressed_by("none", "none") == "none"
    assert compressed_by("zstd", "zstd") == "server"
    assert compressed_by("zstd", "none") == "client"


# --- damaged streams -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", COMPRESSED)
def test_a_damaged_backup_stream_is_an_integrity_error(name: str) -> None:
    """Backup streams carry a checksum: a changed byte is caught by the decoder itself."""
    with pytest.raises(IntegrityError, match=r"archive 'x' is damaged") as caught:
        _read_stream(_damaged(_backup_stream(name)), name)
    assert isinstance(caught.value.__cause__, damaged_errors(name))


@pytest.mark.parametrize("name", COMPRESSED)
def test_a_wal_object_that_is_not_its_compression_is_an_integrity_error(name: str) -> None:
    with pytest.raises(IntegrityError, match=r"archived WAL 'k' is damaged") as caught:
        decompress_wal(b"these bytes were never compressed", name, "archived WAL 'k'")
    assert isinstance(caught.value.__cause__, damaged_errors(name))


@pytest.mark.parametrize("name", ["gzip", "lz4"])
def test_a_cut_stream_is_an_integrity_error(name: str) -> None:
    stored = compress_wal(DATA, name)
    with pytest.raises(IntegrityError, match="is damaged"):
        decompress_wal(stored[: len(stored) // 2], name, "archived WAL 'k'")


def test_what_the_zstd_decoder_does_not_see_is_left_to_the_sha256_checks() -> None:
    """As open_plaintext says: a cut zstd stream ends early, and a changed byte in a frame
    without checksum (WAL) may decode to other bytes, both without an error."""
    stored = compress_wal(DATA, "zstd")
    assert DATA.startswith(decompress_wal(stored[: len(stored) // 2], "zstd", "w"))
    assert len(decompress_wal(stored[: len(stored) // 2], "zstd", "w")) < len(DATA)
    stored_lz4 = compress_wal(DATA, "lz4")
    assert decompress_wal(_damaged(stored_lz4), "lz4", "w") != DATA


def test_an_unknown_compression_cannot_be_read() -> None:
    with pytest.raises(IntegrityError, match="archive 'x' has unknown compression 'brotli'"):
        _read_stream(b"", "brotli")
    with pytest.raises(ConfigError, match="unknown compression 'brotli'"):
        compress_wal(DATA, "brotli")
    with pytest.raises(ConfigError, match="unknown compression 'brotli'"):
        stream_compressor("brotli")


# --- the option table ----------------------------------------------------------------------------


def test_the_option_table_offers_the_registry() -> None:
    assert OPTION_COMPRESSIONS == COMPRESSIONS
    for command in (BACKUP, WAL_PUSH):
        option = option_for(command, "--compression")
        assert option is not None
        assert option.choices == COMPRESSIONS
        assert option.default == DEFAULT_COMPRESSION
    level = option_for(BACKUP, "--compression-level")
    assert level is not None and level.limit is not None
    ranges = [c.levels for c in CODECS.values() if c.levels is not None]
    assert (level.limit.low, level.limit.high) == (
        min(r.start for r in ranges),
        max(r.stop - 1 for r in ranges),
    )
    assert level.range_text == describe_levels() == "zstd 1-22, gzip 1-9, lz4 1-12"


def test_a_level_the_algorithm_does_not_have_is_refused_for_the_server() -> None:
    for entry in CODECS.values():
        top = entry.levels.stop if entry.levels is not None else 1
        with pytest.raises(ConfigError, match=f"level {top} is not valid for '{entry.name}'"):
            BaseBackupOptions(label="x", server_compression=entry.name, compression_level=top)
