"""``verify --deep`` against ``restore`` of the same backup: is reading a backup back to its
contents at least as fast as restoring it?

Set-up, once: a PostgreSQL 15 cluster (Debian's build) filled by ``pgbench -i -q -s SCALE``
(logged tables) and checkpointed; a moto S3 server with one bucket and a local directory. One
backup to each, in-process (``cloud-dump backup --storage ...``, zstd, the defaults), and the
segments it needs to become consistent pushed to each store's WAL archive by hand
(``cloud-dump wal-push`` on a copy of each segment), so that verify finds the WAL it checks.

Then, per store and round, after a ``sync``: ``cloud-dump restore --name b --pgdata DIR`` (its
output removed afterwards), then ``cloud-dump verify --deep --name b``, both with the default
``--parallel`` (4) and in-process. Printed: seconds, MB/s (database size over wall time, as
bench/backup.py), the tool's CPU seconds and peak RSS, and the ratio restore seconds / verify
seconds (PASS when verify --deep is at least as fast: ratio >= 1).

Usage (as root, from the repository): ``.venv/bin/python bench/verify.py [--scale 100]
[--rounds 1] [--keep-logs]``. Everything it starts is stopped by PID, and its temporary
directories removed, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3

from bench.common import (
    AWS_ENV,
    CLOUD_DUMP,
    MB,
    Timed,
    load_average,
    mb,
    run_bench,
    run_timed,
    start_services,
    verdict,
)
from devrig.postgres import PgCluster, start_cluster
from storage.walnames import Segment

PG_MAJOR = 15
RATIO_TARGET = 1.0  # restore seconds / verify --deep seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=100, help="pgbench scale (default 100)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per store (default 1)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="copy the logs to ./bench-logs-<time> at the end")  # fmt: skip
    args = parser.parse_args()
    started = time.monotonic()
    print(f"bench/verify.py: scale {args.scale}, {args.rounds} round(s), {os.cpu_count()} CPUs, "
          f"load average at start {load_average()}", flush=True)  # fmt: skip

    def body(workdir: Path, stack: contextlib.ExitStack[bool | None]) -> None:
        logs = workdir / "logs"
        cluster = start_cluster(PG_MAJOR)
        stack.callback(cluster.destroy)
        db_size = _fill(cluster, args.scale, logs)
        services = start_services(stack, workdir, logs)
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        s3 = boto3.client("s3", endpoint_url=services.moto_endpoint,
                          aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                          region_name=AWS_ENV["AWS_DEFAULT_REGION"])  # fmt: skip
        s3.create_bucket(Bucket=bucket)
        (workdir / "store").mkdir()
        stores = {
            "local dir": ([f"--storage=file://{workdir / 'store'}"], dict(os.environ)),
            "S3 (moto)": ([f"--storage=s3://{bucket}/bench",
                           f"--s3-endpoint={services.moto_endpoint}"],
                          {**os.environ, **AWS_ENV}),
        }  # fmt: skip
        results: dict[str, list[tuple[Timed, Timed]]] = {}
        for kind, (flags, env) in stores.items():
            _backup(cluster, kind, flags, env, workdir, logs)
            for number in range(1, args.rounds + 1):
                print(f"{kind}, round {number} (load average {load_average()})", flush=True)
                pgdata = workdir / "restored"
                os.sync()
                restored = run_timed([CLOUD_DUMP, "restore", "--name", "b", "--pgdata",
                                      str(pgdata), *flags], logs / "restore.log", env=env,
                                     what=f"restore from {kind}")  # fmt: skip
                shutil.rmtree(pgdata)
                os.sync()
                verified = run_timed([CLOUD_DUMP, "verify", "--deep", "--name", "b", *flags],
                                     logs / "verify.log", env=env,
                                     what=f"verify --deep of {kind}")  # fmt: skip
                for case, timed in (("restore", restored), ("verify --deep", verified)):
                    print(f"  {case:14} {timed.wall_s:7.2f} s {db_size / MB / timed.wall_s:7.0f} "
                          f"MB/s   cpu {timed.cpu_s:5.1f} s   rss {mb(timed.max_rss)} MB",
                          flush=True)  # fmt: skip
                results.setdefault(kind, []).append((restored, verified))
        _report(results, db_size, args.scale)

    return run_bench("verify", started, args.keep_logs, body)


def _fill(cluster: PgCluster, scale: int, logs: Path) -> int:
    print(f"PostgreSQL {PG_MAJOR} on port {cluster.port}; pgbench -i -q -s {scale}", flush=True)
    run_timed([str(cluster.bin_dir / "pgbench"), "-i", "-q", "-s", str(scale),
               "-h", str(cluster.socket_dir), "-p", str(cluster.port), "-U", "postgres",
               "postgres"], logs / "pgbench.log", what="pgbench -i")  # fmt: skip
    cluster.sql("CHECKPOINT")
    size = int(cluster.sql("SELECT sum(pg_database_size(datname)) FROM pg_database")[0][0])
    print(f"  database size {mb(size)} MB", flush=True)
    return size


def _backup(cluster: PgCluster, kind: str, flags: list[str], env: dict[str, str],
            workdir: Path, logs: Path) -> None:  # fmt: skip
    """Back up to the store, and push the WAL the backup needs (copies: wal-push run by hand
    on a file outside pg_wal keeps no spool)."""
    timed = run_timed([CLOUD_DUMP, "backup", "--name", "b", "--db-url",
                       cluster.replication_url(), "--no-progress", *flags],
                      logs / "backup.log", env=env, what=f"backup to {kind}")  # fmt: skip
    print(f"{kind}: backup in {timed.wall_s:.1f} s", flush=True)
    rows = json.loads(_output([CLOUD_DUMP, "list", "--json", *flags], env))
    record = next(row for row in rows if row["name"] == "b")
    first = Segment.parse(record["start_wal_file"])
    last = Segment.parse(record["end_wal_file"])
    copies = workdir / "wal-copies"
    copies.mkdir(exist_ok=True)
    for number in range(first.number, last.number + 1):
        name = Segment(first.timeline, number).name()
        shutil.copy(cluster.datadir / "pg_wal" / name, copies / name)
        run_timed([CLOUD_DUMP, "wal-push", str(copies / name), name, *flags],
                  logs / "wal-push.log", env=env, what=f"wal-push {name}")  # fmt: skip


def _output(argv: list[str], env: dict[str, str]) -> str:
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout


def _report(results: dict[str, list[tuple[Timed, Timed]]], db_size: int, scale: int) -> None:
    print(f"\n=== results: database {mb(db_size)} MB (pgbench scale {scale}), medians ===")
    print(f"{'store':12} {'restore':>16} {'verify --deep':>18} {'ratio':>7}")
    for kind, runs in results.items():
        restore_s = statistics.median(r.wall_s for r, _ in runs)
        verify_s = statistics.median(v.wall_s for _, v in runs)
        ratio = restore_s / verify_s
        print(f"{kind:12} {restore_s:6.2f} s {db_size / MB / restore_s:5.0f} MB/s "
              f"{verify_s:6.2f} s {db_size / MB / verify_s:5.0f} MB/s {ratio:6.2f}x  "
              f"{verdict(ratio >= RATIO_TARGET)} (verify --deep at least as fast as restore)")


if __name__ == "__main__":
    sys.exit(main())
