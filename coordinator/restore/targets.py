"""Recovery target values: read as PostgreSQL reads them, written in a spelling it always accepts.

PostgreSQL checks ``recovery_target_*`` when it loads its configuration, before the time-zone
abbreviation table is loaded, so some spellings it accepts elsewhere make the server refuse to
start (``invalid value for parameter "recovery_target_time"``), and others pass that check but
are read differently once recovery runs (a bare ``CET`` is the zone CET when checked and the
abbreviation CET, always +01, when used). Restore therefore never writes what it was given: it
parses each value here and writes the normalised form, or refuses before downloading anything
(``ConfigError``, exit 3, naming the value).

Time (``check_recovery_target_time``, then ``timestamptz_in``): what ``coordinator.zonedtime``
reads (shared with ``keep --until``): ISO 8601 date and time with a numeric offset, ``Z``,
``UTC``/``GMT`` or a full IANA zone name; a bare name such as ``EST``, ``CET`` or ``Japan`` is
refused: it is an abbreviation, or reads as one. A value without a zone is refused: PostgreSQL
would read it in the server's TimeZone, which restore cannot know before the data is on disk
(it is in the backed-up configuration, or on the server's command line), and the target could
not be compared with the backup's end. Written as ``YYYY-MM-DD HH:MM:SS[.ffffff]+HH[:MM[:SS]]``.

LSN (``pg_lsn_in``): ``X/X`` with 1-8 hex digits each side, written as PostgreSQL prints it
(upper case, no leading zeros). Xid (``strtou64`` cast to a 32-bit TransactionId): decimal,
and an epoch-qualified 64-bit id (``pg_current_xact_id()``) stands for its low 32 bits, which
is what the server compares; ids 0-2 are never a transaction's. Name: 1-63 bytes
(``MAXFNAMELEN - 1``, as ``pg_create_restore_point`` allows), no control characters. Timeline:
``latest``, ``current`` or a number 1..2^32-1.
"""

from __future__ import annotations

from datetime import UTC, datetime

from coordinator.zonedtime import ZonedTime, parse_zoned_time
from storage import walnames
from storage.errors import ConfigError
from storage.walnames import format_lsn as format_lsn  # how restore writes an LSN

MAX_RESTORE_POINT_NAME_BYTES = 63  # MAXFNAMELEN - 1
FIRST_NORMAL_XID = 3
MAX_TIMELINE = 2**32 - 1


TargetTime = ZonedTime  # a recovery target time: what restore writes, the instant it means


def parse_target_time(value: str) -> TargetTime:
    """``value`` as PostgreSQL would read it, normalised to a numeric offset
    (``coordinator.zonedtime``, shared with ``keep --until``)."""
    return parse_zoned_time(
        value, "--recovery-target-time",
        without_zone="so PostgreSQL would read it in the server's TimeZone setting, which "
        "restore cannot know: add an offset such as +00 or a zone name such as Europe/Helsinki",
    )  # fmt: skip


# --- LSN, xid, restore point name, timeline ----------------------------------------------


def parse_lsn(value: str) -> int:
    """``--recovery-target-lsn``'s value as PostgreSQL's pg_lsn reads it, an int in 0..2^64-1
    (``storage.walnames.parse_lsn``); ``ConfigError`` naming the flag otherwise."""
    try:
        return walnames.parse_lsn(value)
    except ConfigError:
        raise ConfigError(f"invalid --recovery-target-lsn '{value}': expected an LSN like "
                          "0/16B3748 (1-8 hex digits on each side of '/')") from None


def normalize_xid(value: str) -> str:
    """The 32-bit transaction id the server compares, in decimal."""
    text = value.strip()
    if not text.isdigit() or not text.isascii() or int(text) >= 2**64:
        raise ConfigError(f"invalid --recovery-target-xid '{value}': expected a transaction id "
                          "in decimal (as txid_current() or pg_current_xact_id() show it)")
    xid = int(text) & 0xFFFFFFFF  # an epoch-qualified id: the server keeps the low 32 bits
    if xid < FIRST_NORMAL_XID:
        raise ConfigError(f"invalid --recovery-target-xid '{value}': transaction id {xid} is "
                          "never a transaction's (the first normal id is 3)")
    return str(xid)


def check_restore_point_name(value: str) -> str:
    size = len(value.encode())
    if not 0 < size <= MAX_RESTORE_POINT_NAME_BYTES:
        raise ConfigError(f"invalid --recovery-target-name '{value}': a restore point name has "
                          f"1 to {MAX_RESTORE_POINT_NAME_BYTES} bytes, this one {size}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(f"invalid --recovery-target-name {value!r}: control characters "
                          "cannot be written to postgresql.auto.conf")
    return value


def normalize_timeline(value: str) -> str:
    text = value.strip().lower()
    if text in ("latest", "current"):
        return text
    if text.isdigit() and text.isascii() and 0 < int(text) <= MAX_TIMELINE:
        return str(int(text))
    raise ConfigError(f"invalid --recovery-target-timeline '{value}': use latest, current or a "
                      "timeline number")


def timeline_number(value: str | None) -> int | None:
    """The numeric timeline of a normalised ``recovery_target_timeline``, else None."""
    return int(value) if value is not None and value.isdigit() else None


def utc_text(when: datetime) -> str:
    """How restore names an instant in its messages (a naive time is taken as UTC)."""
    aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
