"""RangedReader against both backends: order, bounded window, short and missing objects."""

from __future__ import annotations

import os

import pytest

from coordinator.rangedread import ObjectsReader, RangedReader, naming_the_object, open_objects
from storage.base import Storage, sha256_hex
from storage.errors import IntegrityError, StorageUnreachable
from storage.layout import Layout
from storage.manifest import StoredObject

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
            object_size = stream.object_size

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


# ObjectsReader: an archive stored as several objects (ArchiveRecord.objects).


def split_objects(storage: Storage, sizes: list[int]) -> tuple[bytes, list[StoredObject]]:
    pieces = [os.urandom(size) for size in sizes]
    objects = []
    for index, piece in enumerate(pieces):
        key = Layout.archive_object_key(KEY, index)
        storage.put(key, piece)
        objects.append(StoredObject(key=key, size=len(piece), sha256=sha256_hex(piece), parts=1))
    return b"".join(pieces), objects


@pytest.mark.parametrize("sizes", [[30_000, 30_000, 7], [30_000, 0, 5_000], [1, 1, 1, 1]])
def test_objects_reader_reads_the_concatenation_in_order(
    storage: Storage, sizes: list[int]
) -> None:
    data, objects = split_objects(storage, sizes)
    seen: list[int] = []
    reader = open_objects(storage, objects, range_bytes=4_099, parallel=3, on_bytes=seen.append)
    assert isinstance(reader, ObjectsReader)
    with reader:
        got = bytearray()
        assert reader.read(0) == b""
        while chunk := reader.read(1_000):
            got += chunk
        reader.drain()
        assert reader.bytes_read == len(data) == sum(seen)
    assert bytes(got) == data
    with open_objects(storage, objects, range_bytes=8_192, parallel=2) as again:
        head = bytearray(5)
        n = again.readinto(head)  # what the first object's first range holds, at most
        assert n == min(5, sizes[0])
        assert bytes(head[:n]) + again.read() == data


def test_one_object_is_read_by_a_plain_ranged_reader(storage: Storage) -> None:
    data, objects = split_objects(storage, [10_000])
    with open_objects(storage, objects, range_bytes=4_096, parallel=2) as reader:
        assert isinstance(reader, RangedReader) and reader.read() == data


def test_objects_reader_checks_each_object_and_says_which(storage: Storage) -> None:
    _, objects = split_objects(storage, [10_000, 10_000, 10_000])
    storage.put(objects[1].key, os.urandom(10_000))
    reader = open_objects(storage, objects, range_bytes=4_096, parallel=2)
    assert isinstance(reader, ObjectsReader)
    with reader, pytest.raises(IntegrityError, match=r"'b1/base.tar.0002' does not match"):
        reader.read()
    storage.delete(objects[2].key)
    reader = open_objects(storage, objects[2:], range_bytes=4_096, parallel=2)
    with reader, pytest.raises(IntegrityError, match=r"b1/base.tar.0003"):
        reader.read()


def test_damage_found_by_a_stacked_reader_names_the_object_being_read(storage: Storage) -> None:
    _, objects = split_objects(storage, [100, 100, 100])
    reader = open_objects(storage, objects, range_bytes=4_096, parallel=2)
    said = r"^bad bytes \(found reading its object 'b1/base.tar.0002'\)$"
    with reader, pytest.raises(IntegrityError, match=said), naming_the_object(reader):
        assert len(reader.read(100)) == 100
        assert len(reader.read(50)) == 50  # from the second object
        raise IntegrityError("bad bytes")


def test_an_object_longer_than_recorded_is_refused(storage: Storage) -> None:
    # Bytes appended to an object would never be read (the ranges stop at the recorded size),
    # yet a copy of the objects concatenated by hand would carry them into the stream.
    data = make_object(storage, 10_000)
    storage.put(KEY, data + b"appended")
    said = r"^object 'b1/base.tar' is 10008 bytes, manifest.json records 10000$"
    for ranges in (4_096, 64 * 1024):  # the check is on every range, the first included
        with (
            RangedReader(storage, KEY, 10_000, range_bytes=ranges, parallel=2,
                         sha256=sha256_hex(data)) as reader,  # fmt: skip
            pytest.raises(IntegrityError, match=said),
        ):
            reader.read()
