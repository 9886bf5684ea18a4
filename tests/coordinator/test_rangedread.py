"""RangedReader against both backends: order, bounded window, short and missing objects."""

from __future__ import annotations

import os

import pytest

from coordinator.rangedread import RangedReader
from storage.base import Storage, sha256_hex
from storage.errors import IntegrityError, StorageUnreachable

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


def test_open_range_stream_reads_the_range_in_chunks_and_nothing_past_the_end(
    storage: Storage,
) -> None:
    data = make_object(storage, 10_000)
    stream = storage.open_range_stream(KEY, 1_000, 5_000)
    try:
        got = stream.read(3_000) + stream.read(3_000)
        assert stream.read(10) == b""
    finally:
        stream.close()
    assert got == data[1_000:6_000]
    past = storage.open_range_stream(KEY, 20_000, 10)
    assert past.read(10) == b""
    past.close()


def test_ranged_reader_streams_ranges_larger_than_its_buffer(storage: Storage) -> None:
    # One range of the whole object, 4 KiB of buffer: the range is streamed, not held whole.
    data = make_object(storage, 200_000)
    reader = RangedReader(storage, KEY, len(data), range_bytes=len(data), parallel=2,
                          buffer_bytes=4_096, sha256=sha256_hex(data))  # fmt: skip
    with reader:
        got = bytearray()
        while chunk := reader.read(3_000):
            got += chunk
    assert bytes(got) == data


class _BreaksOnce:
    """A store whose first range stream breaks off after ``cut`` bytes: a connection reset
    mid-body at a chosen byte, which no real server produces on demand."""

    def __init__(self, inner: Storage, cut: int) -> None:
        self.inner = inner
        self.cut = cut
        self.opened: list[int] = []

    def open_range_stream(self, key: str, start: int, length: int) -> object:
        self.opened.append(start)
        stream = self.inner.open_range_stream(key, start, length)
        if len(self.opened) > 1:
            return stream
        cut = self.cut

        class Cut:
            def read(self, size: int = -1, /) -> bytes:
                nonlocal cut
                if cut <= 0:
                    raise StorageUnreachable("connection reset")
                data = stream.read(min(size, cut))
                cut -= len(data)
                return data

            def close(self) -> None:
                stream.close()

        return Cut()


def test_ranged_reader_resumes_a_broken_range_at_its_first_missing_byte(storage: Storage) -> None:
    data = make_object(storage, 50_000)
    store = _BreaksOnce(storage, cut=12_345)
    reader = RangedReader(store, KEY, len(data), range_bytes=len(data), parallel=1,  # type: ignore[arg-type]
                          sha256=sha256_hex(data))  # fmt: skip
    with reader:
        assert reader.read() == data
    assert store.opened == [0, 12_345]
