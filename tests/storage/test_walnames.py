"""LSN and segment arithmetic (storage.walnames) against what PostgreSQL itself answers.

The expected values were read from running servers: ``pg_walfile_name`` (13.23, 16.14 and 18.4
at 16 MiB segments; 15.18 and 17.10 at initdb --wal-segsize 1, 16 and 1024), ``'...'::pg_lsn``
printed (15, 17, 18), ``pg_input_is_valid(..., 'pg_lsn')`` for what pg_lsn refuses and
``pg_split_walfile_name`` for a name's segment number (17). ``pg_walfile_name`` is
``XLByteToPrevSeg`` on 13-16 and ``XLByteToSeg`` on 17 and later: the two differ only at a
segment boundary, which is what ``prev_segment_name`` and ``segment_name`` compute.
"""

from __future__ import annotations

import pytest

from storage.errors import ConfigError
from storage.walnames import (
    DEFAULT_SEGMENT_SIZE,
    SEGMENT_SIZES,
    Segment,
    check_segment_size,
    following_names,
    format_lsn,
    is_segment_size,
    log_prefix,
    next_log_prefix,
    parse_lsn,
    prev_segment_name,
    prev_segment_number,
    segment_name,
    segment_number,
    segments_per_log,
    timeline_prefix,
)

MIB = 1024 * 1024
GIB = 1024 * MIB

# (LSN, segment size, pg_walfile_name on 17+ = XLByteToSeg, pg_walfile_name on 13-16 =
# XLByteToPrevSeg), timeline 1.
SERVER_NAMES = [
    ("0/1000000", 16 * MIB, "000000010000000000000001", "000000010000000000000000"),
    ("0/FFFFFF", 16 * MIB, "000000010000000000000000", "000000010000000000000000"),
    ("0/1000001", 16 * MIB, "000000010000000000000001", "000000010000000000000001"),
    ("0/D3DA3C8", 16 * MIB, "00000001000000000000000D", "00000001000000000000000D"),
    ("1/0", 16 * MIB, "000000010000000100000000", "0000000100000000000000FF"),
    ("0/FFFFFFFF", 16 * MIB, "0000000100000000000000FF", "0000000100000000000000FF"),
    ("5/40000000", 16 * MIB, "000000010000000500000040", "00000001000000050000003F"),
    ("AB/CD000000", 16 * MIB, "00000001000000AB000000CD", "00000001000000AB000000CC"),
    ("FFFFFFFF/FFFFFFFF", 16 * MIB, "00000001FFFFFFFF000000FF", "00000001FFFFFFFF000000FF"),
    ("0/100000", 1 * MIB, "000000010000000000000001", "000000010000000000000000"),
    ("0/FFFFF", 1 * MIB, "000000010000000000000000", "000000010000000000000000"),
    ("0/1000000", 1 * MIB, "000000010000000000000010", "00000001000000000000000F"),
    ("1/0", 1 * MIB, "000000010000000100000000", "000000010000000000000FFF"),
    ("AB/CD000000", 1 * MIB, "00000001000000AB00000CD0", "00000001000000AB00000CCF"),
    ("0/40000000", 1 * GIB, "000000010000000000000001", "000000010000000000000000"),
    ("0/FFFFFFFF", 1 * GIB, "000000010000000000000003", "000000010000000000000003"),
    ("5/40000000", 1 * GIB, "000000010000000500000001", "000000010000000500000000"),
    ("FFFFFFFF/FFFFFFFF", 1 * GIB, "00000001FFFFFFFF00000003", "00000001FFFFFFFF00000003"),
]


# --- LSNs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "printed"),
    [
        ("0/16B3748", "0/16B3748"),
        ("00000000/016b3748", "0/16B3748"),  # leading zeros dropped, upper case
        ("ab/cd", "AB/CD"),
        ("0/0", "0/0"),
        ("FFFFFFFF/FFFFFFFF", "FFFFFFFF/FFFFFFFF"),
    ],
)
def test_an_lsn_reads_and_prints_as_pg_lsn_does(text: str, printed: str) -> None:
    assert format_lsn(parse_lsn(text)) == printed


def test_the_first_word_of_an_lsn_is_the_high_32_bits() -> None:
    assert parse_lsn("0/FFFFFFFF") + 1 == parse_lsn("1/0") == 1 << 32
    assert parse_lsn("FFFFFFFF/FFFFFFFF") == 2**64 - 1


# pg_input_is_valid(text, 'pg_lsn') is false for "0" .. "+1/0"; "", "0 /1" and the Arabic-Indic
# digit fail pg_lsn's strspn over ASCII hex digits as well.
@pytest.mark.parametrize(
    "text",
    ["", "0", "0/", "/0", "G/0", "0/123456789", "123456789/0", "1/2/3", "0x1/0", "-1/0",
     "+1/0", "0 /1", "\u0663/0"],
)
def test_what_pg_lsn_refuses_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid lsn"):
        parse_lsn(text)


def test_surrounding_whitespace_is_ignored_where_pg_lsn_would_refuse_it() -> None:
    # pg_lsn refuses ' 0/1' and '0/1 '; cloud-dump has always stripped flag values and replies.
    assert parse_lsn(" 0/1A\n") == 0x1A


@pytest.mark.parametrize("value", [-1, 2**64])
def test_an_lsn_out_of_64_bits_does_not_print(value: int) -> None:
    with pytest.raises(ConfigError, match="out of range"):
        format_lsn(value)


# --- segment sizes ---------------------------------------------------------------------------


def test_segment_sizes_are_the_powers_of_two_initdb_accepts() -> None:
    assert SEGMENT_SIZES[0] == 1 * MIB and SEGMENT_SIZES[-1] == 1 * GIB
    assert len(SEGMENT_SIZES) == 11 and DEFAULT_SEGMENT_SIZE in SEGMENT_SIZES
    assert all(is_segment_size(size) and check_segment_size(size) == size for size in SEGMENT_SIZES)


@pytest.mark.parametrize("size", [0, -16 * MIB, 512 * 1024, 3 * MIB, 16 * MIB + 1, 2 * GIB])
def test_other_segment_sizes_are_refused(size: int) -> None:
    assert not is_segment_size(size)
    with pytest.raises(ConfigError, match=f"invalid WAL segment size {size}"):
        check_segment_size(size)
    with pytest.raises(ConfigError):
        segment_name(1, 0, size)


@pytest.mark.parametrize(("size", "per_log"), [(1 * MIB, 4096), (16 * MIB, 256), (1 * GIB, 4)])
def test_segments_per_log(size: int, per_log: int) -> None:
    assert segments_per_log(size) == per_log


# --- segment names ---------------------------------------------------------------------------


@pytest.mark.parametrize(("lsn", "size", "at_lsn", "before_lsn"), SERVER_NAMES)
def test_segment_names_are_what_pg_walfile_name_returns(
    lsn: str, size: int, at_lsn: str, before_lsn: str
) -> None:
    assert segment_name(1, parse_lsn(lsn), size) == at_lsn
    assert prev_segment_name(1, parse_lsn(lsn), size) == before_lsn


def test_at_a_segment_boundary_the_previous_segment_holds_the_byte_before() -> None:
    boundary = parse_lsn("0/3000000")
    assert segment_number(boundary, 16 * MIB) == 3
    assert prev_segment_number(boundary, 16 * MIB) == 2
    assert prev_segment_number(boundary + 1, 16 * MIB) == 3


def test_no_byte_precedes_lsn_zero() -> None:
    assert segment_name(1, 0, 16 * MIB) == "000000010000000000000000"
    with pytest.raises(ConfigError):
        prev_segment_name(1, 0, 16 * MIB)


@pytest.mark.parametrize(("timeline", "lsn"), [(-1, 0), (2**32, 0), (1, -1), (1, 2**64)])
def test_a_timeline_or_lsn_out_of_range_names_no_segment(timeline: int, lsn: int) -> None:
    with pytest.raises(ConfigError, match="out of range"):
        segment_name(timeline, lsn, 16 * MIB)


def test_the_timeline_is_the_first_eight_hex_digits() -> None:
    assert segment_name(0x1A, parse_lsn("AB/CD000000"), 16 * MIB) == "0000001A000000AB000000CD"


# (name, size, pg_split_walfile_name's segment number).
@pytest.mark.parametrize(
    ("name", "size", "number"),
    [
        ("000000010000000A000000FF", 16 * MIB, 2815),
        ("000000010000000A000000FF", 1 * MIB, 41215),
        ("000000010000000000000FFF", 1 * MIB, 4095),
        ("0000000200000001000000FF", 16 * MIB, 511),
        ("0000000200000001000000FF", 1 * MIB, 4351),
    ],
)
def test_a_name_reads_back_to_its_segment(name: str, size: int, number: int) -> None:
    segment = Segment.parse(name, size)
    assert segment.number == number
    assert segment.name(size) == name
    assert segment.start_lsn(size) == number * size
    assert segment_name(segment.timeline, segment.start_lsn(size), size) == name


def test_a_partial_or_backup_name_reads_as_its_segment() -> None:
    assert Segment.parse("000000010000000A000000FF.partial") == Segment(1, 2815)
    assert Segment.parse("000000010000000A000000FF.00000028.backup") == Segment(1, 2815)


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("0000000100000000000001FF", 16 * MIB),  # seg 0x1FF: a log has 256 16 MiB segments
        ("000000010000000000000004", 1 * GIB),  # and 4 1 GiB ones
        ("00000002.history", 16 * MIB),
        ("000000010000000a000000ff", 16 * MIB),  # PostgreSQL names are upper case
        ("00000001000000000000001", 16 * MIB),
    ],
)
def test_what_is_no_segment_name_at_that_size_is_refused(name: str, size: int) -> None:
    with pytest.raises(ConfigError):
        Segment.parse(name, size)


def test_following_names_cross_into_the_next_log() -> None:
    assert following_names("0000000100000000000000FE", 3, 16 * MIB) == [
        "0000000100000000000000FF",
        "000000010000000100000000",
        "000000010000000100000001",
    ]
    assert following_names("000000010000000000000FFF.partial", 1, 1 * MIB) == [
        "000000010000000100000000"
    ]
    assert following_names("000000010000000000000003", 1, 1 * GIB) == [
        "000000010000000100000000"
    ]
    assert following_names("000000010000000000000001", 0, 16 * MIB) == []


def test_the_timeline_and_log_parts_of_a_name() -> None:
    name = "0000000200000001000000FF"
    assert timeline_prefix(name) == "00000002" == timeline_prefix("00000002.history")
    assert log_prefix(name) == "0000000200000001"
    assert next_log_prefix(name) == "0000000200000002"
    # The log after the last of one timeline's logs with 8 hex digits left: 00000100.
    assert next_log_prefix("00000003000000FF00000000") == "0000000300000100"
    # Every segment of the next log starts with it, at any segment size.
    first_of_next = following_names("00000001000000000000003F", 1, 64 * MIB)[0]
    assert first_of_next.startswith(next_log_prefix("00000001000000000000003F"))
