"""WAL archive and fetch throughput of cloud-dump, one process per segment as PostgreSQL runs it.

Set-up, once: a PostgreSQL 15 cluster (archive_mode off, ``wal_keep_size`` high so nothing is
recycled) writes real WAL (``pgbench -i``, then pgbench transactions after checkpoints, so the
segments carry full-page images as in production) until SEGMENTS completed segments exist; they
are copied out with ``global/pg_control`` (wal-push reads the system identifier there) and the
cluster is removed. Then a private Redis, a moto S3 server with one bucket and two Celery workers
(``-Q parts,wal -c 1``) writing to it.

Archive, per row: a fresh stand-in PGDATA (``pg_wal/<segments>`` hard-linked to the copies,
``pg_wal/archive_status/<name>.ready`` for each, ``global/pg_control``) and an empty archive
(its own ``CLOUD_DUMP_CLUSTER``). The archiver is emulated: for each segment in order,
``/bin/sh -c "<cloud-dump> wal-push %p %f --config FILE"`` with the data directory as working
directory (what PostgreSQL's ``system()`` does), then ``.ready`` renamed to ``.done`` after a
0 exit. Settings come from the config file, as README.md recommends (zstd, the default).

Already archived: the same command, 20 times, for a segment whose spool marker exists (the
path every look-ahead segment takes), and 5 times with an empty spool (a full round trip that
the worker answers "already archived").

Fetch, per row: a fresh directory stands for the restored PGDATA; for each segment in order
``/bin/sh -c "<cloud-dump> wal-fetch %f %p --config FILE"`` with ``%p = pg_wal/RECOVERYXLOG``,
then (untimed, as replay would be) the bytes are compared with the original and RECOVERYXLOG
deleted. After the last segment, the next name is asked for once and must answer 1.

The calls start detached helpers that outlive them (the WAL pusher, the WAL prefetcher): the
benchmark is a child subreaper, so they are reparented to it; after each row it waits for them
to exit and counts their CPU seconds with the calls' (``wait4``).

Reported per row: segments/s (SEGMENTS / the sum of the calls' wall times, process start to
exit: the time PostgreSQL's archiver or startup process spends waiting), mean and median call,
CPU seconds of the calls (``wait4``), of the helpers they started, of the two workers, of Redis
and of moto, and the S3 requests moto served per segment. Then PASS/MISS against the targets
and the reference tools as ratios, and (unless ``--no-breakdown``) where the time of one call
goes: interpreter start, imports (``python -X importtime``), and the phases of the calls timed
inside the process.

Usage (as root, from the repository): ``.venv/bin/python bench/wal.py [--segments 64]
[--no-sync-rows] [--no-breakdown] [--keep-logs]``. Everything it starts is stopped by PID, and
its temporary directories removed, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
import lz4.frame
import zstandard

from bench.common import (
    AWS_ENV,
    CLOUD_DUMP,
    PYTHON,
    REPO_ROOT,
    BenchError,
    become_subreaper,
    load_average,
    log_tail,
    mb,
    moto_requests_since,
    reap_helpers,
    run_bench,
    run_timed,
    start_services,
    start_worker,
    tree_cpu_seconds,
    verdict,
    walsenders_reaped,
)
from coordinator.codecs import CODECS, compress_wal
from coordinator.wait import wait_until
from devrig.postgres import PgCluster, start_cluster
from devrig.services import WorkerPool

# wal-push's zstd level (coordinator/codecs.py), named in the breakdown's compression rows.
WAL_ZSTD_LEVEL = CODECS["zstd"].wal_level

PG_MAJOR = 15
S3_PREFIX = "bench"
WORKERS = 2
SEGMENT_BYTES = 16 * 1024 * 1024
RECOVERYXLOG = "pg_wal/RECOVERYXLOG"
REPEATS_MARKED = 20
REPEATS_UNMARKED = 5
BREAKDOWN_PUSHES = 5

# Targets of the issue, and the reference tools measured on this machine (segments/s).
ARCHIVE_TARGET = 10.0
FETCH_TARGET = 12.0
ALREADY_ARCHIVED_TARGET_MS = 60.0
REFERENCES = {
    "push": [
        ("pgBackRest 2.45 archive-push async, process-max 2, zst", 10.5),
        ("pgBackRest 2.45 archive-push sync", 6.8),
        ("barman-cloud-wal-archive", 1.3),
    ],
    "fetch": [
        ("pgBackRest 2.45 archive-get async", 12.3),
        ("pgBackRest 2.45 archive-get sync", 11.7),
        ("barman-cloud-wal-restore", 1.6),
    ],
}
# The PostgreSQL tool nearest to WAL archiving, measured in this run (issue 12: "add the
# same-compression row"): pg_receivewal streaming the same segments from a slot into a local
# directory. No PostgreSQL tool writes zstd WAL (pg_receivewal -Z takes gzip or lz4, in 15 as in
# 17), and cloud-dump's WAL default is zstd level 1: lz4, the fast one, is the closest.
RECEIVEWAL_COMPRESSION = "lz4"
RECEIVEWAL_LABEL = "pg_receivewal -Z lz4 (no PG tool writes zstd)"
RECEIVEWAL_SLOT = "bench_receivewal"
COMPONENTS = ["calls", "helpers", "workers", "redis", "moto"]
# The detached helpers the WAL commands start (reaped and counted by reap_helpers).
HELPER_MODULES = ["coordinator.wal.push.helper", "coordinator.wal.fetch.helper"]
# Functions timed inside one call by _DRIVER ("module:attribute" or "module:Class.method").
# A function's time is summed over its calls in the process (a look-ahead batch reads and
# compresses several segments); its calls and None results are counted too.
PUSH_WRAPS = [
    "coordinator.wal.push.command:run_wal_push",
    "coordinator.wal.push.command:_push",
    "coordinator.wal.push.command:_push_through_pusher",
    "coordinator.settings:encryption_of",
    "coordinator.wal.push.encode:read_wal",
    "coordinator.wal.push.work:open_work",
    "coordinator.wal.push.encode:archive_for",
    "coordinator.wal.push.encode:encode_wal",
    "coordinator.codecs:compress_wal",
    "coordinator.wal.push.work:WalWork.push",
    "coordinator.wal.push.work:WalWork.close",
    "coordinator.wal.push.command:_record",
    "coordinator.wal.push.command:prune_markers",
]
FETCH_WRAPS = [
    "coordinator.wal.fetch.command:run_wal_fetch",
    "coordinator.wal.fetch.served:serve_without_cli",
    "coordinator.wal.fetch.spool:Spool.take",
    "coordinator.wal.fetch.command:_await_prefetched",
    "coordinator.wal.fetch.command:_start_prefetcher",
    "coordinator.wal.fetch.command:_fetch_directly",
    "coordinator.wal.fetch.command:_fetch",
]

# Runs cloud-dump's entry point (coordinator.cli.fastpath.main) in a fresh interpreter with the
# functions named in BENCH_WRAP (JSON) timed from inside. argv[1] is the output file, the rest is
# the cloud-dump command line; BENCH_LAUNCHED is the parent's time.time() just before it started
# the process.
_DRIVER = """
import time
entered = time.time()
import importlib, json, os, sys
out = sys.argv[1]
sys.argv = ["cloud-dump", *sys.argv[2:]]
wraps = json.loads(os.environ["BENCH_WRAP"])
spans = {}
t = time.perf_counter()
import coordinator.cli.fastpath as entry
modules = {m: importlib.import_module(m) for m in {w.split(":")[0] for w in wraps}}
spans["import"] = time.perf_counter() - t

def timed(owner, attr, key):
    original = getattr(owner, attr)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        result = None
        try:
            result = original(*args, **kwargs)
            return result
        finally:
            spans[key] = spans.get(key, 0.0) + time.perf_counter() - started
            spans[key + ":calls"] = spans.get(key + ":calls", 0) + 1
            spans[key + ":none"] = spans.get(key + ":none", 0) + (result is None)
    setattr(owner, attr, wrapper)

for spec in wraps:
    module, path = spec.split(":")
    owner = modules[module]
    *parents, attr = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    timed(owner, attr, path)
def report(code):
    spans["main"] = time.perf_counter() - t
    spans["entered"] = entered - float(os.environ["BENCH_LAUNCHED"])
    spans["finished_at"] = time.time()
    with open(out, "w") as f:
        json.dump({"code": code, "spans": spans}, f)

# A WAL command leaves through entry.leave (os._exit): report first, then leave the same way.
leave = entry.leave
entry.leave = lambda code: (report(code), leave(code))
t = time.perf_counter()
code = entry.main()
report(code)
sys.exit(code)
"""

Spans = dict[str, float]


def marker_phases(s: Spans) -> list[tuple[str, float]]:
    """The phases of a wal-push call answered by the entry point from a marker."""
    return [
        ("process start to first line (interpreter, site)", s["entered"]),
        ("import coordinator.cli.fastpath", s["import"]),
        ("flags, config file, marker check", s["main"]),
        ("interpreter exit", s["exit"]),
    ]


def push_phases(s: Spans) -> list[tuple[str, float]]:
    """The phases of one wal-push call, in order, adding up to its wall time."""
    g = s.get
    encode_other = g("encode_wal", 0) - g("compress_wal", 0)
    named = [
        ("credentials/passphrase settings", g("encryption_of", 0)),
        ("read segment(s) + sha256", g("read_wal", 0)),
        ("import celery/kombu/redis + connect to broker", g("open_work", 0)),
        ("archive identity (spool cache)", g("archive_for", 0)),
        (f"zstd level {WAL_ZSTD_LEVEL} (the first call imports zstandard)", g("compress_wal", 0)),
        ("encode_wal other (import workers.wal/pydantic)", encode_other),
        ("stage in Redis (SET), send task(s), wait, delete staged payload(s)",
         g("WalWork.push", 0)),
        ("close the broker connection", g("WalWork.close", 0)),
        ("write spool marker(s), prune", g("_record", 0) + g("prune_markers", 0)),
    ]  # fmt: skip
    inside = sum(v for _, v in named)
    return [
        ("process start to first line (interpreter, site)", s["entered"]),
        ("import coordinator.cli.fastpath + walpush & co", s["import"]),
        ("import coordinator.cli.main, argparse, config file, logging",
         s["main"] - g("run_wal_push", 0)),
        ("marker check, name check",
         g("run_wal_push", 0) - g("_push", 0) - g("_push_through_pusher", 0)),
        *([("hand to the WAL pusher (start it if none runs), wait for its marker",
            g("_push_through_pusher", 0))] if g("_push_through_pusher", 0) else []),
        *(item for item in named if g("_push", 0)),
        *([("other (layout, look-ahead choice)", g("_push", 0) - inside)] if g("_push", 0) else []),
        ("interpreter exit (atexit, module teardown)", s["exit"]),
    ]


def fetch_phases(s: Spans) -> list[tuple[str, float]]:
    """The phases of one wal-fetch call, in order, adding up to its wall time (a call that
    waited for the prefetcher counts its final rename in both the wait and the serve)."""
    g = s.get
    fast = g("serve_without_cli", 0)
    take = max(0.0, g("Spool.take", 0) - fast)  # the CLI's own, when the entry did not serve
    wait = g("_await_prefetched", 0)
    start, direct, fetch = g("_start_prefetcher", 0), g("_fetch_directly", 0), g("_fetch", 0)
    return [
        ("process start to first line (interpreter, site)", s["entered"]),
        ("import coordinator.cli.fastpath + walfetch", s["import"]),
        ("served by the entry point (no CLI): sidecar check + rename", fast),
        ("import coordinator.cli.main, argparse, config file, logging",
         s["main"] - fast - g("run_wal_fetch", 0)),
        ("serve from the spool in the CLI: sidecar check + rename", take),
        ("wait for the prefetcher to spool it (polling)", wait),
        ("start the detached prefetcher", start),
        ("open storage (import boto3/botocore), keys", direct - fetch),
        ("fetch it directly (LIST, HEAD, GET, verify, write)", fetch),
        ("other (names, plan, spool checks)",
         g("run_wal_fetch", 0) - take - wait - start - direct),
        ("interpreter exit (atexit, module teardown)", s["exit"]),
    ]  # fmt: skip


def fetch_kind(s: Spans) -> str:
    """What one wal-fetch call did, for the breakdown's classes."""
    if s.get("_fetch_directly"):
        kind = "not spooled: fetched it directly"
    elif s.get("_await_prefetched") and s.get("Spool.take:calls", 0) > 1:
        kind = "served after waiting for the prefetcher"
    elif not s.get("run_wal_fetch"):
        kind = "served by the entry point, without the CLI"
    else:
        kind = "served from the spool"
    return kind + (", started the prefetcher" if s.get("_start_prefetcher") else "")


@dataclass(frozen=True)
class Call:
    """One finished command: wall seconds and CPU seconds of it and what it waited for."""

    wall_s: float
    cpu_s: float
    code: int


@dataclass
class Row:
    """One measured loop over the segments (or repeated calls of one)."""

    label: str
    kind: str  # "push", "fetch" or "repeat"
    calls: list[Call]
    loop_s: float
    cpu: dict[str, float]
    s3_requests: Counter[str]
    target: float | None = None
    reference: bool = False  # a PostgreSQL tool, not cloud-dump

    @property
    def busy_s(self) -> float:
        return sum(c.wall_s for c in self.calls)

    @property
    def rate(self) -> float:
        return len(self.calls) / self.busy_s

    @property
    def mean_ms(self) -> float:
        return 1000 * statistics.mean(c.wall_s for c in self.calls)

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(c.wall_s for c in self.calls)


@dataclass
class Bench:
    """Everything started for the run, and the rows measured."""

    args: argparse.Namespace
    workdir: Path
    stack: contextlib.ExitStack
    segments: list[str] = field(default_factory=list)
    sysid: str = ""
    redis_pid: int = 0
    redis_port: int = 0
    moto_pid: int = 0
    moto_log: Path = Path()
    moto_endpoint: str = ""
    bucket: str = ""
    s3: Any = None
    broker: str = ""
    pool: WorkerPool | None = None
    rows: list[Row] = field(default_factory=list)
    breakdown_lines: list[str] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def wal_source(self) -> Path:
        """The copied segments and pg_control: every stand-in PGDATA links to these."""
        return self.workdir / "source"

    # --- set-up ---------------------------------------------------------------------------------

    def generate_wal(self) -> None:
        """Real WAL from a PostgreSQL 15 cluster: SEGMENTS completed segments, copied out."""
        wanted = self.args.segments
        cluster = start_cluster(
            PG_MAJOR,
            settings={
                "archive_mode": False,
                "wal_keep_size": f"{(wanted + 64) * 16}MB",
                "max_wal_size": "8GB",
                "checkpoint_timeout": "1h",
            },
        )
        try:
            # Before any WAL is written: the slot keeps where pg_receivewal will start.
            cluster.sql(f"SELECT pg_create_physical_replication_slot('{RECEIVEWAL_SLOT}', true)")
            self._write_wal(cluster, wanted)
            self.receivewal(cluster)
        finally:
            cluster.destroy()

    def _write_wal(self, cluster: PgCluster, wanted: int) -> None:
        started = time.perf_counter()
        pgbench = [str(cluster.bin_dir / "pgbench"), "-h", str(cluster.socket_dir),
                   "-p", str(cluster.port), "-U", "postgres"]  # fmt: skip
        first = _segment_number(cluster.sql("SELECT pg_walfile_name(pg_current_wal_lsn())")[0][0])
        print(f"PostgreSQL {PG_MAJOR} on port {cluster.port}: writing {wanted} segments of WAL "
              f"(pgbench -i -s {self.args.scale}, then pgbench -T 3 after each CHECKPOINT)",
              flush=True)  # fmt: skip
        run_timed([*pgbench, "-i", "-q", "-s", str(self.args.scale), "postgres"],
                  self.logs / "pgbench.log", what="pgbench -i")  # fmt: skip

        def current() -> int:
            return _segment_number(
                cluster.sql("SELECT pg_walfile_name(pg_current_wal_lsn())")[0][0]
            )

        while current() <= first + wanted:
            cluster.sql("CHECKPOINT")  # the next updates write full-page images, as in production
            run_timed([*pgbench, "-n", "-c", "2", "-j", "2", "-T", "3", "postgres"],
                      self.logs / "pgbench.log", what="pgbench -T")  # fmt: skip
        cluster.sql("SELECT pg_switch_wal()")
        last = current() - 1  # every segment before the one being written is complete
        numbers = range(last - wanted + 1, last + 1)
        self.segments = [_segment_name(1, n) for n in numbers]
        source_wal = self.wal_source / "pg_wal"
        source_wal.mkdir(parents=True)
        (self.wal_source / "global").mkdir()
        shutil.copyfile(cluster.datadir / "global" / "pg_control",
                        self.wal_source / "global" / "pg_control")  # fmt: skip
        compressor = zstandard.ZstdCompressor(level=3)
        compressed = 0
        for name in self.segments:
            shutil.copyfile(cluster.datadir / "pg_wal" / name, source_wal / name)
            compressed += len(compressor.compress((source_wal / name).read_bytes()))
        self.sysid = str(cluster.system_identifier())
        total = len(self.segments) * SEGMENT_BYTES
        print(f"  {self.segments[0]} .. {self.segments[-1]} in "
              f"{time.perf_counter() - started:.0f} s; zstd -3 of all: {mb(compressed)} of "
              f"{mb(total)} MB ({total / compressed:.1f}x); system identifier {self.sysid}",
              flush=True)  # fmt: skip

    def receivewal(self, cluster: PgCluster) -> None:
        """The reference row: pg_receivewal streams exactly the benchmark's segments (the slot
        advanced to the first, ``--endpos`` the end of the last) into a local directory,
        compressed, fsyncing each; then, untimed, each file must decompress to the original."""
        first, last = _segment_number(self.segments[0]), _segment_number(self.segments[-1])
        cluster.sql("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)",
                    (RECEIVEWAL_SLOT, _segment_lsn(first)))  # fmt: skip
        out = self.workdir / "receivewal"
        out.mkdir()
        postmaster = cluster.postmaster_pid
        assert postmaster is not None
        before = tree_cpu_seconds(postmaster)
        timed = run_timed(
            [str(cluster.bin_dir / "pg_receivewal"), "-D", str(out), "-S", RECEIVEWAL_SLOT,
             "--endpos", _segment_lsn(last + 1), "--no-loop",
             f"--compress={RECEIVEWAL_COMPRESSION}", "-h", "127.0.0.1", "-p", str(cluster.port),
             "-U", cluster.repl_user, "-w"],
            self.logs / "pg_receivewal.log",
            env={**os.environ, "PGPASSWORD": cluster.repl_password}, what="pg_receivewal",
        )  # fmt: skip
        if not wait_until(lambda: walsenders_reaped(postmaster), timeout_s=30, first_s=0.005):
            raise BenchError("pg_receivewal: the walsender was not reaped within 30 s")
        walsender_s = tree_cpu_seconds(postmaster) - before
        for name in self.segments:
            stored = out / f"{name}.{RECEIVEWAL_COMPRESSION}"
            if lz4.frame.decompress(stored.read_bytes()) != (
                self.wal_source / "pg_wal" / name
            ).read_bytes():
                raise BenchError(f"pg_receivewal: {stored.name} differs from the original")
        shutil.rmtree(out)
        n = len(self.segments)
        # One stream, not one process per segment: each "call" is an nth of it.
        calls = [Call(timed.wall_s / n, timed.cpu_s / n, 0)] * n
        cpu = {"calls": timed.cpu_s, "helpers": 0.0, "workers": 0.0, "redis": 0.0, "moto": 0.0}
        row = Row(RECEIVEWAL_LABEL, "push", calls, timed.wall_s, cpu, Counter(), reference=True)
        self.rows.append(row)
        print(f"  {RECEIVEWAL_LABEL:46} {row.rate:6.1f} segments/s  ({timed.wall_s:.2f} s; CPU "
              f"{timed.cpu_s:.1f} s, walsender {walsender_s:.1f} s)", flush=True)  # fmt: skip

    def start_services(self) -> None:
        services = start_services(self.stack, self.workdir, self.logs)
        self.redis_pid, self.redis_port = services.redis_pid, services.redis_port
        self.moto_pid, self.moto_log = services.moto_pid, services.moto_log
        self.moto_endpoint = services.moto_endpoint
        session = boto3.session.Session(
            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        )
        self.s3 = session.client("s3", endpoint_url=self.moto_endpoint)
        self.stack.callback(self.s3.close)
        self.bucket = f"bench-{uuid.uuid4().hex[:12]}"
        self.s3.create_bucket(Bucket=self.bucket)
        self.broker = f"redis://127.0.0.1:{self.redis_port}/0"
        self.pool = WorkerPool(self.broker)
        self.stack.callback(self.pool.stop)
        env = {**_clean_env(), **self.storage_env, "CLOUD_DUMP_BROKER_URL": self.broker}
        for i in range(1, WORKERS + 1):
            start_worker(self.pool, f"wal{i}@bench", env, self.logs / f"worker{i}.log")
        self.pool.wait_ready()
        print(f"redis, moto ({self.moto_endpoint}, bucket {self.bucket}) and {WORKERS} workers "
              f"(-Q parts,wal -c 1) up", flush=True)  # fmt: skip

    @property
    def storage_env(self) -> dict[str, str]:
        return {
            "CLOUD_DUMP_STORAGE": f"s3://{self.bucket}/{S3_PREFIX}",
            "CLOUD_DUMP_S3_ENDPOINT": self.moto_endpoint,
            **AWS_ENV,
        }

    def config_file(self, name: str, settings: Mapping[str, str]) -> Path:
        """A KEY=VALUE file, mode 0600, as /etc/cloud-dump/archive.conf would be."""
        path = self.workdir / f"{name}.conf"
        path.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        path.chmod(0o600)
        return path

    def push_config(self, cluster: str) -> Path:
        return self.config_file(
            f"push-{cluster}",
            {"CLOUD_DUMP_STORAGE": self.storage_env["CLOUD_DUMP_STORAGE"],
             "CLOUD_DUMP_BROKER_URL": self.broker, "CLOUD_DUMP_CLUSTER": cluster},
        )  # fmt: skip

    def fetch_config(self, cluster: str) -> Path:
        return self.config_file(
            f"fetch-{cluster}", {**self.storage_env, "CLOUD_DUMP_CLUSTER": cluster}
        )

    def pgdata(self, name: str) -> Path:
        """A stand-in data directory: every segment linked in, each marked ``.ready``."""
        root = self.workdir / "pgdata" / name
        status = root / "pg_wal" / "archive_status"
        status.mkdir(parents=True)
        (root / "global").mkdir()
        shutil.copyfile(self.wal_source / "global" / "pg_control", root / "global" / "pg_control")
        for segment in self.segments:
            (root / "pg_wal" / segment).hardlink_to(self.wal_source / "pg_wal" / segment)
            (status / f"{segment}.ready").touch()
        return root

    # --- running one call -----------------------------------------------------------------------

    def call(self, command: str, cwd: Path, log: Path, env: Mapping[str, str] | None = None,
             ok: Sequence[int] = (0,)) -> Call:  # fmt: skip
        """``/bin/sh -c command`` in ``cwd``, as PostgreSQL's ``system()`` runs it."""
        with log.open("ab") as out:
            out.write(f"$ {command}\n".encode())
            out.flush()
            started = time.perf_counter()
            proc = subprocess.Popen(
                ["/bin/sh", "-c", command],
                cwd=cwd,
                env=dict(env) if env is not None else _clean_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            wall = time.perf_counter() - started
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code not in ok:
            raise BenchError(f"`{command}` (in {cwd}) exited with {code}; log {log}:\n"
                             f"{log_tail(log)}")  # fmt: skip
        return Call(wall, usage.ru_utime + usage.ru_stime, code)

    # --- accounting -----------------------------------------------------------------------------

    def server_cpu(self) -> dict[str, float]:
        assert self.pool is not None
        return {
            "workers": sum(tree_cpu_seconds(p.pid) for p in self.pool.processes),
            "redis": tree_cpu_seconds(self.redis_pid),
            "moto": tree_cpu_seconds(self.moto_pid),
        }

    def moto_offset(self) -> int:
        return self.moto_log.stat().st_size

    def s3_requests_since(self, offset: int) -> Counter[str]:
        """Requests moto logged since ``offset``, by method (``bench.common``)."""
        return moto_requests_since(self.s3, self.bucket, self.moto_log, offset)

    @contextlib.contextmanager
    def measured(self, label: str, kind: str, target: float | None) -> Iterator[list[Call]]:
        calls: list[Call] = []
        os.sync()
        before, offset = self.server_cpu(), self.moto_offset()
        started = time.perf_counter()
        yield calls
        loop_s = time.perf_counter() - started
        helpers_s = reap_helpers(HELPER_MODULES)  # e.g. the WAL pusher's idle exit
        requests = self.s3_requests_since(offset)
        after = self.server_cpu()
        cpu = {"calls": sum(c.cpu_s for c in calls), "helpers": helpers_s}
        cpu.update({name: after[name] - before[name] for name in after})
        row = Row(label, kind, calls, loop_s, cpu, requests, target)
        self.rows.append(row)
        rate = f"{row.rate:6.1f} segments/s" if kind != "repeat" else f"{row.mean_ms:6.0f} ms mean"
        print(f"  {label:46} {rate}  (mean call {row.mean_ms:4.0f} ms, median "
              f"{row.median_ms:4.0f} ms; loop {loop_s:5.1f} s)", flush=True)  # fmt: skip

    # --- the cases ------------------------------------------------------------------------------

    def archive(self, label: str, cluster: str, look_ahead: int | None,
                target: float | None) -> Path:  # fmt: skip
        """Push every segment as the archiver would; the stand-in PGDATA is returned."""
        root = self.pgdata(cluster)
        config = self.push_config(cluster)
        flags = "" if look_ahead is None else f" --look-ahead {look_ahead}"
        command = f"{CLOUD_DUMP} wal-push %p %f --config {config}{flags}"
        log = self.logs / f"push-{cluster}.log"
        status = root / "pg_wal" / "archive_status"
        with self.measured(label, "push", target) as calls:
            for name in self.segments:
                calls.append(self.call(_expand(command, p=f"pg_wal/{name}", f=name), root, log))
                (status / f"{name}.ready").rename(status / f"{name}.done")
        self.check_archive(cluster)
        return root

    def check_archive(self, cluster: str) -> None:
        keys: set[str] = set()
        paginator = self.s3.get_paginator("list_objects_v2")
        prefix = f"{S3_PREFIX}/{cluster}/wal_archive/"
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            keys.update(o["Key"][len(prefix) :] for o in page.get("Contents", []))
        missing = [n for n in self.segments if f"{n}.zst" not in keys]
        if missing:
            raise BenchError(f"archive {cluster}: {len(missing)} segments missing, e.g. "
                             f"{missing[0]}")  # fmt: skip

    def already_archived(self, root: Path, cluster: str) -> None:
        """Repeated pushes of an archived segment: with its spool marker, then without one."""
        config = self.push_config(cluster)
        name = self.segments[len(self.segments) // 2]
        log = self.logs / f"repeat-{cluster}.log"
        command = f"{CLOUD_DUMP} wal-push %p %f --config {config}"
        expanded = _expand(command, p=f"pg_wal/{name}", f=name)
        label = f"already archived, spool marker ({REPEATS_MARKED}x)"
        with self.measured(label, "repeat", ALREADY_ARCHIVED_TARGET_MS) as calls:
            for _ in range(REPEATS_MARKED):
                calls.append(self.call(expanded, root, log))
        label = f"already archived, empty spool ({REPEATS_UNMARKED}x)"
        (self.workdir / "spools").mkdir(exist_ok=True)  # --spool-dir's parent must exist
        with self.measured(label, "repeat", None) as calls:
            for i in range(REPEATS_UNMARKED):
                spool = self.workdir / "spools" / f"{cluster}-{i}"
                calls.append(self.call(f"{expanded} --spool-dir {spool}", root, log))

    def fetch(self, label: str, cluster: str, prefetch: int | None,
              target: float | None) -> None:  # fmt: skip
        """Fetch every segment as recovery would, into a fresh stand-in PGDATA."""
        root = self.workdir / "restored" / f"{cluster}-{prefetch}"
        (root / "pg_wal").mkdir(parents=True)
        config = self.fetch_config(cluster)
        flags = "" if prefetch is None else f" --prefetch {prefetch}"
        command = f"{CLOUD_DUMP} wal-fetch %f %p --config {config}{flags}"
        log = self.logs / f"fetch-{cluster}-{prefetch}.log"
        target_file = root / RECOVERYXLOG
        with self.measured(label, "fetch", target) as calls:
            for name in self.segments:
                calls.append(self.call(_expand(command, p=RECOVERYXLOG, f=name), root, log))
                # Replay stands here: it is not a cost of the restore_command, but is timed in
                # the loop's total (the rate uses the calls' wall time only).
                if target_file.read_bytes() != (self.wal_source / "pg_wal" / name).read_bytes():
                    raise BenchError(f"wal-fetch {name}: bytes differ from the original")
                target_file.unlink()
        after = _segment_name(1, _segment_number(self.segments[-1]) + 1)
        end = self.call(_expand(command, p=RECOVERYXLOG, f=after), root, log, ok=(0, 1))
        if end.code != 1 or target_file.exists():
            raise BenchError(f"wal-fetch {after} (past the end) answered {end.code}, not 1")
        shutil.rmtree(root)

    # --- where the time of one call goes ---------------------------------------------------------

    def breakdown(self) -> None:
        out = self.breakdown_lines
        log = self.logs / "breakdown.log"
        env = _clean_env()
        starts = [self.call(f"{PYTHON} -c pass", self.workdir, log, env).wall_s for _ in range(10)]
        bare = [self.call(f"{PYTHON} -I -S -c pass", self.workdir, log, env).wall_s
                for _ in range(10)]  # fmt: skip
        out.append(f"interpreter start: venv python (site, editable-install finder) "
                   f"{_ms(statistics.median(starts))} ms median; python -I -S "
                   f"{_ms(statistics.median(bare))} ms")  # fmt: skip

        root = self.pgdata("breakdown")
        config = self.push_config("breakdown")
        segs = self.segments

        def push(name: str, *flags: str) -> list[str]:
            return ["wal-push", f"pg_wal/{name}", name, "--config", str(config), *flags]

        # A fresh push of one segment (look-ahead 0), then the already-archived fast path.
        fresh = [self.driven(root, log, push(n, "--look-ahead", "0"), PUSH_WRAPS)
                 for n in segs[:BREAKDOWN_PUSHES]]  # fmt: skip
        fast = [self.driven(root, log, push(segs[0]), []) for _ in range(10)]
        out.append("wal-push, already archived (spool marker), median of 10 calls, ms:")
        out.extend(_phase_lines(fast, marker_phases))
        out.append(f"wal-push of one new segment (--look-ahead 0), median of {len(fresh)} "
                   "calls, ms:")  # fmt: skip
        out.extend(_phase_lines(fresh, push_phases))
        # Calls with the default look-ahead, in order, as the archiver makes them: the first
        # starts the pusher and waits; the later ones find their marker or wait for it.
        waits: dict[str, list[Spans]] = {}
        for name in segs[2 * BREAKDOWN_PUSHES : 2 * BREAKDOWN_PUSHES + 12]:
            spans = self.driven(root, log, push(name), PUSH_WRAPS)
            kind = ("waited for the pusher" if spans.get("_push_through_pusher")
                    else "found its marker")  # fmt: skip
            waits.setdefault(kind, []).append(spans)
        for kind, samples in waits.items():
            out.append(f"wal-push, look-ahead 8, fresh segments in order, {kind}: "
                       f"{len(samples)} of 12 calls, median ms (the driver imports the wrapped "
                       "modules first, which a real call answered from its marker never "
                       "does: see the already-archived row):")  # fmt: skip
            out.extend(_phase_lines(samples, push_phases))
        task_s = self.worker_task_seconds()
        if task_s:
            out.append(f"worker side, cloud_dump.push_wal (GET archive info, LIST, stage GET, "
                       f"PUT): {_ms(statistics.median(task_s))} ms median, "
                       f"{_ms(statistics.quantiles(task_s, n=10)[-1])} ms p90, over "
                       f"{len(task_s)} tasks of the whole run (workers' logs)")  # fmt: skip

        # wal-fetch calls in order from a fresh directory, classified by what each one did.
        restored = self.workdir / "restored" / "breakdown"
        (restored / "pg_wal").mkdir(parents=True)
        fetch_config = self.fetch_config("la8")
        kinds: dict[str, list[Spans]] = {}
        for name in segs[:17]:
            spans = self.driven(restored, log, ["wal-fetch", name, RECOVERYXLOG, "--config",
                                                str(fetch_config)], FETCH_WRAPS)  # fmt: skip
            (restored / RECOVERYXLOG).unlink()
            kind = fetch_kind(spans)
            kinds.setdefault(kind, []).append(spans)
        for kind, samples in kinds.items():
            out.append(f"wal-fetch (prefetch 8), {kind}: {len(samples)} of 17 calls, median ms:")
            out.extend(_phase_lines(samples, fetch_phases))

        # Imports (-X importtime, one call each).
        (self.workdir / "spools").mkdir(exist_ok=True)  # --spool-dir's parent must exist
        cases = [
            ("wal-push fast path", root, push(segs[0])),
            # An empty spool: no marker, so the whole push runs (the worker then finds the
            # segment archived, which does not change what is imported).
            ("wal-push new segment", root, push(segs[BREAKDOWN_PUSHES], "--look-ahead", "0",
             "--spool-dir", str(self.workdir / "spools" / "importtime"))),
        ]
        cold = self.workdir / "restored" / "importtime"
        (cold / "pg_wal").mkdir(parents=True)
        for i, title in enumerate(("wal-fetch going to storage", "wal-fetch from the spool")):
            cases.append((title, cold, ["wal-fetch", segs[i], RECOVERYXLOG, "--config",
                                        str(fetch_config)]))  # fmt: skip
        for title, cwd, argv in cases:
            imports = self.importtime(cwd, log, argv)
            total = sum(us for _, us in imports)
            top = ", ".join(f"{n} {us / 1000:.0f}" for n, us in imports[:10])
            out.append(f"imports, {title}: {total / 1000:.0f} ms (-X importtime, top-level "
                       f"cumulative ms: {top})")  # fmt: skip

        # Compression alone, in this process, over every segment, as wal-push compresses.
        started = time.perf_counter()
        for segment in segs:
            compress_wal((self.wal_source / "pg_wal" / segment).read_bytes(), "zstd")
        per = (time.perf_counter() - started) / len(segs)
        out.append(f"zstd level {WAL_ZSTD_LEVEL} of one segment (read + compress, warm, "
                   "in-process): "
                   f"{_ms(per)} ms mean over {len(segs)} segments")  # fmt: skip

    def driven(self, cwd: Path, log: Path, argv: list[str], wraps: list[str]) -> Spans:
        """One call through _DRIVER: the timed spans, interpreter start, exit and wall (s)."""
        result = self.workdir / "driver.json"
        env = {**_clean_env(), "BENCH_LAUNCHED": repr(time.time()),
               "BENCH_WRAP": json.dumps(wraps)}  # fmt: skip
        args = " ".join(_shell_quote(a) for a in argv)
        command = f"{PYTHON} -c {_shell_quote(_DRIVER)} {result} {args}"
        call = self.call(command, cwd, log, env)
        finished = time.time()
        data = json.loads(result.read_text())
        result.unlink()
        spans: Spans = data["spans"]
        spans["wall"] = call.wall_s
        spans["exit"] = finished - spans.pop("finished_at")
        return spans

    def importtime(self, cwd: Path, log: Path, argv: list[str]) -> list[tuple[str, int]]:
        """Top-level imports of one call and their cumulative microseconds, largest first."""
        err = self.workdir / "importtime.txt"
        args = " ".join(_shell_quote(a) for a in argv)
        self.call(f"{PYTHON} -X importtime {CLOUD_DUMP} {args} 2>{err}", cwd, log)
        totals: Counter[str] = Counter()
        for line in err.read_text().splitlines():
            match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S+)", line)
            if match:  # one space after the bar: imported by the top level
                totals[match.group(2)] += int(match.group(1))
        err.unlink()
        return totals.most_common()

    def worker_task_seconds(self) -> list[float]:
        assert self.pool is not None
        runtimes = []
        for proc in self.pool.processes:
            text = proc.log_path.read_text(errors="replace")
            runtimes += [
                float(s)
                for s in re.findall(r"cloud_dump\.push_wal\[[^]]+\] succeeded in ([\d.]+)s", text)
            ]
        return runtimes  # fmt: skip

    # --- report ---------------------------------------------------------------------------------

    def report(self) -> None:
        n = len(self.segments)
        print()
        print(f"=== results: {n} real WAL segments of PostgreSQL {PG_MAJOR} (16 MiB), zstd, "
              f"{WORKERS} workers, moto S3; one process per segment ===")  # fmt: skip
        header = (
            f"{'case':46} {'seg/s':>6} {'mean ms':>7} {'median':>6} {'loop s':>6} "
            f"{'calls':>5} {'helpers':>7} {'workers':>7} {'redis':>5} {'moto':>5}  "
            "S3 requests/segment"
        )
        print(header)
        print("-" * len(header))
        for row in self.rows:
            per = len(self.segments) if row.kind != "repeat" else len(row.calls)
            requests = " ".join(f"{m} {c / per:.1f}" for m, c in sorted(row.s3_requests.items()))
            rate = f"{row.rate:6.1f}" if row.kind != "repeat" else f"{'-':>6}"
            print(f"{row.label:46} {rate} {row.mean_ms:7.0f} {row.median_ms:6.0f} "
                  f"{row.loop_s:6.1f} "
                  + " ".join(f"{row.cpu[c]:{w}.1f}" for c, w in zip(COMPONENTS, (5, 7, 7, 5, 5),
                                                                       strict=True))
                  + f"  {requests or '-'}")  # fmt: skip
        print("(seg/s: segments / sum of the calls' wall time; CPU seconds during the row: the "
              "calls themselves (wait4), the detached WAL pusher/prefetcher they started "
              "(wait4, as subreaper), both workers, redis, moto)")  # fmt: skip
        self.report_targets()
        if self.breakdown_lines:
            print()
            print("where the time of one call goes")
            for line in self.breakdown_lines:
                print(f"  {line}")

    def report_targets(self) -> None:
        print()
        print("targets and reference tools (ratio = cloud-dump / reference)")
        for row in self.rows:
            if row.target is None:
                continue
            if row.kind == "repeat":
                print(f"  {row.label:46} mean {row.mean_ms:5.1f} ms (median {row.median_ms:.1f})"
                      f"  target < {row.target:.0f} ms  "
                      f"{verdict(row.mean_ms < row.target)}")  # fmt: skip
                continue
            print(f"  {row.label:46} {row.rate:5.1f} segments/s  target >= {row.target:.0f}  "
                  f"{verdict(row.rate >= row.target)}")  # fmt: skip
            for name, reference in REFERENCES[row.kind]:
                print(f"      vs {name:56} {reference:5.1f}  {row.rate / reference:5.2f}x")
            for ref in (r for r in self.rows if r.reference and r.kind == row.kind):
                print(f"      vs {ref.label + ', this run':56} {ref.rate:5.1f}  "
                      f"{row.rate / ref.rate:5.2f}x")  # fmt: skip
        extra = [r for r in self.rows
                 if r.target is None and r.kind != "repeat" and not r.reference]  # fmt: skip
        for row in extra:
            best = max(ref for _, ref in REFERENCES[row.kind])
            print(f"  {row.label:46} {row.rate:5.1f} segments/s  (info; "
                  f"{row.rate / best:.2f}x of the best reference, {best})")  # fmt: skip


def _phase_lines(
    samples: list[Spans], phases: Callable[[Spans], list[tuple[str, float]]]
) -> list[str]:
    """Median of each phase over ``samples``, and of the wall time."""
    table = [phases(s) for s in samples]
    lines = []
    for i, (label, _) in enumerate(table[0]):
        value = statistics.median(row[i][1] for row in table)
        lines.append(f"  {label:54} {_ms(value):>6}")
    wall = statistics.median(s["wall"] for s in samples)
    lines.append(f"  {'= wall time of the call':54} {_ms(wall):>6}")
    return lines


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f}"


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _expand(command: str, p: str, f: str) -> str:
    """PostgreSQL's %p / %f substitution (names here need no quoting)."""
    return command.replace("%p", p).replace("%f", f)


def _segment_number(name: str) -> int:
    return int(name[8:16], 16) * 256 + int(name[16:24], 16)


def _segment_lsn(number: int) -> str:
    """Where segment ``number`` starts, as PostgreSQL prints an LSN (16 MiB segments)."""
    position = number * SEGMENT_BYTES
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


def _segment_name(timeline: int, number: int) -> str:
    return f"{timeline:08X}{number // 256:08X}{number % 256:08X}"


def _clean_env() -> dict[str, str]:
    """The benchmark's environment without cloud-dump or AWS settings: the config file rules."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("CLOUD_DUMP_", "AWS_"))}  # fmt: skip



def run(bench: Bench) -> None:
    args = bench.args
    # As `make setup` does: the calls read byte-compiled modules, like a deployed install, even
    # when this shell sets PYTHONDONTWRITEBYTECODE (then each call would compile every module).
    packages = ["coordinator", "storage", "workers", "tasks"]
    subprocess.run([PYTHON, "-m", "compileall", "-q", "-j", "0", *packages], cwd=REPO_ROOT,
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    bench.generate_wal()
    bench.start_services()
    print(f"archive ({len(bench.segments)} segments, load average {load_average()})", flush=True)
    root = bench.archive("wal-push, look-ahead 8 (default)", "la8", None, ARCHIVE_TARGET)
    bench.already_archived(root, "la8")
    bench.archive("wal-push --look-ahead 32", "la32", 32, None)
    if args.sync_rows:
        bench.archive("wal-push --look-ahead 0 (one segment a call)", "la0", 0, None)
    print(f"fetch (load average {load_average()})", flush=True)
    bench.fetch("wal-fetch, prefetch 8 (default)", "la8", None, FETCH_TARGET)
    bench.fetch("wal-fetch --prefetch 32", "la8", 32, None)
    if args.sync_rows:
        bench.fetch("wal-fetch --prefetch 0 (one segment a call)", "la8", 0, None)
    if args.breakdown:
        print(f"breakdown (load average {load_average()})", flush=True)
        bench.breakdown()
    bench.report()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--segments", type=int, default=64, help="WAL segments (default 64)")
    parser.add_argument("--scale", type=int, default=10,
                        help="pgbench -i scale for the first WAL (default 10)")  # fmt: skip
    parser.add_argument("--no-sync-rows", dest="sync_rows", action="store_false",
                        help="skip the --look-ahead 0 / --prefetch 0 rows")  # fmt: skip
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                        help="skip the per-call time breakdown")  # fmt: skip
    parser.add_argument("--keep-logs", action="store_true",
                        help="copy the logs to ./bench-logs-<time> at the end")  # fmt: skip
    args = parser.parse_args()
    become_subreaper()  # so that reap_helpers can count the detached helpers' CPU
    if args.segments < 2 * BREAKDOWN_PUSHES or args.scale < 1:
        parser.error(f"--segments must be at least {2 * BREAKDOWN_PUSHES}, --scale at least 1")
    started = time.monotonic()
    print(f"bench/wal.py: {args.segments} segments, {os.cpu_count()} CPUs, load average at "
          f"start {load_average()}", flush=True)  # fmt: skip
    def body(workdir: Path, stack: contextlib.ExitStack[bool | None]) -> None:
        run(Bench(args, workdir, stack))

    return run_bench("wal", started, args.keep_logs, body)


if __name__ == "__main__":
    sys.exit(main())
