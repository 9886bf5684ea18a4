"""WAL file names: what archive_command may hand us, and segment arithmetic.

Accepted, exactly as PostgreSQL names them:

    000000010000000A000000FF                  a segment (timeline, log, seg in hex)
    00000002.history                          a timeline history file
    000000010000000A000000FF.partial          the last, partial segment of a timeline
    000000010000000A000000FF.00000028.backup  a backup history file

Anything else is refused before any file is read: a name becomes a storage key.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

from storage.errors import ConfigError

WalKind = Literal["segment", "history", "partial", "backup"]

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024

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


# A NamedTuple, not a dataclass: immutable and ordered all the same, and importing dataclasses
# would cost every wal-fetch call served from the spool ~8 ms.
class Segment(NamedTuple):
    timeline: int
    number: int  # position in the WAL, in segments: log * segments_per_log + seg

    @classmethod
    def parse(cls, name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> Segment:
        if wal_kind(name) not in ("segment", "partial", "backup"):
            raise ConfigError(f"'{name}' is not a WAL segment")
        timeline, log, seg = int(name[:8], 16), int(name[8:16], 16), int(name[16:24], 16)
        per_log = _segments_per_log(segment_size)
        if seg >= per_log:
            raise ConfigError(f"'{name}' is not a segment name for {segment_size}-byte segments")
        return cls(timeline, log * per_log + seg)

    def name(self, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
        per_log = _segments_per_log(segment_size)
        return f"{self.timeline:08X}{self.number // per_log:08X}{self.number % per_log:08X}"

    def next(self) -> Segment:
        return Segment(self.timeline, self.number + 1)


def _segments_per_log(segment_size: int) -> int:
    if segment_size <= 0 or segment_size & (segment_size - 1):
        raise ConfigError(f"invalid WAL segment size {segment_size}")
    return 0x1_0000_0000 // segment_size
