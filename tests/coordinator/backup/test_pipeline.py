"""The archive pipeline: stored bytes decode with the standard tools, parts are exact, failures
stop every thread, and part sizes keep any plausible stream within the store's part count."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import lz4.frame
import pytest

from coordinator.backup.parts import ObjectSummary, PartSizer
from coordinator.backup.pipeline import ArchiveSummary, ArchiveWriter
from coordinator.crypto import generate_identity
from coordinator.wait import wait_until
from storage.base import Capabilities, MiB

GiB = 1024 * MiB
S3 = Capabilities(min_part_size_bytes=5 * MiB, max_part_size_bytes=5 * GiB, max_part_count=10_000)
PART = 5 * MiB
# Uneven writes, including single bytes and one larger than a part.
CHUNK_SIZES = [1, 7, 4096, 65_539, 1, 6 * MiB + 13, 100_000, 31_337, 1 << 20, 3]


class CollectingSink:
    """Keeps every part, and checks the documented calling thread and order."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.parts: list[tuple[int, bytes, str]] = []
        self.fail_at = fail_at
        self.raised: BaseException | None = None

    def put_part(self, part_number: int, data: bytes, sha256: str) -> None:
        assert threading.current_thread().name == "archive-parts"
        assert part_number == len(self.parts) + 1
        assert isinstance(data, bytes)
        if part_number == self.fail_at:
            self.raised = SinkFailed(f"part {part_number} rejected")
            raise self.raised
        self.parts.append((part_number, data, sha256))

    @property
    def stored(self) -> bytes:
        return b"".join(data for _, data, _ in self.parts)


class SinkFailed(Exception):
    pass


@pytest.fixture(scope="module")
def sample() -> bytes:
    """~30 MB of table-like rows (compressible) with incompressible stretches."""
    rnd = random.Random(42)
    blocks = []
    for block in range(30):
        if block % 5 == 4:
            blocks.append(rnd.randbytes(MiB))
        else:
            rows = (
                b"%d\t%d\t%d\t%s\n" % (block * 20_000 + i, rnd.getrandbits(20), i % 97, b" " * 40)
                for i in range(18_000)
            )
            blocks.append(b"".join(rows)[:MiB])
    return b"".join(blocks)


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    secret, public = generate_identity()
    key_file = tmp_path_factory.mktemp("age") / "key.txt"
    key_file.write_text(secret + "\n")
    return key_file, public


def chunks(data: bytes, sizes: list[int] = CHUNK_SIZES) -> Iterator[memoryview]:
    view = memoryview(data)
    position, i = 0, 0
    while position < len(data):
        size = sizes[i % len(sizes)]
        yield view[position : position + size]
        position += size
        i += 1


def write_archive(writer: ArchiveWriter, data: bytes) -> ArchiveSummary:
    for chunk in chunks(data):
        writer.write(chunk)
    return writer.close()


def run_tool(*argv: str, data: bytes) -> bytes:
    return subprocess.run(argv, input=data, capture_output=True, check=True).stdout


def decode(stored: bytes, compression: str, key_file: Path | None) -> bytes:
    """What restore does, with the standard tools (lz4 through its library: no CLI in setup)."""
    if key_file is not None:
        stored = run_tool("age", "-d", "-i", str(key_file), data=stored)
    if compression == "zstd":
        return run_tool("zstd", "-dc", data=stored)
    if compression == "gzip":
        return run_tool("gzip", "-dc", data=stored)
    if compression == "lz4":
        return bytes(lz4.frame.decompress(stored))
    return stored


def assert_parts_match(summary: ArchiveSummary, sink: CollectingSink, part_size: int) -> None:
    stored = sink.stored
    assert summary.stored_size == len(stored)
    assert summary.sha256 == hashlib.sha256(stored).hexdigest()
    assert [p.number for p in summary.parts] == list(range(1, len(sink.parts) + 1))
    for record, (number, data, sha256) in zip(summary.parts, sink.parts, strict=True):
        assert (record.number, record.size, record.sha256) == (number, len(data), sha256)
        assert sha256 == hashlib.sha256(data).hexdigest()
    assert all(len(data) == part_size for _, data, _ in sink.parts[:-1])
    assert 0 < len(sink.parts[-1][1]) <= part_size


def baseline_threads() -> int:
    return threading.active_count()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "age"])
@pytest.mark.parametrize("compression", ["zstd", "gzip", "lz4", "none"])
def test_stored_stream_is_cut_exactly_and_decodes_with_standard_tools(
    sample: bytes, identity: tuple[Path, str], compression: str, encrypted: bool
) -> None:
    key_file, public = identity
    sink = CollectingSink()
    writer = ArchiveWriter(
        sink,
        PartSizer(S3, target_part_bytes=PART),
        client_compression=compression,
        recipients=[public] if encrypted else None,
    )
    summary = write_archive(writer, sample)

    assert summary.input_size == len(sample)
    assert_parts_match(summary, sink, PART)
    assert decode(sink.stored, compression, key_file if encrypted else None) == sample


def test_age_stream_cut_at_arbitrary_offsets_decrypts_once_concatenated(
    identity: tuple[Path, str],
) -> None:
    # Parts of 100,003 bytes never line up with age's 64 KiB chunks.
    key_file, public = identity
    odd = Capabilities(min_part_size_bytes=1, max_part_size_bytes=100_003, max_part_count=1000)
    plaintext = random.Random(7).randbytes(3 * MiB + 5)
    sink = CollectingSink()
    writer = ArchiveWriter(
        sink,
        PartSizer(odd, target_part_bytes=100_003),
        client_compression="none",
        recipients=[public],
    )
    summary = write_archive(writer, plaintext)

    assert len(summary.parts) > 30
    assert_parts_match(summary, sink, 100_003)
    assert run_tool("age", "-d", "-i", str(key_file), data=sink.stored) == plaintext


def test_empty_archive_is_one_empty_part() -> None:
    # A multipart upload needs at least one part; S3 accepts an empty last (here: only) part.
    sink = CollectingSink()
    summary = ArchiveWriter(sink, PartSizer(S3), client_compression="none").close()

    assert [(n, d) for n, d, _ in sink.parts] == [(1, b"")]
    assert summary == ArchiveSummary(
        stored_size=0,
        input_size=0,
        sha256=hashlib.sha256(b"").hexdigest(),
        parts=summary.parts,
        objects=[ObjectSummary(0, hashlib.sha256(b"").hexdigest(), 1)],
    )
    assert summary.parts[0].size == 0


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_empty_archive_still_decodes(compression: str, identity: tuple[Path, str]) -> None:
    key_file, public = identity
    sink = CollectingSink()
    summary = ArchiveWriter(
        sink, PartSizer(S3), client_compression=compression, recipients=[public]
    ).close()

    assert len(summary.parts) == 1
    assert decode(sink.stored, compression, key_file) == b""


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "age"])
def test_sink_error_is_raised_unwrapped_and_no_thread_is_left(
    sample: bytes, identity: tuple[Path, str], encrypted: bool
) -> None:
    before = baseline_threads()
    sink = CollectingSink(fail_at=2)
    writer = ArchiveWriter(
        sink,
        PartSizer(S3, target_part_bytes=PART),
        client_compression="none",
        recipients=[identity[1]] if encrypted else None,
    )
    with pytest.raises(SinkFailed) as caught:
        write_archive(writer, sample)

    assert caught.value is sink.raised
    assert threading.active_count() == before
    with pytest.raises(ValueError, match="closed or aborted"):
        writer.write(b"more")


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "age"])
def test_abort_mid_stream_stops_threads_and_discards_the_rest(
    sample: bytes, identity: tuple[Path, str], encrypted: bool
) -> None:
    before = baseline_threads()
    sink = CollectingSink()
    writer = ArchiveWriter(
        sink,
        PartSizer(S3, target_part_bytes=PART),
        client_compression="zstd",
        recipients=[identity[1]] if encrypted else None,
    )
    for chunk in chunks(sample[: 12 * MiB]):
        writer.write(chunk)
    writer.abort()
    writer.abort()  # idempotent

    assert threading.active_count() == before
    assert all(len(data) == PART for _, data, _ in sink.parts)  # no short "last" part
    with pytest.raises(ValueError, match="closed or aborted"):
        writer.close()


def waiting_in_write(thread: threading.Thread) -> bool:
    """Whether ``thread`` is blocked inside ``ArchiveWriter.write``: waiting on a condition
    (a full queue) with ``write`` on its stack."""
    frame = sys._current_frames().get(thread.ident or 0)
    stack = []
    while frame is not None:
        stack.append(frame.f_code)
        frame = frame.f_back
    if not stack or stack[0].co_name != "wait" or not stack[0].co_filename.endswith("threading.py"):
        return False
    return any(c.co_name == "write" and c.co_filename.endswith("pipeline.py") for c in stack)


def test_slow_sink_blocks_writes_within_a_few_parts(sample: bytes) -> None:
    # Backpressure: memory stays at a few parts however much the caller pushes.
    release = threading.Event()
    pushed = 0

    class BlockingSink(CollectingSink):
        def put_part(self, part_number: int, data: bytes, sha256: str) -> None:
            release.wait()
            super().put_part(part_number, data, sha256)

    def push(writer: ArchiveWriter) -> None:
        nonlocal pushed
        for chunk in chunks(sample, [64 * 1024]):
            writer.write(chunk)
            pushed += len(chunk)
        writer.close()

    sink = BlockingSink()
    writer = ArchiveWriter(
        sink, PartSizer(S3, target_part_bytes=PART), client_compression="none"
    )
    pusher = threading.Thread(target=push, args=(writer,), daemon=True)
    pusher.start()
    try:
        # Until the pusher waits inside write(): from then on ``pushed`` cannot move.
        assert wait_until(lambda: waiting_in_write(pusher), timeout_s=30, first_s=0.001), (
            "write() never blocked"
        )
        blocked_at = pushed
    finally:
        release.set()
        pusher.join(timeout=10)
    # One part inside put_part, one queued, one being filled.
    assert PART <= blocked_at <= 3 * PART
    assert sink.stored == sample


@pytest.mark.parametrize("length", [0, 1, 11, 12, 13, 29, 100])
def test_stream_beyond_the_part_count_continues_in_objects(length: int) -> None:
    # Three 4-byte parts per object: a stream of 29 bytes is objects of 12, 12 and 5 bytes.
    tiny = Capabilities(min_part_size_bytes=1, max_part_size_bytes=4, max_part_count=3)
    sizer = PartSizer(tiny, target_part_bytes=4)
    data = random.Random(length).randbytes(length)
    sink = CollectingSink()
    writer = ArchiveWriter(sink, sizer, client_compression="none")
    for start in range(0, length, 5):  # writes that straddle parts and objects
        writer.write(data[start : start + 5])
    summary = writer.close()

    assert sink.stored == data
    assert summary.sha256 == hashlib.sha256(data).hexdigest()
    assert [p.number for p in summary.parts] == list(range(1, len(summary.parts) + 1))
    assert all(p.size == 4 for p in summary.parts[:-1])
    objects = [data[i : i + 12] for i in range(0, length, 12)] or [b""]
    assert [(o.size, o.sha256, o.parts) for o in summary.objects] == [
        (len(o), hashlib.sha256(o).hexdigest(), max(1, -(-len(o) // 4))) for o in objects
    ]
    assert sum(o.parts for o in summary.objects) == len(summary.parts)


# PartSizer: arithmetic only, no bytes.


@pytest.mark.parametrize("count", [1, 1000, 10_000])
def test_parts_keep_one_size_and_objects_take_the_store_count(count: int) -> None:
    caps = Capabilities(5 * MiB, 5 * GiB, count)
    assert PartSizer(caps).part_bytes == 8 * MiB  # --part-size-mib's default
    assert PartSizer(caps, target_part_bytes=1).part_bytes == 5 * MiB
    assert PartSizer(caps, target_part_bytes=6 * GiB).part_bytes == 5 * GiB
    sizer = PartSizer(caps)
    # However long the stream: parts never grow, objects follow one another.
    assert {sizer.size_for(n) for n in (1, count, count + 1, 1_000_000)} == {8 * MiB}
    assert sizer.object_of(1) == (0, 1)
    assert sizer.object_of(count) == (0, count)
    assert sizer.object_of(count + 1) == (1, 1)
    assert sizer.object_of(2 * count) == (1, count)
    assert sizer.object_of(5 * count + 1) == (5, 1)
