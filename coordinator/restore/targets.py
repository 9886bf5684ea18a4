"""Recovery target values: read as PostgreSQL reads them, written in a spelling it always accepts.

PostgreSQL checks ``recovery_target_*`` when it loads its configuration, before the time-zone
abbreviation table is loaded, so some spellings it accepts elsewhere make the server refuse to
start (``invalid value for parameter "recovery_target_time"``), and others pass that check but
are read differently once recovery runs (a bare ``CET`` is the zone CET when checked and the
abbreviation CET, always +01, when used). Restore therefore never writes what it was given: it
parses each value here and writes the normalised form, or refuses before downloading anything
(``ConfigError``, exit 3, naming the value).

Time (``check_recovery_target_time``, then ``timestamptz_in``): ISO 8601 date, ``T`` or space,
``HH:MM[:SS[.ffffff]]`` (``24:00:00`` is the next midnight), and a zone: a numeric offset
(``+02``, ``+0530``, ``-07:00``, ``+05:30:15``; at most 15:59:59, PostgreSQL's limit), ``Z``,
``UTC``/``GMT``, or a full IANA zone name (``Europe/Helsinki``, any case, converted with
zoneinfo at that date; a local time that does not exist or exists twice there is refused). A
bare name such as ``EST``, ``CET`` or ``Japan`` is refused: it is an abbreviation, or reads as
one. A value without a zone is refused: PostgreSQL would read it in the server's TimeZone,
which restore cannot know before the data is on disk (it is in the backed-up configuration, or
on the server's command line), and the target could not be compared with the backup's end.
Written as ``YYYY-MM-DD HH:MM:SS[.ffffff]+HH[:MM[:SS]]``.

LSN (``pg_lsn_in``): ``X/X`` with 1-8 hex digits each side, written as PostgreSQL prints it
(upper case, no leading zeros). Xid (``strtou64`` cast to a 32-bit TransactionId): decimal,
and an epoch-qualified 64-bit id (``pg_current_xact_id()``) stands for its low 32 bits, which
is what the server compares; ids 0-2 are never a transaction's. Name: 1-63 bytes
(``MAXFNAMELEN - 1``, as ``pg_create_restore_point`` allows), no control characters. Timeline:
``latest``, ``current`` or a number 1..2^32-1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from functools import cache

from storage import walnames
from storage.errors import ConfigError
from storage.walnames import format_lsn as format_lsn  # how restore writes an LSN

MAX_RESTORE_POINT_NAME_BYTES = 63  # MAXFNAMELEN - 1
FIRST_NORMAL_XID = 3
MAX_TIMELINE = 2**32 - 1
_MAX_OFFSET_HOURS = 15  # MAX_TZDISP_HOUR in PostgreSQL's datetime.c
_UTC_NAMES = frozenset({"z", "utc", "gmt"})

_TIME_RE = re.compile(
    r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})"
    r"(?:(?:\s+|T)(?P<h>\d{1,2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?:\.(?P<f>\d{1,6}))?)?)?"
    r"\s*(?P<zone>.*)",
    re.ASCII,
)
_OFFSET_RE = re.compile(
    r"(?P<sign>[+-])(?P<h>\d{1,2})(?::(?P<m>\d{2})(?::(?P<s>\d{2}))?)?"
    r"|(?P<sign2>[+-])(?P<h2>\d{2})(?P<m2>\d{2})(?P<s2>\d{2})?",
    re.ASCII,
)
_TIME_FORM = "'YYYY-MM-DD HH:MM:SS[.ffffff]' with an offset or zone, e.g. '2026-03-22 14:30:00+00'"


@dataclass(frozen=True)
class TargetTime:
    """A recovery target time: what restore writes, and the instant it means."""

    text: str
    instant: datetime  # aware, UTC


def parse_target_time(value: str) -> TargetTime:
    """``value`` as PostgreSQL would read it, normalised to a numeric offset."""
    match = _TIME_RE.fullmatch(value.strip())
    if match is None:
        raise _bad_time(value, f"use {_TIME_FORM}")
    local = _local_time(value, match)
    zone = match["zone"].strip()
    if not zone:
        raise _bad_time(value, "it has no time zone, so PostgreSQL would read it in the "
                        "server's TimeZone setting, which restore cannot know: add an offset "
                        "such as +00 or a zone name such as Europe/Helsinki")
    offset = _offset_of(value, zone, local)
    text = local.strftime("%Y-%m-%d %H:%M:%S")
    if local.microsecond:
        text += f".{local.microsecond:06d}".rstrip("0")
    text += format_offset(offset)
    instant = local.replace(tzinfo=timezone(offset)).astimezone(UTC)
    return TargetTime(text, instant)


def _local_time(value: str, match: re.Match[str]) -> datetime:
    fraction = (match["f"] or "").ljust(6, "0")
    hour = int(match["h"] or 0)
    parts = (int(match["mi"] or 0), int(match["s"] or 0), int(fraction or 0))
    next_day = hour == 24 and parts == (0, 0, 0)  # PostgreSQL reads 24:00:00 as midnight after
    try:
        local = datetime(int(match["y"]), int(match["mo"]), int(match["d"]),
                         0 if next_day else hour, *parts)
    except ValueError as exc:
        raise _bad_time(value, f"{exc}") from None
    return local + timedelta(days=1) if next_day else local


def _offset_of(value: str, zone: str, local: datetime) -> timedelta:
    """The UTC offset ``zone`` means at wall-clock time ``local``."""
    if zone.lower() in _UTC_NAMES:
        return timedelta(0)
    numeric = _OFFSET_RE.fullmatch(zone)
    if numeric is not None:
        return _numeric_offset(value, numeric)
    if not zone[0].isalpha():
        raise _bad_time(value, f"use {_TIME_FORM}")
    if "/" not in zone:
        raise _bad_time(value, f"'{zone}' is a time-zone abbreviation or reads as one, which "
                        "PostgreSQL does not accept reliably in recovery_target_time: use a "
                        "numeric offset such as +01 or a full zone name such as Europe/Paris")
    return _zone_offset(value, _zone_named(value, zone), local)


def _numeric_offset(value: str, match: re.Match[str]) -> timedelta:
    sign = match["sign"] or match["sign2"]
    hours = int(match["h"] or match["h2"])
    minutes = int(match["m"] or match["m2"] or 0)
    seconds = int(match["s"] or match["s2"] or 0)
    if hours > _MAX_OFFSET_HOURS or minutes > 59 or seconds > 59:
        raise _bad_time(value, "the offset is out of range (PostgreSQL allows up to ±15:59:59)")
    offset = timedelta(hours=hours, minutes=minutes, seconds=seconds)
    return -offset if sign == "-" else offset


def _zone_named(value: str, name: str) -> tzinfo:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    # PostgreSQL looks zone names up ignoring case; the zoneinfo files are case-sensitive.
    for candidate in (name, _zone_names_by_lower_case().get(name.lower())):
        if candidate is None:
            continue
        try:
            return ZoneInfo(candidate)
        except (ZoneInfoNotFoundError, ValueError):
            continue
    raise _bad_time(value, f"unknown time zone '{name}'")


@cache
def _zone_names_by_lower_case() -> dict[str, str]:
    from zoneinfo import available_timezones

    return {name.lower(): name for name in available_timezones()}


def _zone_offset(value: str, zone: tzinfo, local: datetime) -> timedelta:
    """The offset of ``local`` in ``zone``; refused where the wall clock is ambiguous or skipped."""
    earlier = local.replace(tzinfo=zone, fold=0)
    later = local.replace(tzinfo=zone, fold=1)
    first, second = earlier.utcoffset(), later.utcoffset()
    assert first is not None and second is not None
    if first == second:
        return first
    exists = earlier.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == local
    name = str(zone)
    if exists:
        raise _bad_time(value, f"{local:%Y-%m-%d %H:%M:%S} happens twice in {name} "
                        f"({format_offset(first)} and {format_offset(second)}): give the offset")
    raise _bad_time(value, f"{local:%Y-%m-%d %H:%M:%S} does not exist in {name} "
                    "(the clocks skipped it): give the offset")


def format_offset(offset: timedelta) -> str:
    """``+HH``, ``+HH:MM`` or ``+HH:MM:SS``, as PostgreSQL prints offsets."""
    sign = "-" if offset < timedelta(0) else "+"
    seconds = abs(int(offset.total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{sign}{hours:02d}"
    if minutes or secs:
        text += f":{minutes:02d}"
    if secs:
        text += f":{secs:02d}"
    return text


def _bad_time(value: str, why: str) -> ConfigError:
    return ConfigError(f"invalid --recovery-target-time '{value}': {why}")


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
