"""Times given with a zone on the command line, read as PostgreSQL's ``timestamptz_in`` reads
them: restore's ``--recovery-target-time`` and keep's ``--until``.

Accepted: ISO 8601 date, ``T`` or space, ``HH:MM[:SS[.ffffff]]`` (``24:00:00`` is the next
midnight), and a zone: a numeric offset (``+02``, ``+0530``, ``-07:00``, ``+05:30:15``; at most
15:59:59, PostgreSQL's limit), ``Z``, ``UTC``/``GMT``, or a full IANA zone name
(``Europe/Helsinki``, any case, converted with zoneinfo at that date; a local time that does not
exist or exists twice there is refused). A bare name such as ``EST``, ``CET`` or ``Japan`` is
refused: it is an abbreviation, or reads as one, which PostgreSQL does not read reliably (see
``coordinator.restore.targets``). A value without a zone is refused too, with the caller's
reason. Every refusal is a ``ConfigError`` (exit 3) naming the flag and the value.

The result keeps the value in a spelling PostgreSQL always accepts,
``YYYY-MM-DD HH:MM:SS[.ffffff]+HH[:MM[:SS]]``, and the instant it means.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from functools import cache

from storage.errors import ConfigError

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
TIME_FORM = "'YYYY-MM-DD HH:MM:SS[.ffffff]' with an offset or zone, e.g. '2026-03-22 14:30:00+00'"


@dataclass(frozen=True)
class ZonedTime:
    """A time with its zone: as PostgreSQL always accepts it, and the instant it means."""

    text: str
    instant: datetime  # aware, UTC


def parse_zoned_time(value: str, flag: str, *, without_zone: str) -> ZonedTime:
    """``value`` (given as ``flag``) as PostgreSQL would read it, normalised to a numeric offset.

    ``without_zone``: why a value without a zone is refused, for the message.
    """
    match = _TIME_RE.fullmatch(value.strip())
    if match is None:
        raise _bad_time(value, flag, f"use {TIME_FORM}")
    local = _local_time(value, flag, match)
    zone = match["zone"].strip()
    if not zone:
        raise _bad_time(value, flag, f"it has no time zone, {without_zone}")
    offset = _offset_of(value, flag, zone, local)
    text = local.strftime("%Y-%m-%d %H:%M:%S")
    if local.microsecond:
        text += f".{local.microsecond:06d}".rstrip("0")
    text += format_offset(offset)
    instant = local.replace(tzinfo=timezone(offset)).astimezone(UTC)
    return ZonedTime(text, instant)


def _local_time(value: str, flag: str, match: re.Match[str]) -> datetime:
    fraction = (match["f"] or "").ljust(6, "0")
    hour = int(match["h"] or 0)
    parts = (int(match["mi"] or 0), int(match["s"] or 0), int(fraction or 0))
    next_day = hour == 24 and parts == (0, 0, 0)  # PostgreSQL reads 24:00:00 as midnight after
    try:
        local = datetime(int(match["y"]), int(match["mo"]), int(match["d"]),
                         0 if next_day else hour, *parts)
    except ValueError as exc:
        raise _bad_time(value, flag, f"{exc}") from None
    return local + timedelta(days=1) if next_day else local


def _offset_of(value: str, flag: str, zone: str, local: datetime) -> timedelta:
    """The UTC offset ``zone`` means at wall-clock time ``local``."""
    if zone.lower() in _UTC_NAMES:
        return timedelta(0)
    numeric = _OFFSET_RE.fullmatch(zone)
    if numeric is not None:
        return _numeric_offset(value, flag, numeric)
    if not zone[0].isalpha():
        raise _bad_time(value, flag, f"use {TIME_FORM}")
    if "/" not in zone:
        raise _bad_time(value, flag, f"'{zone}' is a time-zone abbreviation or reads as one, "
                        "which does not name one offset reliably (PostgreSQL misreads some): use "
                        "a numeric offset such as +01 or a full zone name such as Europe/Paris")
    return _zone_offset(value, flag, _zone_named(value, flag, zone), local)


def _numeric_offset(value: str, flag: str, match: re.Match[str]) -> timedelta:
    sign = match["sign"] or match["sign2"]
    hours = int(match["h"] or match["h2"])
    minutes = int(match["m"] or match["m2"] or 0)
    seconds = int(match["s"] or match["s2"] or 0)
    if hours > _MAX_OFFSET_HOURS or minutes > 59 or seconds > 59:
        raise _bad_time(value, flag,
                        "the offset is out of range (PostgreSQL allows up to ±15:59:59)")
    offset = timedelta(hours=hours, minutes=minutes, seconds=seconds)
    return -offset if sign == "-" else offset


def _zone_named(value: str, flag: str, name: str) -> tzinfo:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    # PostgreSQL looks zone names up ignoring case; the zoneinfo files are case-sensitive.
    for candidate in (name, _zone_names_by_lower_case().get(name.lower())):
        if candidate is None:
            continue
        try:
            return ZoneInfo(candidate)
        except (ZoneInfoNotFoundError, ValueError):
            continue
    raise _bad_time(value, flag, f"unknown time zone '{name}'")


@cache
def _zone_names_by_lower_case() -> dict[str, str]:
    from zoneinfo import available_timezones

    return {name.lower(): name for name in available_timezones()}


def _zone_offset(value: str, flag: str, zone: tzinfo, local: datetime) -> timedelta:
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
        raise _bad_time(value, flag, f"{local:%Y-%m-%d %H:%M:%S} happens twice in {name} "
                        f"({format_offset(first)} and {format_offset(second)}): give the offset")
    raise _bad_time(value, flag, f"{local:%Y-%m-%d %H:%M:%S} does not exist in {name} "
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


def _bad_time(value: str, flag: str, why: str) -> ConfigError:
    return ConfigError(f"invalid {flag} '{value}': {why}")
