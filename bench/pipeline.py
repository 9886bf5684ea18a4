"""Throughput and memory of the archive pipeline (coordinator/pipeline.py), no servers involved.

Pushes 1 GiB (``--gib``) of input through ``ArchiveWriter`` into a sink that drops the parts,
in 32 KiB memoryviews as the replication reader does, for each mode:

- ``passthrough``: server-compressed input (zstd level 1 frames), ``client_compression="none"``
- ``zstd``: raw pgbench-like pages, client zstd level 1
- ``zstd+age``: the same, then age-encrypted

Each mode runs in a fresh process so that its peak RSS is its own. Prints input MB/s (wall),
CPU cores used (process CPU time / wall: what is left of a 2-core machine for the reader) and
peak RSS. Usage: ``.venv/bin/python bench/pipeline.py [--gib N] [--zstd-threads N] [--modes ...]``
(also ``passthrough+age``, ``gzip``, ``lz4``).
"""

from __future__ import annotations

import argparse
import random
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zstandard

from coordinator.backup import pipeline
from coordinator.backup.parts import PartSizer
from coordinator.crypto import generate_identity
from storage.base import Capabilities, MiB

# mode: (input, client compression, encrypted)
MODES = {
    "passthrough": ("zstd", "none", False),
    "zstd": ("raw", "zstd", False),
    "zstd+age": ("raw", "zstd", True),
    "passthrough+age": ("zstd", "none", True),
    "gzip": ("raw", "gzip", False),
    "lz4": ("raw", "lz4", False),
}
DEFAULT_MODES = ["passthrough", "zstd", "zstd+age"]
PAGE = 8192
MESSAGE = 32 * 1024
S3 = Capabilities(5 * MiB, 5 * 1024 * MiB, 10_000)


class DropSink:
    def put_part(self, part_number: int, data: bytes, sha256: str) -> None:
        pass


def heap_page(rnd: random.Random, aid: int) -> bytes:
    """A pgbench_accounts heap page: 61 tuples (header, aid, bid, abalance, 84-char filler)."""
    rows = []
    for slot in range(61):
        header = struct.pack(
            "<IIIHHHHBx", 1000 + rnd.getrandbits(20), 0, 0, aid // 61 & 0xFFFF, slot + 1, 3,
            0x0902, 24,
        )  # fmt: skip
        row = header + struct.pack(
            "<iii", aid + slot, aid // 100_000 + 1, rnd.randint(-99_999, 99_999)
        )
        rows.append((row + b"\xab" + b" " * 84).ljust(128, b"\0"))
    pointers = b"".join(
        struct.pack("<I", (PAGE - 128 * (i + 1)) | 1 << 15 | 121 << 17) for i in range(61)
    )
    head = struct.pack(
        "<QHHHHHHI", rnd.getrandbits(48), 0, 0, 24 + 4 * 61, PAGE - 128 * 61, PAGE, 0x2004, 0
    )
    return (head + pointers).ljust(PAGE - 128 * 61, b"\0") + b"".join(rows)


def index_page(rnd: random.Random, aid: int) -> bytes:
    """A btree leaf page of the primary key: (ctid, aid) items in key order."""
    items = b"".join(
        struct.pack("<IHHq", (aid + i) // 61, (aid + i) % 61 + 1, 16, aid + i) for i in range(407)
    )
    pointers = b"".join(
        struct.pack("<I", (PAGE - 16 * (i + 2)) | 1 << 15 | 16 << 17) for i in range(407)
    )
    head = struct.pack(
        "<QHHHHHHI", rnd.getrandbits(48), 0, 0, 24 + 4 * 407, PAGE - 16 * 408, PAGE - 16, 0x2004, 0
    )
    return (head + pointers).ljust(PAGE - 16 * 408, b"\0") + items + b"\0" * 16


def pgbench_pool(size: int) -> bytearray:
    """``size`` bytes of table and index pages; zstd -1 shrinks them ~9x (PG measured 5.7x)."""
    rnd = random.Random(1)
    pool = bytearray(size)  # filled in place: no transient copy to inflate the peak RSS
    for number in range(size // PAGE):
        aid = number * 61
        page = index_page(rnd, aid) if number % 5 == 4 else heap_page(rnd, aid)
        pool[number * PAGE : (number + 1) * PAGE] = page
    return pool


def run_mode(mode: str, total: int) -> None:
    source, compression, encrypted = MODES[mode]
    pool: bytes | bytearray = pgbench_pool(64 * MiB)
    if source == "zstd":  # what a PG 15+ server sends with compression=server-zstd:1
        pool = zstandard.ZstdCompressor(level=1).compress(pool)
    writer = pipeline.ArchiveWriter(
        DropSink(),
        PartSizer(S3),
        client_compression=compression,
        recipients=[generate_identity()[1]] if encrypted else None,
    )
    view = memoryview(pool)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = time.perf_counter(), time.process_time()
    pushed = 0
    while pushed < total:
        for offset in range(0, len(pool), MESSAGE):
            writer.write(view[offset : offset + MESSAGE])
        pushed += len(pool)
    summary = writer.close()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"{mode:12} {pushed / wall / 1e6:7.0f} MB/s  {cpu / wall:4.2f} cores  "
        f"ratio {pushed / summary.stored_size:4.1f}  parts {len(summary.parts):4} "
        f"x {summary.parts[0].size // MiB} MiB  peak RSS {rss_after // 1024} MiB "
        f"(input pool {len(pool) // MiB} MiB, {rss_before // 1024} MiB before the run)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--zstd-threads", type=int, default=pipeline.ZSTD_THREADS)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=DEFAULT_MODES)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        pipeline.ZSTD_THREADS = args.zstd_threads
        run_mode(args.modes[0], int(args.gib * 1024 * MiB))
        return
    print(
        f"{args.gib} GiB per mode, zstd threads {args.zstd_threads}, {MESSAGE // 1024} KiB writes"
    )
    for mode in args.modes:
        subprocess.run(
            [sys.executable, __file__, "--in-process", "--modes", mode, "--gib", str(args.gib),
             "--zstd-threads", str(args.zstd_threads)],
            check=True,
        )  # fmt: skip


if __name__ == "__main__":
    main()
