"""RangedReader against both backends: order, bounded window, short and missing objects."""

from __future__ import annotations

import os

import pytest

from coordinator.rangedread import RangedReader
from storage.base import Storage, sha256_hex
from storage.errors import IntegrityError

KEY = "b1/base.tar"


def make_object(storage: Storage, size: int) -> bytes:
    data = os.urandom(size)
    storage.put(KEY, data)
    return data


def test_ranged_reader_returns_bytes_in_order_with_many_small_ranges(storage: Storage) -> None:
    data = make_object(storage, 300_000)
    reader = RangedReader(
        storage, KEY, len(data), range_bytes=4_099, parallel=4, sha256=sha256_hex(data)
    )
    with reader:
        got = bytearray()
        while chunk := reader.read(1_000):  # smaller than a range: buffering across reads
            got += chunk
    assert bytes(got) == data
    assert reader.closed


def test_ranged_reader_readinto_and_read_all_agree(storage: Storage) -> None:
    data = make_object(storage, 50_000)
    with RangedReader(storage, KEY, len(data), range_bytes=7_000, parallel=3) as reader:
        head = bytearray(12_345)
        assert reader.readinto(head) == 7_000  # one range at most per call
        rest = reader.read()
    assert bytes(head[:7_000]) + rest == data


def test_ranged_reader_sha256_mismatch_raises_at_end(storage: Storage) -> None:
    data = make_object(storage, 20_000)
    reader = RangedReader(
        storage, KEY, len(data), range_bytes=8_192, parallel=2, sha256=sha256_hex(b"other")
    )
    with reader, pytest.raises(IntegrityError, match="does not match its recorded sha256"):
        reader.read()


def test_ranged_reader_object_shorter_than_recorded_names_key_and_where_it_ends(
    storage: Storage,
) -> None:
    data = make_object(storage, 10_000)
    said = r"^object 'b1/base.tar' is shorter than .*: it ends after 10000 of 20000 bytes$"
    with (
        RangedReader(storage, KEY, 20_000, range_bytes=4_096, parallel=4) as reader,
        pytest.raises(IntegrityError, match=said),
    ):
        reader.read()
    assert data  # the object itself is intact


def test_ranged_reader_missing_object_is_an_integrity_error(storage: Storage) -> None:
    with (
        RangedReader(storage, "b1/gone.tar", 100, range_bytes=64, parallel=2, backup="b1") as r,
        pytest.raises(IntegrityError, match=r"backup 'b1' is missing object 'b1/gone\.tar'"),
    ):
        r.read(10)


def test_ranged_reader_empty_object(storage: Storage) -> None:
    storage.put(KEY, b"")
    with RangedReader(storage, KEY, 0, range_bytes=64, parallel=2, sha256=sha256_hex(b"")) as r:
        assert r.read() == b""


def test_ranged_reader_close_midway_cancels_the_rest(storage: Storage) -> None:
    data = make_object(storage, 100_000)
    reader = RangedReader(storage, KEY, len(data), range_bytes=1_000, parallel=4)
    assert reader.read(10) == data[:10]
    reader.close()
    with pytest.raises(ValueError, match="closed"):
        reader.read(10)
