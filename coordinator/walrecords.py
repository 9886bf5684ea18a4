"""Walking the records of archived WAL: where each begins and ends, and the time of transactions.

``cloud-dump info`` reads the newest archived segments to say how far a restore reaches: the
last complete record (what ``recovery_target_lsn`` can name) and the times of the last commit
and abort records (what ``recovery_target_time`` is compared with). Only ``struct`` and
``crc32c`` (a dependency already, for the backup pipeline) are imported.

The format (PostgreSQL 13-18 alike; src/include/access/xlog_internal.h, xlogrecord.h, xact.h):

- WAL is cut into pages of ``XLOG_BLCKSZ`` (8192) bytes. Each page starts with a header:
  ``XLogPageHeaderData`` (``xlp_magic`` u16, ``xlp_info`` u16, ``xlp_tli`` u32,
  ``xlp_pageaddr`` u64, ``xlp_rem_len`` u32; 24 bytes with padding), or on a segment's first
  page the long header (40 bytes: ``coordinator.walheader``). ``XLP_FIRST_IS_CONTRECORD`` in
  ``xlp_info`` says the page begins with ``xlp_rem_len`` bytes of a record begun earlier.
- A record (``XLogRecord``: ``xl_tot_len`` u32, ``xl_xid`` u32, ``xl_prev`` u64, ``xl_info``
  u8, ``xl_rmid`` u8, 2 bytes padding, ``xl_crc`` u32; 24 bytes) starts at a MAXALIGNed (8)
  position and may run over any number of page boundaries, its header included. ``xl_crc`` is
  CRC-32C over the rest of the record, then over the header up to ``xl_crc``.
- After the header: block reference headers (block id 0-32, each with its image and relation
  parts), then ``XLR_BLOCK_ID_ORIGIN`` (253, 2 bytes), ``XLR_BLOCK_ID_TOPLEVEL_XID`` (252,
  4 bytes), ``XLR_BLOCK_ID_DATA_SHORT`` (255, u8 length) or ``_DATA_LONG`` (254, u32 length);
  then the block data in order, then the record's main data.
- ``RM_XACT_ID`` (1) commit and abort records (``xl_info & 0x70``: COMMIT 0x00, ABORT 0x20,
  COMMIT_PREPARED 0x30, ABORT_PREPARED 0x40) begin their main data with ``xact_time``: int64
  microseconds since 2000-01-01 00:00 UTC. ``RM_XLOG_ID`` (0) ``XLOG_SWITCH`` (0x40) ends the
  segment: the rest of it is unused.

A walk stops at the first thing that is not a valid record (a page whose address is not where
it is, a record whose ``xl_prev`` or CRC does not match, or one running past the bytes given):
what follows is not WAL a recovery would replay.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import crc32c

PAGE_BYTES = 8192  # XLOG_BLCKSZ
SHORT_PAGE_HEADER_BYTES = 24  # MAXALIGN(SizeOfXLogShortPHD)
LONG_PAGE_HEADER_BYTES = 40  # MAXALIGN(SizeOfXLogLongPHD)
RECORD_HEADER_BYTES = 24  # SizeOfXLogRecord
XLP_FIRST_IS_CONTRECORD = 0x0001
XLP_LONG_HEADER = 0x0002
RM_XLOG_ID, RM_XACT_ID = 0, 1
XLOG_SWITCH = 0x40
XLOG_XACT_OPMASK = 0x70
XACT_TIMED = {0x00: "commit", 0x20: "abort", 0x30: "commit prepared", 0x40: "abort prepared"}
XLR_MAX_BLOCK_ID = 32
XLR_BLOCK_ID_DATA_SHORT, XLR_BLOCK_ID_DATA_LONG = 255, 254
XLR_BLOCK_ID_ORIGIN, XLR_BLOCK_ID_TOPLEVEL_XID = 253, 252
BKPBLOCK_HAS_IMAGE, BKPBLOCK_SAME_REL = 0x10, 0x80
BKPIMAGE_HAS_HOLE = 0x01
# Whether an image is compressed: PostgreSQL 15 changed the bits (BKPIMAGE_COMPRESS_PGLZ, _LZ4,
# _ZSTD); 13 and 14 had one, BKPIMAGE_IS_COMPRESSED. Told apart by the page magic, which every
# major changes (XLOG_PAGE_MAGIC: 0xD110 in 15).
PG15_PAGE_MAGIC = 0xD110
_COMPRESSED_SINCE_15, _COMPRESSED_BEFORE_15 = 0x04 | 0x08 | 0x10, 0x02
POSTGRES_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


class WalRecord(NamedTuple):
    """One complete record: ``lsn`` where it begins, ``end_lsn`` just after its last byte
    (``EndRecPtr``, before alignment), its resource manager and info bits; ``xact_time`` for a
    commit or abort record (else None)."""

    lsn: int
    end_lsn: int
    rmid: int
    info: int
    xact_time: datetime | None

    @property
    def is_switch(self) -> bool:
        return self.rmid == RM_XLOG_ID and self.info & 0xF0 == XLOG_SWITCH


class _Reader:
    """Logical bytes of WAL over ``data`` (whole segments from ``start_lsn``), page headers
    skipped and checked."""

    def __init__(self, data: bytes, start_lsn: int, segment_bytes: int) -> None:
        self.data = data
        self.start_lsn = start_lsn
        self.segment_bytes = segment_bytes
        self.magic = struct.unpack_from("<H", data, 0)[0] if len(data) >= 2 else 0

    def page_header(self, offset: int) -> tuple[int, int, int] | None:
        """``(header bytes, xlp_info, xlp_rem_len)`` of the page at ``offset``; None if it is
        not a valid page of this WAL where it lies."""
        if offset + SHORT_PAGE_HEADER_BYTES > len(self.data):
            return None
        magic, info, _tli, pageaddr, rem_len = struct.unpack_from("<HHIQI", self.data, offset)
        if magic != self.magic or pageaddr != self.start_lsn + offset:
            return None
        size = LONG_PAGE_HEADER_BYTES if info & XLP_LONG_HEADER else SHORT_PAGE_HEADER_BYTES
        return size, info, rem_len

    def read(self, offset: int, count: int) -> tuple[bytes, int] | None:
        """``count`` logical bytes from ``offset`` (never on a page header) and the offset after
        them; None when they run past the data or into a page that does not continue them."""
        parts: list[bytes] = []
        while count > 0:
            if offset % PAGE_BYTES == 0:
                header = self.page_header(offset)
                if header is None or not header[1] & XLP_FIRST_IS_CONTRECORD:
                    return None
                offset += header[0]
            take = min(PAGE_BYTES - offset % PAGE_BYTES, count)
            if offset + take > len(self.data):
                return None
            parts.append(self.data[offset:offset + take])
            offset, count = offset + take, count - take
        return b"".join(parts), offset


def walk_records(data: bytes, start_lsn: int, segment_bytes: int) -> Iterator[WalRecord]:
    """The complete records in ``data``: whole segments of WAL (``segment_bytes`` each,
    contiguous) beginning at LSN ``start_lsn``, a segment start. A record continued from before
    ``start_lsn`` is skipped; the walk ends at the first invalid or incomplete record."""
    reader = _Reader(data, start_lsn, segment_bytes)
    header = reader.page_header(0)
    if header is None:
        return
    after: int | None = header[0]
    if header[1] & XLP_FIRST_IS_CONTRECORD:
        after = _after_continuation(reader, header[0], header[2])
    prev: int | None = None
    while after is not None:
        offset = _record_start(reader, after)
        if offset is None:
            return
        lsn = start_lsn + offset
        head = reader.read(offset, RECORD_HEADER_BYTES)
        if head is None:
            return
        tot_len, _xid, xl_prev, info, rmid, _pad, crc = struct.unpack("<IIQBBHI", head[0])
        if tot_len < RECORD_HEADER_BYTES or (prev is not None and xl_prev != prev):
            return
        body = reader.read(head[1], tot_len - RECORD_HEADER_BYTES)
        if body is None or crc32c.crc32c(head[0][:20], crc32c.crc32c(body[0])) != crc:
            return
        record = WalRecord(lsn, start_lsn + body[1], rmid, info,
                           _xact_time(body[0], rmid, info, reader.magic))  # fmt: skip
        yield record
        prev, after = lsn, body[1]
        if record.is_switch:  # the rest of the segment is unused
            after = _next_segment(reader, after)


def _next_segment(reader: _Reader, offset: int) -> int | None:
    """The offset of the first record position of the segment after the one ``offset`` is in;
    None when the data ends there."""
    offset += -offset % reader.segment_bytes
    page = reader.page_header(offset)
    return None if page is None else offset + page[0]


def _after_continuation(reader: _Reader, offset: int, rem_len: int) -> int | None:
    """The offset after the ``rem_len`` bytes of a record begun before the data."""
    skipped = reader.read(offset, rem_len) if rem_len else (b"", offset)
    return None if skipped is None else skipped[1]


def _record_start(reader: _Reader, offset: int) -> int | None:
    """``offset`` MAXALIGNed, past a page header if it falls on a page's start."""
    offset += -offset % 8
    if offset % PAGE_BYTES == 0:
        header = reader.page_header(offset)
        if header is None:
            return None
        if header[1] & XLP_FIRST_IS_CONTRECORD:
            return None  # a record we did not see begin: not this WAL's continuation
        offset += header[0]
    return offset


def _xact_time(body: bytes, rmid: int, info: int, magic: int) -> datetime | None:
    """``xact_time`` of a commit or abort record (``body``: the record after its header)."""
    if rmid != RM_XACT_ID or info & XLOG_XACT_OPMASK not in XACT_TIMED:
        return None
    main = main_data(body, magic)
    if main is None or len(main) < 8:
        return None
    micros = struct.unpack_from("<q", main, 0)[0]
    return POSTGRES_EPOCH + timedelta(microseconds=micros)


def main_data(body: bytes, magic: int) -> bytes | None:
    """The main data of a record (``body``: after its 24-byte header), found by walking its
    block reference headers (``DecodeXLogRecord``, src/backend/access/transam/xlogreader.c);
    None when the headers do not add up."""
    compressed = _COMPRESSED_SINCE_15 if magic >= PG15_PAGE_MAGIC else _COMPRESSED_BEFORE_15
    pos, payload, main_len = 0, 0, 0
    while pos < len(body):
        block_id = body[pos]
        if block_id == XLR_BLOCK_ID_DATA_SHORT:
            main_len, pos = body[pos + 1], pos + 2
            break
        if block_id == XLR_BLOCK_ID_DATA_LONG:
            main_len, pos = struct.unpack_from("<I", body, pos + 1)[0], pos + 5
            break
        if block_id == XLR_BLOCK_ID_ORIGIN:
            pos += 1 + 2
        elif block_id == XLR_BLOCK_ID_TOPLEVEL_XID:
            pos += 1 + 4
        elif block_id <= XLR_MAX_BLOCK_ID:
            fork_flags, data_length = struct.unpack_from("<BH", body, pos + 1)
            pos += 4
            payload += data_length
            if fork_flags & BKPBLOCK_HAS_IMAGE:
                image_length, _hole_offset, bimg_info = struct.unpack_from("<HHB", body, pos)
                pos += 5
                payload += image_length
                if bimg_info & BKPIMAGE_HAS_HOLE and bimg_info & compressed:
                    pos += 2  # XLogRecordBlockCompressHeader: hole_length
            if not fork_flags & BKPBLOCK_SAME_REL:
                pos += 12  # RelFileLocator (RelFileNode before 16): three Oids
            pos += 4  # BlockNumber
        else:
            return None
    start = pos + payload
    if start + main_len != len(body):
        return None
    return body[start:]


def segment_is_whole(data: bytes, start_lsn: int) -> bool:
    """Whether ``data``, one WAL segment beginning at LSN ``start_lsn``, holds WAL to its end:
    every page is a valid page of it, or its records reach an ``XLOG_SWITCH``.

    After a switch record PostgreSQL zeroes the rest of the segment, page headers included
    (``CopyXLogRecordToWAL``), so a switched segment is whole without its later pages; one that
    was still being written (the last segment of a backup taken on a standby, a recycled file)
    has pages that are zeros or another segment's.
    """
    reader = _Reader(data, start_lsn, len(data))
    if all(reader.page_header(o) is not None for o in range(0, len(data), PAGE_BYTES)):
        return True
    return any(record.is_switch for record in walk_records(data, start_lsn, len(data)))

