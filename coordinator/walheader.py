"""What the first page header of a WAL segment says about it: its cluster and its place.

Shared by wal-push (refuse to archive a segment under another segment's name) and wal-fetch
(refuse to hand PostgreSQL such a segment: replay would stop at it, reading "unexpected
pageaddr" as the end of WAL, and the server would promote early). Only ``struct`` at import:
both commands run once per segment.

Layout (``XLogLongPageHeaderData``, PostgreSQL's access/xlog_internal.h, unchanged in 13-18):
the short header ``xlp_magic`` (2 bytes), ``xlp_info`` (2), ``xlp_tli`` (4), ``xlp_pageaddr``
(8), ``xlp_rem_len`` (4, then 4 of padding), then ``xlp_sysid`` (8), ``xlp_seg_size`` (4) and
``xlp_xlog_blcksz`` (4). Little-endian: the byte order of the server that wrote it, x86 and
arm64 alike.
"""

from __future__ import annotations

import struct

from storage.errors import ConfigError, IntegrityError

XLP_LONG_HEADER = 0x0002
LONG_HEADER_BYTES = 40


def segment_system_identifier(data: bytes, file_name: str) -> int:
    """``xlp_sysid`` of the segment's first page; ``IntegrityError`` if it is not a segment
    (no long page header, or a size other than the one its header gives)."""
    if len(data) < LONG_HEADER_BYTES:
        raise IntegrityError(f"WAL file '{file_name}' is too short ({len(data)} bytes)")
    info = struct.unpack_from("<H", data, 2)[0]
    sysid, seg_size = struct.unpack_from("<QI", data, 24)
    if not info & XLP_LONG_HEADER or sysid == 0:
        raise IntegrityError(f"WAL file '{file_name}' does not start with a WAL page header")
    if len(data) != seg_size:
        raise IntegrityError(
            f"WAL file '{file_name}' is {len(data)} bytes but its header says {seg_size}"
        )
    return int(sysid)


def segment_address_mismatch(data: bytes, file_name: str) -> str | None:
    """None when the segment's first page is where its name says; else what it holds instead.

    ``xlp_pageaddr`` of the first page is the LSN the segment starts at (segment number x
    ``xlp_seg_size``). The timeline in the header is not compared: the first segment of a new
    timeline is a copy of the old timeline's and keeps its header. Call after
    ``segment_system_identifier``, which checks the header and the size.
    """
    from storage.walnames import Segment, format_lsn, segment_number

    tli, pageaddr = struct.unpack_from("<IQ", data, 4)
    seg_size = struct.unpack_from("<I", data, 32)[0]
    try:
        expected = Segment.parse(file_name, seg_size).start_lsn(seg_size)
    except ConfigError as exc:
        raise IntegrityError(f"WAL file '{file_name}': {exc}") from None
    if pageaddr == expected:
        return None
    held = Segment(tli, segment_number(pageaddr, seg_size)).name(seg_size)
    return (f"holds segment {held} (its first page is at {format_lsn(pageaddr)}, not "
            f"{format_lsn(expected)})")
