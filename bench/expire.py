"""How long ``cloud-dump expire`` takes to remove 1,000 archived WAL segments and the backups
before them from S3 (a moto server): with batch deletes (DeleteObjects, up to 1,000 keys a
request) and, in the same run, one DELETE request per object, as expire removed them before.

Set-up, once: a private ``moto_server`` with one bucket. Per round and row (untimed), a fresh
prefix ``s3://bucket/<row>-<round>`` is filled as cloud-dump stores things, straight through
boto3: backups ``old-1`` and ``old-2`` and ``new`` (``manifest.json``, ``base.tar.zst``,
``backup_manifest``; synthetic bytes: expire reads manifests only), SEGMENTS WAL segments
``wal_archive/<name>.zst`` on timeline 1 from segment 1 (4 KiB each: expire reads names only),
``new``'s own two segments after them, ``00000002.history.zst`` and ``cloud-dump-archive.json``.
``old-1`` starts at segment 1, ``old-2`` half way, ``new`` after the last of the SEGMENTS.

Timed: ``cloud-dump expire --retain 1`` from process start to exit (``bench.common.run_timed``),
which removes ``old-1``, ``old-2`` and the SEGMENTS segments before ``new``. Afterwards (untimed)
the prefix must hold exactly ``new``, its two segments, the history file and the archive's
identity. The "one request per object" row runs the same command through a driver that replaces
``S3Storage.delete_many`` with a loop of ``delete``: expire's code before batch deletes.

Reported: wall seconds per row (median over the rounds, and the range), objects removed per
second, the S3 requests moto logged during the command by method, the ratio of the two rows, and
PASS/MISS against the target (under 10 s with batch deletes). Rows alternate within each round.

Usage (from the repository): ``.venv/bin/python bench/expire.py [--segments 1000] [--rounds 3]
[--keep-logs]``. moto is stopped by PID, and the temporary directory removed, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3

from bench.common import (
    AWS_ENV,
    CLOUD_DUMP,
    PYTHON,
    REPO_ROOT,
    VENV_BIN,
    BenchError,
    load_average,
    moto_requests_since,
    run_bench,
    run_timed,
    verdict,
)
from devrig.procs import ServerProcess, free_port, port_open
from storage.manifest import BackupManifest
from storage.walnames import Segment, format_lsn

SEGMENT_BYTES = 16 * 1024 * 1024
WAL_OBJECT_BYTES = 4096
TARGET_S = 10.0
# expire as it was before batch deletes: the same command, each object deleted on its own.
_ONE_BY_ONE = """
import sys
from storage.s3 import S3Storage

def delete_one_by_one(self, keys):
    for key in keys:
        self.delete(key)

S3Storage.delete_many = delete_one_by_one
from coordinator.cli.fastpath import entry
entry()
"""
ROWS = {
    "batch": ("cloud-dump expire (batch deletes)", [CLOUD_DUMP]),
    "single": ("one DELETE per object (before)", [PYTHON, "-c", _ONE_BY_ONE]),
}


@dataclass(frozen=True)
class Result:
    wall_s: float
    removed: int
    requests: Counter[str]


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path,
                 stack: contextlib.ExitStack[bool | None]) -> None:  # fmt: skip
        self.segments: int = args.segments
        self.logs = workdir / "logs"
        port = free_port()
        self.moto_log = self.logs / "moto_server.log"
        server = ServerProcess("moto_server", [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1",
                                               "-p", str(port)], self.moto_log)  # fmt: skip
        stack.callback(server.stop)
        server.wait_until(lambda: port_open(port), timeout_s=30)
        self.endpoint = f"http://127.0.0.1:{port}"
        self.s3: Any = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        )  # fmt: skip
        stack.callback(self.s3.close)
        self.bucket = f"bench-expire-{uuid.uuid4().hex[:8]}"
        self.s3.create_bucket(Bucket=self.bucket)

    # -- the store ------------------------------------------------------------------------------

    def fill(self, prefix: str) -> set[str]:
        """Store the backups and WAL under ``prefix``; the keys expire must leave."""
        n = self.segments
        objects: dict[str, bytes] = {}
        backups = {"old-1": 1, "old-2": max(1, n // 2), "new": n + 1}  # name: first segment
        end = datetime.now(UTC) - timedelta(days=1)
        for i, (name, first) in enumerate(backups.items()):
            objects[f"{name}/manifest.json"] = _manifest(name, first, end + timedelta(hours=i))
            objects[f"{name}/base.tar.zst"] = os.urandom(WAL_OBJECT_BYTES)
            objects[f"{name}/backup_manifest"] = b"{}"
        for number in range(1, n + 3):  # the last two are new's own
            objects[f"wal_archive/{Segment(1, number).name()}.zst"] = os.urandom(WAL_OBJECT_BYTES)
        objects["wal_archive/00000002.history.zst"] = b"history"
        objects["wal_archive/cloud-dump-archive.json"] = b'{"system_identifier": "7"}'
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda item: self.s3.put_object(
                        Bucket=self.bucket, Key=f"{prefix}/{item[0]}", Body=item[1]
                    ),
                    objects.items(),
                )
            )
        kept = {k for k in objects if k.startswith("new/") or not k.startswith(("old-", "wal"))}
        kept |= {f"wal_archive/{Segment(1, n + i).name()}.zst" for i in (1, 2)}
        kept |= {"wal_archive/00000002.history.zst", "wal_archive/cloud-dump-archive.json"}
        return kept

    def keys(self, prefix: str) -> set[str]:
        found: set[str] = set()
        for page in self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{prefix}/"):  # fmt: skip
            found |= {item["Key"][len(prefix) + 1 :] for item in page.get("Contents", [])}
        return found

    # -- one timed run --------------------------------------------------------------------------

    def run(self, row: str, round_number: int) -> Result:
        prefix = f"{row}-{round_number}"
        kept = self.fill(prefix)
        before = len(self.keys(prefix))
        offset = self.moto_log.stat().st_size
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUD_DUMP_", "AWS_"))}
        env |= AWS_ENV | {"CLOUD_DUMP_STORAGE": f"s3://{self.bucket}/{prefix}",
                          "CLOUD_DUMP_S3_ENDPOINT": self.endpoint}  # fmt: skip
        label, command = ROWS[row]
        timed = run_timed([*command, "expire", "--retain", "1"], self.logs / f"{prefix}.log",
                          env=env, cwd=REPO_ROOT, what=label)  # fmt: skip
        requests = self.requests_since(offset)
        left = self.keys(prefix)
        if left != kept:
            raise BenchError(f"{label}: expire left {sorted(left - kept)[:3]}... or removed "
                             f"{sorted(kept - left)[:3]}...")  # fmt: skip
        return Result(timed.wall_s, before - len(left), requests)

    def requests_since(self, offset: int) -> Counter[str]:
        return moto_requests_since(self.s3, self.bucket, self.moto_log, offset)


def _manifest(name: str, first_segment: int, end: datetime) -> bytes:
    start = Segment(1, first_segment)
    start_lsn = start.start_lsn() + 0x28
    return BackupManifest.model_validate({
        "name": name, "tool_version": "bench", "pg_version": "15", "pg_version_num": 150000,
        "system_identifier": "7", "timeline": 1, "start_lsn": format_lsn(start_lsn),
        "end_lsn": format_lsn(start_lsn + 0x1000), "start_wal_file": start.name(),
        "end_wal_file": start.name(), "start_time": end - timedelta(minutes=5), "end_time": end,
        "compression": "zstd", "archives": [], "backup_manifest_key": f"{name}/backup_manifest",
        "backup_manifest_size": 2, "backup_manifest_sha256": "0" * 64,
    }).to_json()  # fmt: skip


def report(results: dict[str, list[Result]], segments: int) -> None:
    print(f"\n=== expire --retain 1: {segments} WAL segments and 2 backups (6 objects) removed "
          f"from moto S3; {len(results['batch'])} round(s) ===")  # fmt: skip
    print(f"{'':34} {'seconds (range)':>22} {'objects/s':>10}  S3 requests")
    medians = {}
    for row, (label, _) in ROWS.items():
        runs = results[row]
        medians[row] = statistics.median(r.wall_s for r in runs)
        spread = f"{min(r.wall_s for r in runs):.2f}-{max(r.wall_s for r in runs):.2f}"
        rate = runs[0].removed / medians[row]
        requests = " ".join(f"{m} {c}" for m, c in sorted(runs[0].requests.items()))
        print(f"{label:34} {medians[row]:>8.2f} ({spread:>11}) {rate:>10,.0f}  {requests}")
    print(f"\nbatch deletes: {medians['batch']:.2f} s, target < {TARGET_S:.0f} s: "
          f"{verdict(medians['batch'] < TARGET_S)}; {medians['single'] / medians['batch']:.1f}x "
          "faster than one DELETE per object")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--segments", type=int, default=1000,
                        help="WAL segments to expire (default 1000)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="copy the logs to ./bench-logs-<time> at the end")  # fmt: skip
    args = parser.parse_args(argv)
    if args.segments < 2 or args.rounds < 1:
        parser.error("--segments must be at least 2, --rounds at least 1")
    started = time.monotonic()
    print(f"bench/expire.py: {args.segments} segments, {args.rounds} round(s), "
          f"{os.cpu_count()} CPUs, load average at start {load_average()}", flush=True)  # fmt: skip

    def body(workdir: Path, stack: contextlib.ExitStack[bool | None]) -> None:
        bench = Bench(args, workdir, stack)
        results: dict[str, list[Result]] = {row: [] for row in ROWS}
        for round_number in range(1, args.rounds + 1):
            for row in ROWS:
                result = bench.run(row, round_number)
                results[row].append(result)
                print(f"round {round_number}: {ROWS[row][0]}: {result.wall_s:.2f} s "
                      f"({result.removed} objects)", flush=True)  # fmt: skip
        report(results, args.segments)

    return run_bench("expire", started, args.keep_logs, body)


if __name__ == "__main__":
    sys.exit(main())
