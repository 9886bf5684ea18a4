"""WAL file names, LSNs and segment arithmetic: the one place cloud-dump computes them.

Accepted, exactly as PostgreSQL names them:

    000000010000000A000000FF                  a segment (timeline, log, seg in hex)
    00000002.history                          a timeline history file
    000000010000000A000000FF.partial          the last, partial segment of a timeline
    000000010000000A000000FF.00000028.backup  a backup history file

Anything else is refused before any file is read: a name becomes a storage key.

An LSN is a byte position in the WAL, a 64-bit int here; as text it is two 32-bit hex words
``X/Y`` (src/backend/utils/adt/pg_lsn.c). A segment holds ``segment_size`` bytes of WAL, and
segment number ``n`` starts at LSN ``n * segment_size``. Its name spells the timeline, then ``n``
split into a "log" and a segment within that log: ``XLogSegmentsPerXLogId`` = 2^32 / size
segments per log (256 for 16 MiB). The macros this follows are in PostgreSQL's
src/include/access/xlog_internal.h (XLogFileName, XLogFromFileName, XLByteToSeg,
XLByteToPrevSeg, XLogSegmentsPerXLogId, IsValidWalSegSize), unchanged in 13-18.

Loaded by every wal-fetch call served from the spool: only ``typing`` and ``storage.errors`` on
top of ``re``; no dataclasses (see ``Segment``).
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

from storage.errors import ConfigError

WalKind = Literal["segment", "history", "partial", "backup"]

# initdb --wal-segsize accepts a power of two from 1 MiB to 1 GiB (WalSegMinSize, WalSegMaxSize
# and IsValidWalSegSize in xlog_internal.h); 16 MiB is DEFAULT_XLOG_SEG_SIZE
# (pg_config_manual.h).
MIN_SEGMENT_SIZE = 1 << 20
MAX_SEGMENT_SIZE = 1 << 30
DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
SEGMENT_SIZES = tuple(1 << shift for shift in range(20, 31))  # every valid size, ascending
MAX_LSN = (1 << 64) - 1  # XLogRecPtr is a uint64
_LOG_BYTES = 1 << 32  # WAL bytes per "log" of a name: the high word of an LSN
_MAX_WORD = 0xFFFFFFFF
_HEX = frozenset("0123456789abcdefABCDEF")

_PATTERNS: list[tuple[WalKind, re.Pattern[str]]] = [
    ("segment", re.compile(r"[0-9A-F]{24}")),
    ("history", re.compile(r"[0-9A-F]{8}\.history")),
    ("partial", re.compile(r"[0-9A-F]{24}\.partial")),
    ("backup", re.compile(r"[0-9A-F]{24}\.[0-9A-F]{8}\.backup")),
]


def wal_kind(name: str) -> WalKind:
    """The kind of WAL file ``name`` is; ``ConfigError`` if it is not a WAL file name."""
    kind = kind_of(name)
    if kind is not None:
        return kind
    raise ConfigError(
        f"invalid WAL file name '{name}': expected a segment (24 hex digits), "
        "NNNNNNNN.history, <segment>.partial or <segment>.NNNNNNNN.backup"
    )


def kind_of(name: str) -> WalKind | None:
    """The kind of WAL file ``name`` is, None if it is not a WAL file name (a directory entry
    that is something else)."""
    for kind, pattern in _PATTERNS:
        if pattern.fullmatch(name):
            return kind
    return None


def is_segment(name: str) -> bool:
    """Whether ``name`` is a WAL segment's name (24 hex digits), not any other WAL file."""
    return kind_of(name) == "segment"


# --- LSNs --------------------------------------------------------------------------------------


def parse_lsn(text: str) -> int:
    """The LSN ``text`` spells, as an int in 0..2^64-1 (bytes of WAL).

    Accepts what PostgreSQL's pg_lsn input accepts (``pg_lsn_in_internal``,
    src/backend/utils/adt/pg_lsn.c): 1 to 8 hex digits of either case, ``/``, 1 to 8 hex
    digits; the first word is the high 32 bits. Surrounding whitespace is ignored (the value
    comes from a command line or a server's reply). ``ConfigError`` ("invalid lsn '<text>'")
    otherwise.
    """
    high, slash, low = text.strip().partition("/")
    if slash and _is_hex_word(high) and _is_hex_word(low):
        return (int(high, 16) << 32) | int(low, 16)
    raise ConfigError(f"invalid lsn '{text}': expected X/Y with 1 to 8 hex digits on each side")


def format_lsn(lsn: int) -> str:
    """``lsn`` (an int in 0..2^64-1) as PostgreSQL 13-18 print a pg_lsn: ``%X/%X``, upper-case
    hex without leading zeros (``pg_lsn_out``, src/backend/utils/adt/pg_lsn.c), e.g.
    ``0/16B3748``. ``ConfigError`` if ``lsn`` is out of that range."""
    if not 0 <= lsn <= MAX_LSN:
        raise ConfigError(f"lsn {lsn} is out of range")
    return f"{lsn >> 32:X}/{lsn & _MAX_WORD:X}"


def _is_hex_word(part: str) -> bool:
    return 1 <= len(part) <= 8 and all(c in _HEX for c in part)


# --- segment sizes -----------------------------------------------------------------------------


def is_segment_size(size: int) -> bool:
    """Whether ``size`` (bytes) is a WAL segment size PostgreSQL can have: a power of two from
    1 MiB to 1 GiB (``IsValidWalSegSize``, src/include/access/xlog_internal.h; what initdb
    --wal-segsize accepts)."""
    return MIN_SEGMENT_SIZE <= size <= MAX_SEGMENT_SIZE and not size & (size - 1)


def check_segment_size(size: int) -> int:
    """``size`` (bytes) if ``is_segment_size``; ``ConfigError`` otherwise."""
    if not is_segment_size(size):
        raise ConfigError(
            f"invalid WAL segment size {size}: expected a power of two from 1 MiB to 1 GiB"
        )
    return size


def segments_per_log(segment_size: int) -> int:
    """Segments in one "log" of a segment name (the middle 8 hex digits): 2^32 / size, e.g. 256
    for 16 MiB, 4096 for 1 MiB, 4 for 1 GiB (``XLogSegmentsPerXLogId``,
    src/include/access/xlog_internal.h). ``ConfigError`` for an invalid size."""
    return _LOG_BYTES // check_segment_size(segment_size)


# --- segments ----------------------------------------------------------------------------------


# A NamedTuple, not a dataclass: immutable and ordered all the same, and importing dataclasses
# would cost every wal-fetch call served from the spool ~8 ms.
class Segment(NamedTuple):
    """A segment: its timeline and its number (``XLogSegNo``: log * segments_per_log + seg,
    which is the segment's start LSN divided by the segment size)."""

    timeline: int
    number: int

    @classmethod
    def parse(cls, name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> Segment:
        """The segment a segment, ``.partial`` or ``.backup`` name (first 24 hex digits) is, for
        ``segment_size``-byte segments (``XLogFromFileName``, src/include/access/
        xlog_internal.h). ``ConfigError`` if ``name`` is none of those, if its segment part is
        not below ``segments_per_log`` (no such segment at that size), or for an invalid size.
        """
        if wal_kind(name) not in ("segment", "partial", "backup"):
            raise ConfigError(f"'{name}' is not a WAL segment")
        timeline, log, seg = int(name[:8], 16), int(name[8:16], 16), int(name[16:24], 16)
        per_log = segments_per_log(segment_size)
        if seg >= per_log:
            raise ConfigError(f"'{name}' is not a segment name for {segment_size}-byte segments")
        return cls(timeline, log * per_log + seg)

    def name(self, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
        """The 24-hex-digit file name, ``%08X%08X%08X`` of timeline, log, seg (``XLogFileName``,
        src/include/access/xlog_internal.h). ``ConfigError`` for an invalid size; the timeline
        and number are not checked (a wrong header's may be named in a message)."""
        per_log = segments_per_log(segment_size)
        return f"{self.timeline:08X}{self.number // per_log:08X}{self.number % per_log:08X}"

    def next(self) -> Segment:
        """The segment after this one on the same timeline."""
        return Segment(self.timeline, self.number + 1)

    def start_lsn(self, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
        """The LSN of the segment's first byte, number x size (``XLogSegNoOffsetToRecPtr``
        with offset 0, src/include/access/xlog_internal.h). ``ConfigError`` for an invalid
        size."""
        return self.number * check_segment_size(segment_size)


def segment_number(lsn: int, segment_size: int) -> int:
    """The number of the segment holding the byte at ``lsn``: lsn // size (``XLByteToSeg``,
    src/include/access/xlog_internal.h). ``ConfigError`` for an LSN outside 0..2^64-1 or an
    invalid size."""
    _check_lsn(lsn)
    return lsn // check_segment_size(segment_size)


def prev_segment_number(lsn: int, segment_size: int) -> int:
    """The number of the segment holding the byte just before ``lsn``: (lsn - 1) // size
    (``XLByteToPrevSeg``, src/include/access/xlog_internal.h), the segment a record ending
    at ``lsn`` ends in. At a segment boundary that is the previous segment. ``ConfigError``
    for an LSN outside 1..2^64-1 (no byte precedes 0) or an invalid size."""
    _check_lsn(lsn)
    if lsn == 0:
        raise ConfigError("lsn 0/0 has no byte before it")
    return (lsn - 1) // check_segment_size(segment_size)


def segment_name(timeline: int, lsn: int, segment_size: int) -> str:
    """Name of the segment of ``timeline`` holding the byte at ``lsn`` (``XLByteToSeg`` then
    ``XLogFileName``): what ``pg_walfile_name(lsn)`` returns on PostgreSQL 17 and later (13-16
    use ``XLByteToPrevSeg`` there, so they differ at a segment boundary: see
    ``prev_segment_name``; src/backend/access/transam/xlogfuncs.c). ``ConfigError`` for a
    timeline outside 0..2^32-1, an LSN outside 0..2^64-1 or an invalid size."""
    _check_timeline(timeline)
    return Segment(timeline, segment_number(lsn, segment_size)).name(segment_size)


def prev_segment_name(timeline: int, lsn: int, segment_size: int) -> str:
    """Name of the segment of ``timeline`` holding the byte just before ``lsn``
    (``XLByteToPrevSeg`` then ``XLogFileName``): the last segment a backup or record ending at
    ``lsn`` needs, and what ``pg_walfile_name(lsn)`` returns on PostgreSQL 13-16.
    ``ConfigError`` as ``prev_segment_number``, or for a timeline outside 0..2^32-1."""
    _check_timeline(timeline)
    return Segment(timeline, prev_segment_number(lsn, segment_size)).name(segment_size)


def following_names(name: str, count: int, segment_size: int) -> list[str]:
    """Names of the ``count`` segments after segment ``name`` (or ``.partial``/``.backup``
    name) on its timeline, in order. ``ConfigError`` as ``Segment.parse``."""
    segment = Segment.parse(name, segment_size)
    names = []
    for _ in range(count):
        segment = segment.next()
        names.append(segment.name(segment_size))
    return names


def timeline_prefix(name: str) -> str:
    """The timeline part of a WAL file name: its first 8 hex digits (``%08X`` of the timeline in
    ``XLogFileName`` and ``TLHistoryFileName``). Names sharing it are of one timeline. Not
    validated: for names already checked with ``kind_of``/``wal_kind`` (called per spool entry)."""
    return name[:8]


def log_prefix(name: str) -> str:
    """The timeline and log parts of a segment name: its first 16 hex digits. Segments sharing it
    are one log of one timeline (``segments_per_log`` of them); a listing prefix. Not validated,
    as ``timeline_prefix``."""
    return name[:16]


def next_log_prefix(name: str) -> str:
    """``log_prefix`` of the log after the one segment ``name`` is in, on the same timeline (the
    next 4 GiB of WAL, whatever the segment size). Not validated, as ``log_prefix``."""
    return f"{name[:8]}{int(name[8:16], 16) + 1:08X}"


def _check_lsn(lsn: int) -> None:
    if not 0 <= lsn <= MAX_LSN:
        raise ConfigError(f"lsn {lsn} is out of range")


def _check_timeline(timeline: int) -> None:
    if not 0 <= timeline <= _MAX_WORD:
        raise ConfigError(f"timeline {timeline} is out of range")
