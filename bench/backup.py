"""Backup and restore throughput of cloud-dump against pg_basebackup, on a pgbench database.

One PostgreSQL 15 cluster (Debian's build) with ``pgbench -i -s SCALE`` (logged tables) and,
with ``--noise-rows N``, a table of N rows of md5 text beside it (``--dataset prod`` is
bench-peers' ``prod``: scale 50 and 4M rows, 1.35 GB that zstd shrinks ~4.8x where pgbench's
blank filler shrinks ~22x: mixed data, on which issue 12's same-compression target is judged), a
private Redis, a moto S3 server and two sets of two Celery workers (``-c 1`` each): one set
writes to a local directory, the other to moto (each set on its own Redis database, so a set
only ever sees its own target's tasks). Each round runs, in this order::

    pg_basebackup -Ft -Xfetch -c fast                          → local disk (uncompressed)
    pg_basebackup -Ft -Xfetch -c fast --compress=server-zstd   → local disk
    the same with --compress=server-zstd:level=1,workers=2     (what cloud-dump asks the server)
    cloud-dump backup (zstd, default settings) → 2 workers → local-directory storage
    the same with the broker 50 ms away: the coordinator reaches Redis through a proxy that
        delays every byte 25 ms each way (bench/delayproxy.py); the workers reach it directly
    cloud-dump backup (zstd, default settings) → 2 workers → S3 (moto)
    zstd -dc base.tar.zst | tar -x ; sync                      (pg_basebackup's server-zstd output)
    cloud-dump restore ← local-directory storage   (manifest verification, ends with sync)
    cloud-dump restore ← S3 (moto)

and deletes every output before the next round. Reported: medians over the rounds of the wall
time and of MB/s of *database size* (sum of pg_database_size over all databases, MB = 10^6
bytes), the ratios against the targets of the issue, the CPU seconds of each process involved
(the tool itself, PostgreSQL, the workers, Redis, moto), and peak RSS: the coordinator's (and
restore's) from ``os.wait4``, each worker process's VmHWM from /proc (main process and pool
children, if any), and their sum with Redis's: the memory of everything a backup runs.

Usage (as root, from the repository): ``.venv/bin/python bench/backup.py [--scale 100]
[--noise-rows 0 | --dataset prod] [--rounds 3] [--skip-restore] [--broker-delay-ms 25 |
--skip-far-broker]``. Everything it starts is stopped by PID, and its temporary directories
removed, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
import redis

from bench.common import (
    AWS_ENV,
    CLOUD_DUMP,
    MB,
    BenchError,
    Timed,
    directory_bytes,
    load_average,
    mb,
    process_tree,
    run_bench,
    run_timed,
    start_services,
    start_worker,
    tree_cpu_seconds,
    verdict,
    vm_hwm_bytes,
    walsenders_reaped,
)
from coordinator.codecs import DEFAULT_COMPRESSION, codec
from coordinator.wait import wait_until
from devrig.postgres import PgCluster, start_cluster
from devrig.procs import ServerProcess, free_port, port_open
from devrig.services import WorkerPool

PG_MAJOR = 15
S3_PREFIX = "bench"
WORKERS_PER_TARGET = 2

# Targets of issue 4 (acceptance point 7), kept: the README's figures compare against them.
BACKUP_RATIO_TARGET = 0.8  # cloud-dump → local vs pg_basebackup server-zstd (zstd's level 3)
RESTORE_RATIO_TARGET = 0.7  # cloud-dump restore vs zstd -dc | tar -x
COORDINATOR_RSS_TARGET = 200 * MB
WORKER_RSS_TARGET = 150 * MB
# Targets of issue 12 ("Ahead of pgBackRest on every path"): to local storage >= 0.9x
# pg_basebackup with the same server compression; with 50 ms between the database host and the
# broker a backup keeps >= 80% of its loopback throughput; everything a backup runs
# (coordinator, workers, Redis) <= 350 MB in all.
SAME_COMPRESSION_RATIO_TARGET = 0.9
FAR_BROKER_RATIO_TARGET = 0.8
BACKUP_MEMORY_TARGET = 350 * MB
# bench-peers' datasets (its setup_pg.sh): pgbench scale, rows of md5 text.
DATASETS = {"pgbench": (100, 0), "prod": (50, 4_000_000)}
# The broker distance is a 50 ms round trip: half of it each way through the proxy.
FAR_BROKER_ONE_WAY_MS = 25.0


def server_compression() -> str:
    """The server compression cloud-dump's backup asks for by default, in pg_basebackup's
    ``--compress=server-METHOD:DETAIL`` spelling (the level and zstd workers of
    ``coordinator.codecs``), e.g. ``server-zstd:level=1,workers=2``."""
    entry = codec(DEFAULT_COMPRESSION)
    detail = f"level={entry.server_level}"
    if entry.server_workers is not None:
        detail += f",workers={entry.server_workers}"
    return f"server-{entry.name}:{detail}"


B_PLAIN = "pg_basebackup -Ft (uncompressed)"
B_ZSTD = "pg_basebackup --compress=server-zstd"
B_SAME = f"pg_basebackup --compress={server_compression()}"
B_LOCAL = "cloud-dump backup -> local dir"
B_EMBEDDED = "cloud-dump backup -> local dir, no broker"
B_S3 = "cloud-dump backup -> S3 (moto)"
R_TAR = "zstd -dc | tar -x ; sync"
R_LOCAL = "cloud-dump restore <- local dir"
R_S3 = "cloud-dump restore <- S3 (moto)"
COMPONENTS = ["postgres", "workers", "redis", "moto"]
CASE_WIDTH = 54  # the longest case label


def far_broker_case(one_way_ms: float) -> str:
    return f"{B_LOCAL}, broker {2 * one_way_ms:g} ms away"


@dataclass
class Sample:
    """One timed run of one case."""

    wall_s: float
    tool_cpu_s: float  # the command itself (and what it waited for), from wait4
    tool_rss: int  # its peak RSS, bytes
    cpu: dict[str, float]  # CPU seconds of the long-running servers during the run
    stored_bytes: int | None = None


@dataclass
class WorkerSet:
    """Two Celery workers sharing one target, on their own Redis database."""

    kind: str  # "local" or "s3"
    broker_url: str
    pool: WorkerPool
    # "local w1" → {"main": VmHWM, "pool child": VmHWM}, bytes: each a peak since its start
    peak_rss: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.pool.processes]

    def record_peak_rss(self) -> None:
        """VmHWM of each worker's processes: its main process and its pool children, if any.

        The prefork pool (``-c 1``) has one child per worker; the threads or solo pool has none,
        and the main process is the whole worker. Children are named by their place in the tree
        (a child replaced later takes its predecessor's place, and the larger peak is kept), so
        that the sum over roles counts each process running at the same time once.
        """
        for number, pid in enumerate(self.pids, 1):
            worker = self.peak_rss.setdefault(f"{self.kind} w{number}", {})
            for position, member in enumerate(process_tree(pid)):
                role = "main" if position == 0 else f"pool child {position}"
                hwm = vm_hwm_bytes(member)
                if hwm is not None:
                    worker[role] = max(worker.get(role, 0), hwm)

    def total_peak_rss(self) -> tuple[int, int]:
        """Sum of the peaks of every worker process of the set (bytes), and how many."""
        peaks = [hwm for roles in self.peak_rss.values() for hwm in roles.values()]
        return sum(peaks), len(peaks)


@dataclass
class Bench:
    """Everything started for the run, and the samples taken."""

    args: argparse.Namespace
    workdir: Path
    stack: contextlib.ExitStack
    cluster: PgCluster | None = None
    redis_pid: int = 0
    redis_port: int = 0
    moto_pid: int = 0
    moto_endpoint: str = ""
    bucket: str = ""
    s3: Any = None
    local_root: Path = Path()
    sets: dict[str, WorkerSet] = field(default_factory=dict)
    proxy_pid: int | None = None
    proxy_port: int = 0
    proxy_ping_ms: float = 0.0
    direct_ping_ms: float = 0.0
    db_size: int = 0
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    # --- set-up ---------------------------------------------------------------------------------

    def start_postgres(self) -> None:
        self.cluster = start_cluster(PG_MAJOR)
        self.stack.callback(self.cluster.destroy)
        cluster = self.cluster
        noise = self.args.noise_rows
        print(f"PostgreSQL {PG_MAJOR} on port {cluster.port}; pgbench -i -q -s {self.args.scale}"
              + (f", {noise:,} rows of md5 text" if noise else ""))  # fmt: skip
        started = time.perf_counter()
        run_timed(
            [str(cluster.bin_dir / "pgbench"), "-i", "-q", "-s", str(self.args.scale),
             "-h", str(cluster.socket_dir), "-p", str(cluster.port), "-U", "postgres",
             "postgres"],
            self.logs / "pgbench.log",
            what="pgbench -i",
        )  # fmt: skip
        if noise:
            # bench-peers' setup_pg.sh, DATASET=prod: text that compresses ~3-5x, frozen so
            # that no backup sees hint bits being set.
            cluster.sql(
                "CREATE TABLE noise AS SELECT g id, md5(random()::text)||md5(random()::text) a, "
                "md5(random()::text) b FROM generate_series(1, %s) g", [noise]
            )
            cluster.sql("VACUUM (FREEZE, ANALYZE) noise")
        cluster.sql("CHECKPOINT")
        self.db_size = int(
            cluster.sql("SELECT sum(pg_database_size(datname)) FROM pg_database")[0][0]
        )
        print(
            f"  initialised in {time.perf_counter() - started:.0f} s; database size "
            f"{mb(self.db_size)} MB (sum of pg_database_size over all databases)"
        )

    def start_services(self) -> None:
        services = start_services(self.stack, self.workdir, self.logs)
        self.redis_pid, self.redis_port = services.redis_pid, services.redis_port
        self.moto_pid, self.moto_endpoint = services.moto_pid, services.moto_endpoint
        self.s3 = boto3.session.Session(**_session_args()).client(
            "s3", endpoint_url=self.moto_endpoint
        )
        self.stack.callback(self.s3.close)
        self.bucket = f"bench-{uuid.uuid4().hex[:12]}"
        self.s3.create_bucket(Bucket=self.bucket)
        self.local_root = self.workdir / "store"
        self.local_root.mkdir()
        self.sets["local"] = self.start_workers("local", 0, {"CLOUD_DUMP_STORAGE": self.local_url})
        self.sets["s3"] = self.start_workers(
            "s3", 1, {"CLOUD_DUMP_STORAGE": self.s3_url, **self.s3_env}
        )
        if not self.args.skip_far_broker:
            self.start_broker_proxy()

    def start_broker_proxy(self) -> None:
        """The delaying proxy in front of Redis (``bench/delayproxy.py``, its own process), and
        proof that it delays: PING round trips through it and straight to Redis."""
        delay_ms = self.args.broker_delay_ms
        self.proxy_port = free_port()
        proxy = ServerProcess(
            "delay proxy",
            [sys.executable, "-I", str(Path(__file__).with_name("delayproxy.py")),
             str(self.proxy_port), str(self.redis_port), f"{delay_ms:g}"],
            self.logs / "delayproxy.log",
        )  # fmt: skip
        self.stack.callback(proxy.stop)
        proxy.wait_until(lambda: port_open(self.proxy_port), timeout_s=30)
        self.proxy_pid = proxy.pid
        self.direct_ping_ms = _ping_round_trip_ms(self.redis_port)
        self.proxy_ping_ms = _ping_round_trip_ms(self.proxy_port)
        print(
            f"broker proxy on port {self.proxy_port}: {delay_ms:g} ms each way; PING round trip "
            f"{self.proxy_ping_ms:.1f} ms through it, {self.direct_ping_ms:.2f} ms direct "
            "(medians of 10)",
            flush=True,
        )
        if self.proxy_ping_ms < 2 * delay_ms:
            raise BenchError(
                f"a PING through the delay proxy took {self.proxy_ping_ms:.1f} ms, less than "
                f"the {2 * delay_ms:g} ms round trip it should add"
            )

    @property
    def far_broker_url(self) -> str:
        """The local worker set's Redis database (0), through the delaying proxy."""
        return f"redis://127.0.0.1:{self.proxy_port}/0"

    @property
    def far_case(self) -> str:
        return far_broker_case(self.args.broker_delay_ms)

    @property
    def local_url(self) -> str:
        return f"file://{self.local_root}"

    @property
    def s3_url(self) -> str:
        return f"s3://{self.bucket}/{S3_PREFIX}"

    @property
    def s3_env(self) -> dict[str, str]:
        return {"CLOUD_DUMP_S3_ENDPOINT": self.moto_endpoint, **AWS_ENV}

    def start_workers(self, kind: str, db: int, env: dict[str, str]) -> WorkerSet:
        broker = f"redis://127.0.0.1:{self.redis_port}/{db}"
        pool = WorkerPool(broker)
        self.stack.callback(pool.stop)
        child_env = {**os.environ, **env, "CLOUD_DUMP_BROKER_URL": broker}
        for i in range(1, WORKERS_PER_TARGET + 1):
            name = f"{kind}{i}@bench"
            start_worker(pool, name, child_env, self.logs / f"worker-{kind}{i}.log")
        pool.wait_ready()
        return WorkerSet(kind, broker, pool)

    # --- accounting -----------------------------------------------------------------------------

    def component_cpu(self) -> dict[str, float]:
        assert self.cluster is not None and self.cluster.postmaster_pid is not None
        cpu = {
            "postgres": tree_cpu_seconds(self.cluster.postmaster_pid),
            "workers": sum(tree_cpu_seconds(p) for s in self.sets.values() for p in s.pids),
            "redis": tree_cpu_seconds(self.redis_pid),
            "moto": tree_cpu_seconds(self.moto_pid),
        }
        if self.proxy_pid is not None:
            cpu["proxy"] = tree_cpu_seconds(self.proxy_pid)
        return cpu

    def measure(
        self, case: str, run: Callable[[], Timed], stored: Callable[[], int] | None
    ) -> None:
        """Run one case (after a sync, so that no earlier write-back runs into it)."""
        os.sync()
        before = self.component_cpu()
        timed = run()
        # The walsender's CPU is counted once the postmaster has reaped it.
        postmaster = self.cluster.postmaster_pid if self.cluster is not None else None
        if postmaster is not None and not wait_until(
            lambda: walsenders_reaped(postmaster), timeout_s=30, first_s=0.005
        ):
            raise BenchError(f"{case}: the walsender was not reaped within 30 s")
        after = self.component_cpu()
        sample = Sample(
            timed.wall_s,
            timed.cpu_s,
            timed.max_rss,
            {name: after[name] - before[name] for name in after},
            stored() if stored is not None else None,
        )
        self.samples.setdefault(case, []).append(sample)
        print(
            f"  {case:{CASE_WIDTH}} {sample.wall_s:7.2f} s "
            f"{self.db_size / MB / sample.wall_s:7.0f} MB/s"
            f"   cpu: tool {sample.tool_cpu_s:5.1f} "
            + " ".join(f"{n} {sample.cpu[n]:5.1f}" for n in COMPONENTS)
            + f"   rss {mb(sample.tool_rss)} MB",
            flush=True,
        )

    # --- the cases ------------------------------------------------------------------------------

    def pg_env(self) -> dict[str, str]:
        assert self.cluster is not None
        return {**os.environ, "PGPASSWORD": self.cluster.repl_password}

    def pg_basebackup(self, out: Path, compress: str | None) -> Timed:
        """``compress``: pg_basebackup's ``--compress`` value (None: uncompressed)."""
        assert self.cluster is not None
        argv = [str(self.cluster.bin_dir / "pg_basebackup"), "-D", str(out), "-Ft", "-Xfetch",
                "-c", "fast", "-h", "127.0.0.1", "-p", str(self.cluster.port),
                "-U", self.cluster.repl_user, "-w"]  # fmt: skip
        if compress is not None:
            argv.append(f"--compress={compress}")
        return run_timed(argv, self.logs / "pg_basebackup.log", env=self.pg_env())

    def cloud_dump_backup(self, name: str, kind: str, far: bool = False) -> Timed:
        """One backup to ``kind``'s workers; ``far``: the coordinator's broker, result backend
        and staging Redis all through the delaying proxy (the workers stay on Redis itself)."""
        assert self.cluster is not None
        # The URL (with the password) goes through the environment, not the command line.
        env = {**os.environ, "CLOUD_DUMP_DB_URL": self.cluster.replication_url()}
        broker = self.far_broker_url if far else self.sets[kind].broker_url
        # --result-backend and --staging-url default to --broker: named anyway, so that no
        # CLOUD_DUMP_* variable of the caller's environment sends one around the proxy.
        timed = run_timed(
            [CLOUD_DUMP, "backup", "--name", name, "--broker", broker, "--result-backend",
             broker, "--staging-url", broker, "--no-progress"],
            self.logs / f"backup-{kind}{'-far' if far else ''}.log",
            env=env,
            what=f"cloud-dump backup to {kind}{' (far broker)' if far else ''}",
        )  # fmt: skip
        self.sets[kind].record_peak_rss()
        return timed

    def cloud_dump_backup_embedded(self, name: str) -> Timed:
        """One backup to the local directory with no broker: the parts are written by threads
        of the command itself (``coordinator.runner.EmbeddedRunner``), nothing staged."""
        assert self.cluster is not None
        env = {k: v for k, v in os.environ.items()
               if k not in ("CLOUD_DUMP_BROKER_URL", "CLOUD_DUMP_RESULT_BACKEND",
                            "CLOUD_DUMP_STAGING_URL")}  # fmt: skip
        env["CLOUD_DUMP_DB_URL"] = self.cluster.replication_url()
        return run_timed(
            [CLOUD_DUMP, "backup", "--name", name, "--storage", self.local_url, "--no-progress"],
            self.logs / "backup-embedded.log",
            env=env,
            what="cloud-dump backup to local, no broker",
        )

    def cloud_dump_restore(self, name: str, kind: str, target: Path) -> Timed:
        argv = [CLOUD_DUMP, "restore", "--name", name, "--pgdata", str(target)]
        env = dict(os.environ)
        if kind == "local":
            argv += ["--storage", self.local_url]
        else:
            argv += ["--storage", self.s3_url, "--s3-endpoint", self.moto_endpoint]
            env.update(AWS_ENV)
        return run_timed(
            argv, self.logs / f"restore-{kind}.log", env=env, what=f"cloud-dump restore {kind}"
        )

    def untar(self, archive: Path, target: Path) -> Timed:
        target.mkdir()
        script = f"set -euo pipefail; zstd -dc -- '{archive}' | tar -x -C '{target}'; sync"
        return run_timed(["bash", "-c", script], self.logs / "untar.log", what="zstd | tar")

    def s3_bytes(self, name: str) -> int:
        return sum(o["Size"] for o in self.s3_objects(name))

    def s3_objects(self, name: str) -> Iterator[dict[str, Any]]:
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{S3_PREFIX}/{name}/"):
            yield from page.get("Contents", [])

    def delete_s3_backup(self, name: str) -> None:
        keys = [{"Key": o["Key"]} for o in self.s3_objects(name)]
        for start in range(0, len(keys), 1000):
            self.s3.delete_objects(
                Bucket=self.bucket, Delete={"Objects": keys[start : start + 1000]}
            )

    def one_round(self, number: int) -> None:
        print(f"round {number}/{self.args.rounds} (load average {load_average()})", flush=True)
        here = self.workdir / f"round{number}"
        here.mkdir()
        plain, zstd, same = here / "pgbb-plain", here / "pgbb-zstd", here / "pgbb-same"
        local_name, far_name, s3_name = f"r{number}-local", f"r{number}-far", f"r{number}-s3"
        embedded_name = f"r{number}-embedded"

        self.measure(B_PLAIN, lambda: self.pg_basebackup(plain, None),
                     lambda: directory_bytes(plain))  # fmt: skip
        shutil.rmtree(plain)
        self.measure(B_ZSTD, lambda: self.pg_basebackup(zstd, "server-zstd"),
                     lambda: directory_bytes(zstd))  # fmt: skip
        self.measure(B_SAME, lambda: self.pg_basebackup(same, server_compression()),
                     lambda: directory_bytes(same))  # fmt: skip
        shutil.rmtree(same)
        self.measure(B_LOCAL, lambda: self.cloud_dump_backup(local_name, "local"),
                     lambda: directory_bytes(self.local_root / local_name))  # fmt: skip
        self.measure(B_EMBEDDED, lambda: self.cloud_dump_backup_embedded(embedded_name),
                     lambda: directory_bytes(self.local_root / embedded_name))  # fmt: skip
        shutil.rmtree(self.local_root / embedded_name)
        if self.proxy_pid is not None:
            self.measure(self.far_case, lambda: self.cloud_dump_backup(far_name, "local", True),
                         lambda: directory_bytes(self.local_root / far_name))  # fmt: skip
            shutil.rmtree(self.local_root / far_name)
        self.measure(B_S3, lambda: self.cloud_dump_backup(s3_name, "s3"),
                     lambda: self.s3_bytes(s3_name))  # fmt: skip

        if not self.args.skip_restore:
            target = here / "restored"
            self.measure(R_TAR, lambda: self.untar(zstd / "base.tar.zst", target), None)
            shutil.rmtree(target)
            self.measure(R_LOCAL, lambda: self.cloud_dump_restore(local_name, "local", target),
                         None)  # fmt: skip
            shutil.rmtree(target)
            self.measure(R_S3, lambda: self.cloud_dump_restore(s3_name, "s3", target), None)
            shutil.rmtree(target)

        shutil.rmtree(here)
        shutil.rmtree(self.local_root / local_name)
        self.delete_s3_backup(s3_name)

    # --- report ---------------------------------------------------------------------------------

    def median(self, case: str, get: Callable[[Sample], float]) -> float:
        return statistics.median(get(s) for s in self.samples[case])

    def throughput(self, case: str) -> float:
        """Median MB/s of database size (the median of the per-run throughputs)."""
        return self.median(case, lambda s: self.db_size / MB / s.wall_s)

    def report(self) -> None:
        rounds = len(self.samples[B_PLAIN])
        print()
        print(
            f"=== results: database {mb(self.db_size)} MB (pgbench scale {self.args.scale}"
            + (f" and {self.args.noise_rows:,} rows of md5 text" if self.args.noise_rows else "")
            + f", PostgreSQL {PG_MAJOR}), medians of {rounds} round(s); MB = 10^6 bytes ==="
        )
        header = (
            f"{'case':{CASE_WIDTH}} {'wall s':>7} {'MB/s':>6} {'(min-max)':>11} {'stored MB':>9} "
            f"{'tool cpu':>8} {'pg cpu':>6} {'workers':>7} {'redis':>5} {'moto':>5} "
            f"{'tool peak RSS':>13}"
        )
        print(header)
        print("-" * len(header))
        for case in self.samples:  # in the order they ran
            rates = [self.db_size / MB / s.wall_s for s in self.samples[case]]
            stored = [s.stored_bytes for s in self.samples[case] if s.stored_bytes is not None]
            stored_text = mb(statistics.median(stored)) if stored else "-"
            cpu = {n: self.median(case, lambda s, n=n: s.cpu[n]) for n in COMPONENTS}  # type: ignore[misc]
            print(
                f"{case:{CASE_WIDTH}} {self.median(case, lambda s: s.wall_s):7.2f} "
                f"{self.throughput(case):6.0f} {f'({min(rates):.0f}-{max(rates):.0f})':>11} "
                f"{stored_text:>9} {self.median(case, lambda s: s.tool_cpu_s):8.1f} "
                + " ".join(
                    f"{cpu[n]:{w}.1f}" for n, w in zip(COMPONENTS, (6, 7, 5, 5), strict=True)
                )
                + f" {mb(max(s.tool_rss for s in self.samples[case])):>10} MB"
            )
        print("(cpu columns: CPU seconds during the run; peak RSS: the largest over the rounds)")
        self.report_ratios()
        self.report_moto()
        self.report_memory()

    def report_ratios(self) -> None:
        zstd, same = self.throughput(B_ZSTD), self.throughput(B_SAME)
        local = self.throughput(B_LOCAL)
        print()
        print("ratios (median MB/s of database size)")
        # (label, ratio, target or None for information, where the target comes from)
        lines: list[tuple[str, float, float | None, str]] = [
            (
                f"{B_LOCAL} / pg_basebackup same compression",
                local / same,
                SAME_COMPRESSION_RATIO_TARGET,
                "issue 12",
            ),
            (
                f"{B_EMBEDDED} / pg_basebackup same compression",
                self.throughput(B_EMBEDDED) / same,
                SAME_COMPRESSION_RATIO_TARGET,
                "issue 12",
            ),
            (f"{B_LOCAL} / {B_ZSTD}", local / zstd, BACKUP_RATIO_TARGET, "issue 4"),
            (f"{B_S3} / pg_basebackup same compression", self.throughput(B_S3) / same, None, ""),
            (f"{B_S3} / {B_ZSTD}", self.throughput(B_S3) / zstd, None, ""),
            (f"{B_SAME} / {B_ZSTD}", same / zstd, None, ""),
            (f"{B_PLAIN} / {B_ZSTD}", self.throughput(B_PLAIN) / zstd, None, ""),
        ]
        if self.far_case in self.samples:
            lines.append((f"{self.far_case} / loopback", self.throughput(self.far_case) / local,
                          FAR_BROKER_RATIO_TARGET, "issue 12"))  # fmt: skip
        if R_TAR in self.samples:
            floor = self.throughput(R_TAR)
            lines += [
                (f"{R_LOCAL} / {R_TAR}", self.throughput(R_LOCAL) / floor, RESTORE_RATIO_TARGET,
                 "issue 4"),
                (f"{R_S3} / {R_TAR}", self.throughput(R_S3) / floor, RESTORE_RATIO_TARGET,
                 "issue 4"),
            ]  # fmt: skip
        width = max(len(label) for label, *_ in lines)
        for label, ratio, target, source in lines:
            judged = (f"target >= {target:.1f}x ({source})  {verdict(ratio >= target)}"
                      if target else "(info)")  # fmt: skip
            print(f"  {label:{width}} {ratio:5.2f}x  {judged}")
        if self.far_case in self.samples:
            proxy_cpu = self.median(self.far_case, lambda s: s.cpu.get("proxy", 0.0))
            print(
                f"  (broker proxy: PING round trip {self.proxy_ping_ms:.1f} ms through it, "
                f"{self.direct_ping_ms:.2f} ms direct; its own CPU {proxy_cpu:.1f} s during "
                f"the case, median)"
            )

    def report_moto(self) -> None:
        print()
        print("moto S3 server's share (medians)")
        for case in (B_S3, R_S3):
            if case not in self.samples:
                continue
            moto = self.median(case, lambda s: s.cpu["moto"])
            total = self.median(case, lambda s: s.tool_cpu_s + sum(s.cpu.values()))
            wall = self.median(case, lambda s: s.wall_s)
            print(
                f"  {case:{CASE_WIDTH}} moto {moto:5.1f} CPU s of {total:5.1f} CPU s in all "
                f"({moto / total:4.0%}); {moto / wall:4.2f} of the machine's 2 cores for "
                f"{wall:.1f} s"
            )

    def report_memory(self) -> None:
        print()
        print("peak RSS (MB = 10^6 bytes)")
        backups = [c for c in (B_LOCAL, self.far_case, B_S3) if c in self.samples]
        coordinator = max(s.tool_rss for c in backups for s in self.samples[c])
        print(
            f"  coordinator (cloud-dump backup, wait4 ru_maxrss) {mb(coordinator):>5} MB   "
            f"target < {mb(COORDINATOR_RSS_TARGET)} MB  "
            f"{verdict(coordinator < COORDINATOR_RSS_TARGET)}"
        )
        for worker_set in self.sets.values():
            for worker, roles in worker_set.peak_rss.items():
                peak = max(roles.values())
                detail = ", ".join(f"{role} {mb(hwm)}" for role, hwm in roles.items())
                print(
                    f"  worker {worker:9} {f'(VmHWM: {detail})':36} {mb(peak):>5} MB   "
                    f"target < {mb(WORKER_RSS_TARGET)} MB  {verdict(peak < WORKER_RSS_TARGET)}"
                )
        for case in (R_LOCAL, R_S3):
            if case in self.samples:
                peak = max(s.tool_rss for s in self.samples[case])
                print(f"  {case} (wait4 ru_maxrss) {mb(peak)} MB  (info)")
        redis_hwm = vm_hwm_bytes(self.redis_pid)
        if redis_hwm is None:
            raise BenchError("redis-server is gone: its peak RSS cannot be read")
        print(f"  redis-server (VmHWM, staged payloads) {mb(redis_hwm)} MB  (info)")
        self.report_backup_memory(redis_hwm)

    def report_backup_memory(self, redis_hwm: int) -> None:
        """Everything one backup runs: its coordinator, every process of its worker set (main
        processes and pool children, however many the pool has) and Redis, each at its peak.

        A sum of peaks, each reached at its own time: at least as much as was ever resident at
        once. The workers' and Redis's peaks are the largest since they started (over every
        round; Redis's over both worker sets' backups)."""
        print()
        print(f"everything a backup runs, sum of peak RSS (target <= {mb(BACKUP_MEMORY_TARGET)} "
              "MB, issue 12)")  # fmt: skip
        for case, kind in ((B_LOCAL, "local"), (self.far_case, "local"), (B_S3, "s3")):
            if case not in self.samples:
                continue
            coordinator = max(s.tool_rss for s in self.samples[case])
            workers, processes = self.sets[kind].total_peak_rss()
            total = coordinator + workers + redis_hwm
            print(
                f"  {case:{CASE_WIDTH}} coordinator {mb(coordinator):>4} + {processes} worker "
                f"processes {mb(workers):>4} + redis {mb(redis_hwm):>4} = {mb(total):>4} MB  "
                f"{verdict(total <= BACKUP_MEMORY_TARGET)}"
            )


def _ping_round_trip_ms(port: int) -> float:
    """Median of 10 PINGs to the Redis on 127.0.0.1:``port``, in ms (after one to connect)."""
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        client.ping()
        times = []
        for _ in range(10):
            started = time.perf_counter()
            client.ping()
            times.append(time.perf_counter() - started)
    finally:
        client.close()
    return 1000 * statistics.median(times)


def _session_args() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS_ENV["AWS_DEFAULT_REGION"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=None, help="pgbench scale (default 100)")
    parser.add_argument("--noise-rows", type=int, default=None,
                        help="rows of md5 text beside pgbench's tables (default 0)")
    parser.add_argument("--dataset", choices=sorted(DATASETS),
                        help="bench-peers' datasets: pgbench (scale 100) or prod (scale 50 and "
                             "4,000,000 rows of md5 text, mixed data); --scale and --noise-rows "
                             "change them")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--skip-restore", action="store_true", help="time backups only")
    parser.add_argument("--broker-delay-ms", type=float, default=FAR_BROKER_ONE_WAY_MS,
                        help="one-way delay of the far-broker case's proxy (default "
                             f"{FAR_BROKER_ONE_WAY_MS:g}: a 50 ms round trip)")  # fmt: skip
    parser.add_argument("--skip-far-broker", action="store_true",
                        help="no far-broker case (no delaying proxy)")  # fmt: skip
    parser.add_argument("--keep-logs", action="store_true",
                        help="copy the logs to ./bench-logs-<time> at the end")  # fmt: skip
    args = parser.parse_args()
    scale, noise_rows = DATASETS[args.dataset or "pgbench"]
    args.scale = scale if args.scale is None else args.scale
    args.noise_rows = noise_rows if args.noise_rows is None else args.noise_rows
    if args.noise_rows < 0:
        parser.error("--noise-rows must be at least 0")
    if args.scale < 1 or args.rounds < 1:
        parser.error("--scale and --rounds must be at least 1")
    if args.broker_delay_ms < 0:
        parser.error("--broker-delay-ms must be at least 0")
    started = time.monotonic()
    print(
        f"bench/backup.py: scale {args.scale}, {args.noise_rows:,} noise rows, "
        f"{args.rounds} round(s), {os.cpu_count()} CPUs, "
        f"load average at start {load_average()}",
        flush=True,
    )

    def body(workdir: Path, stack: contextlib.ExitStack[bool | None]) -> None:
        bench = Bench(args, workdir, stack)
        bench.start_postgres()
        bench.start_services()
        for number in range(1, args.rounds + 1):
            bench.one_round(number)
        bench.report()

    return run_bench("backup", started, args.keep_logs, body)


if __name__ == "__main__":
    sys.exit(main())
