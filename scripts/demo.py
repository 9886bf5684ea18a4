"""``make demo``: the whole job on one machine, start to finish, then everything stopped.

A throwaway PostgreSQL 15 with sample data, a private Redis, two Celery workers and Flower
(with a login) started from the Procfile, storage in a local directory (or a local S3 endpoint
with DEMO_STORAGE=s3). The story an operator lives through:

1. ``archive_command`` is ``cloud-dump wal-push`` through the workers; ``check --db-url``
   proves it before anything relies on it;
2. while a writer commits rows, two backups are taken (``backup`` through the workers);
3. ``restore`` to a moment between them, by time alone (no ``--name``: restore chooses), and
   the promoted copy holds exactly the rows committed by then;
4. ``verify --all --deep``; ``expire --retain 1``; ``info`` prints the restorable window.

``DEMO_KEEP=1`` leaves the fleet running afterwards, for a look at Flower, until Ctrl-C. It
reuses the test rig's server helpers (they start servers on free loopback ports and stop them
by PID), so the demo and the tests exercise the same set-up.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.restore.restoreconfig import default_restore_config  # noqa: E402
from coordinator.wait import wait_until  # noqa: E402
from devrig import sample  # noqa: E402
from devrig.launcher import postgres_cloud_dump  # noqa: E402
from devrig.moto import StorageTarget  # noqa: E402
from devrig.postgres import PgCluster, make_postgres_dir, start_cluster  # noqa: E402
from devrig.procs import ServerProcess, free_port, port_open  # noqa: E402
from devrig.recovery import archive_command  # noqa: E402
from devrig.restored import chown_postgres, started  # noqa: E402
from storage.options import StorageOptions  # noqa: E402

BIN = Path(sys.executable).parent
# Flower refuses to start without a login (tasks/flowerauth.py): a fresh one for each demo.
FLOWER_LOGIN = ("demo", secrets.token_urlsafe(12))


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def procfile_command(name: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise SystemExit(f"demo: no '{name}' entry in the Procfile")


def cloud_dump(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(BIN / "cloud-dump"), *args], env=env, text=True,
                            capture_output=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"demo: cloud-dump {args[0]} failed ({result.returncode}): "
                         f"{result.stderr.strip()}")
    return result


def start_storage(work: Path, processes: list[ServerProcess]) -> dict[str, str]:
    if os.environ.get("DEMO_STORAGE", "local") != "s3":
        # Like a bucket, a local store's directory must exist: cloud-dump never creates it.
        # The postgres user's: restore_command (wal-fetch) runs as postgres and reads it.
        return {"CLOUD_DUMP_STORAGE": f"file://{make_postgres_dir('cloud-dump-demo-store-')}"}
    import boto3

    port = free_port()
    moto = ServerProcess("moto_server", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p",
                                         str(port)], work / "moto.log")
    processes.append(moto)
    moto.wait_until(lambda: port_open(port))
    endpoint = f"http://127.0.0.1:{port}"
    # The local test server accepts any credentials; these never leave this machine.
    creds = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo",
             "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(creds)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="demo")
    return {"CLOUD_DUMP_STORAGE": "s3://demo/backups", "CLOUD_DUMP_S3_ENDPOINT": endpoint,
            **creds}


def start_fleet(work: Path, env: dict[str, str], processes: list[ServerProcess]) -> int:
    """Redis, two workers and Flower; returns Flower's port."""
    redis_port = free_port()
    redis = ServerProcess("redis-server", ["redis-server", "--port", str(redis_port), "--bind",
                                           "127.0.0.1", "--save", "", "--appendonly", "no",
                                           "--dir", str(work)], work / "redis.log")
    processes.append(redis)
    redis.wait_until(lambda: port_open(redis_port))
    env["CLOUD_DUMP_BROKER_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    flower_port = free_port()
    shell_env = {**env, "PATH": f"{BIN}:{env['PATH']}", "WORKER_CONCURRENCY": "1",
                 "FLOWER_PORT": str(flower_port)}
    for n in (1, 2):
        processes.append(ServerProcess(
            f"worker demo-w{n}", ["bash", "-c", procfile_command("worker")],
            work / f"worker{n}.log", env={**shell_env, "WORKER_NAME": f"demo-w{n}"}, cwd=ROOT))
    flower = ServerProcess("flower", ["bash", "-c", procfile_command("flower")],
                           work / "flower.log", cwd=ROOT,
                           env={**shell_env, "FLOWER_BASIC_AUTH": ":".join(FLOWER_LOGIN)})
    processes.append(flower)
    flower.wait_until(lambda: port_open(flower_port), timeout_s=60)
    # Until `check` sees both workers answer and proves their path to storage.
    checks: list[subprocess.CompletedProcess[str]] = []

    def both_workers_checked() -> bool:
        checks.append(subprocess.run([str(BIN / "cloud-dump"), "check", "--broker",
                                      env["CLOUD_DUMP_BROKER_URL"]], env=env, text=True,
                                     capture_output=True, check=False))  # fmt: skip
        return checks[-1].returncode == 0 and checks[-1].stdout.count("worker demo-w") == 2

    if not wait_until(both_workers_checked, timeout_s=120, first_s=0.5):
        raise SystemExit(f"demo: the workers did not come up: {checks[-1].stderr.strip()}")
    return flower_port


def populate(cluster: PgCluster) -> Path:
    tablespace = sample.populate(cluster, rows=50_000)
    bench = cluster.bin_dir / "pgbench"
    if not bench.exists():
        bench = Path("/usr/lib/postgresql/15/bin/pgbench")
    subprocess.run([str(bench), "-i", "-s", "5", "-q", "-h", str(cluster.socket_dir), "-p",
                    str(cluster.port), "-U", "postgres", "app1"], check=True, capture_output=True)
    return tablespace


class Writer:
    """Commits one row a few hundred times a second into ``demo_writes`` until stopped, so that
    WAL is archived while the cluster takes writes. ``paused()`` holds it between two commits:
    every row written before is committed, none is in flight."""

    def __init__(self, cluster: PgCluster) -> None:
        import psycopg

        cluster.sql("CREATE TABLE demo_writes (id bigserial PRIMARY KEY, "
                    "at timestamptz NOT NULL DEFAULT clock_timestamp())", dbname="app1")
        self._conn = psycopg.connect(cluster.dsn("app1"), autocommit=True)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._conn.execute("INSERT INTO demo_writes DEFAULT VALUES")
            self._stop.wait(0.003)  # a steady trickle, not a benchmark

    @contextmanager
    def paused(self) -> Iterator[None]:
        with self._lock:
            yield

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._conn.close()


def restore_to(target_time: str, env: dict[str, str], tablespace: Path
               ) -> tuple[Path, Path, str]:
    """``cloud-dump restore`` by time alone (no --name): (pgdata, tablespace copy, report)."""
    pgdata = make_postgres_dir("cloud-dump-demo-restore-") / "data"
    new_ts = make_postgres_dir("cloud-dump-demo-ts-")
    # --archive-mode off: a copy made to look at must not archive into its source's archive.
    out = cloud_dump("restore", "--pgdata", str(pgdata), "--recovery-target-time", target_time,
                     f"--tablespace-mapping={tablespace}={new_ts}", "--archive-mode", "off",
                     env={**env, "CLOUD_DUMP_EXECUTABLE": str(postgres_cloud_dump())})
    config = default_restore_config(pgdata)
    if config.exists():  # restore_command runs as postgres and reads it
        chown_postgres(config)
    return pgdata, new_ts, out.stdout + out.stderr


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="cloud-dump-demo-"))
    processes: list[ServerProcess] = []
    cluster: PgCluster | None = None
    writer: Writer | None = None
    began_demo = time.monotonic()
    try:
        env = {**os.environ, **start_storage(work, processes)}
        flower_port = start_fleet(work, env, processes)
        say(f"Redis, workers demo-w1 and demo-w2, Flower at http://127.0.0.1:{flower_port} "
            f"(user '{FLOWER_LOGIN[0]}', password '{FLOWER_LOGIN[1]}')")
        archive_env = {k: env[k] for k in env if k.startswith(("CLOUD_DUMP_", "AWS_"))}
        cluster = start_cluster(15, archive_command=archive_command(
            StorageTarget("demo", env["CLOUD_DUMP_STORAGE"], StorageOptions(), archive_env)))
        tablespace = populate(cluster)
        size = int(cluster.sql("SELECT sum(pg_database_size(oid)) FROM pg_database")[0][0])
        say(f"PostgreSQL 15 on 127.0.0.1:{cluster.port} with {size / 1e6:.0f} MB of sample data, "
            "archive_command = cloud-dump wal-push through the workers")
        cluster.sql(f"GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {cluster.repl_user}")
        # From the environment, as a cron job would have it: a URL on the command line shows
        # its password in ps.
        env["CLOUD_DUMP_DB_URL"] = cluster.replication_url()
        show(cloud_dump("check", env=env))

        writer = Writer(cluster)
        say("a writer commits rows into app1.demo_writes from now on")
        began = time.monotonic()
        show(cloud_dump("backup", "--name", "demo-1", "--no-progress", env=env))
        backup_s = time.monotonic() - began
        # A moment between the two backups, when no write is in flight: restore goes there.
        with writer.paused():
            middle = str(cluster.sql("SELECT clock_timestamp()")[0][0])
            wanted = int(cluster.sql("SELECT count(*) FROM demo_writes", dbname="app1")[0][0])
        say(f"the point to come back to: {middle} ({wanted} rows written by then)")
        wait_for_more_rows(cluster, wanted)
        show(cloud_dump("backup", "--name", "demo-2", "--no-progress", env=env))
        writer.stop()
        writer = None
        total = int(cluster.sql("SELECT count(*) FROM demo_writes", dbname="app1")[0][0])
        show(cloud_dump("check", env=env))  # the last writes archived too
        print(cloud_dump("list", env=env).stdout)

        say(f"restore to {middle}, by time alone: restore chooses the backup")
        began = time.monotonic()
        pgdata, new_ts, said = restore_to(middle, env, tablespace)
        print(said.strip())
        with started(15, pgdata, new_ts) as restored:
            if not wait_until(lambda: not restored.sql("SELECT pg_is_in_recovery()")[0][0],
                              timeout_s=120, first_s=0.2):
                raise SystemExit("demo: the restored cluster did not promote")
            restore_s = time.monotonic() - began
            got = int(str(restored.sql("SELECT count(*) FROM demo_writes", dbname="app1")[0][0]))
        shutil.rmtree(pgdata.parent, ignore_errors=True)
        shutil.rmtree(new_ts, ignore_errors=True)
        exact = got == wanted
        say(f"restored cluster promoted holding {got} of the {total} rows: "
            f"{'exactly those written by' if exact else 'NOT those of'} {middle}")

        show(cloud_dump("verify", "--all", "--deep", env=env))
        show(cloud_dump("expire", "--retain", "1", env=env))
        info = cloud_dump("info", env=env).stdout
        print(info)
        elapsed_s = time.monotonic() - began_demo
        print("demo summary")
        print(f"  source       {size / 1e6:.0f} MB in 3 databases and an extra tablespace, "
              "archiving WAL through the workers while taking writes")
        print(f"  storage      {env['CLOUD_DUMP_STORAGE']}")
        print(f"  backup       {backup_s:.1f} s through 2 workers "
              f"({size / 1e6 / backup_s:.0f} MB/s of database); a second one after more writes")
        print(f"  restore      point in time between them, chosen by time alone: {restore_s:.1f} s "
              f"to a promoted cluster; rows {'exact' if exact else 'WRONG'}")
        print("  verify       --deep: every file checked against backup_manifest, WAL read")
        print("  expire       --retain 1: the older backup and the WAL only it needed removed")
        keep = exact and os.environ.get("DEMO_KEEP") == "1"
        state = ("left running: see below" if keep
                 else "stopped with the demo; DEMO_KEEP=1 leaves it running")
        print(f"  flower       http://127.0.0.1:{flower_port} ({state})")
        print(f"  logs         {work}")
        print(f"  took         {elapsed_s:.0f} s")
        if keep:
            keep_running(flower_port)
        return 0 if exact else 1
    finally:
        if writer is not None:
            writer.stop()
        if cluster is not None:
            cluster.destroy()
        for proc in reversed(processes):
            proc.stop()
        say("stopped everything it started")


def wait_for_more_rows(cluster: PgCluster, rows: int) -> None:
    """Until the writer has committed more after ``rows``: the second backup comes later."""
    def more() -> bool:
        now = int(cluster.sql("SELECT count(*) FROM demo_writes", dbname="app1")[0][0])
        return now > rows + 100

    if not wait_until(more, timeout_s=60, first_s=0.1):
        raise SystemExit("demo: the writer stopped writing")


def keep_running(flower_port: int) -> None:
    """Until Ctrl-C or SIGTERM: the fleet stays up for a look at Flower."""
    say(f"DEMO_KEEP=1: left running; open http://127.0.0.1:{flower_port} (user "
        f"'{FLOWER_LOGIN[0]}', password '{FLOWER_LOGIN[1]}'); Ctrl-C stops it all")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with suppress(KeyboardInterrupt):
        signal.pause()


def show(result: subprocess.CompletedProcess[str]) -> None:
    for line in (result.stdout + result.stderr).strip().splitlines():
        print(f"  | {line}")


if __name__ == "__main__":
    sys.exit(main())
