"""``make demo``: the whole job on one machine, start to finish, then everything stopped.

A throwaway PostgreSQL 15 with sample data, a private Redis, two Celery workers and Flower
started from the Procfile; ``cloud-dump backup`` through the workers to local storage (or to a
local S3 endpoint with DEMO_STORAGE=s3); ``cloud-dump restore`` into a new directory; the
restored cluster started and its rows compared with the source's; a summary printed.

It reuses the test rig's server helpers (they start servers on free loopback ports and stop
them by PID), so the demo and the tests exercise the same set-up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.wait import wait_until  # noqa: E402
from devrig import sample  # noqa: E402
from devrig.postgres import PgCluster, make_postgres_dir, start_cluster  # noqa: E402
from devrig.procs import ServerProcess, free_port, port_open  # noqa: E402
from devrig.restored import started  # noqa: E402

BIN = Path(sys.executable).parent


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
        (work / "repository").mkdir(exist_ok=True)
        return {"CLOUD_DUMP_STORAGE": f"file://{work}/repository"}
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
                           work / "flower.log", env=shell_env, cwd=ROOT)
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


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="cloud-dump-demo-"))
    processes: list[ServerProcess] = []
    cluster: PgCluster | None = None
    try:
        env = {**os.environ, **start_storage(work, processes)}
        flower_port = start_fleet(work, env, processes)
        say(f"Redis, workers demo-w1 and demo-w2, Flower at http://127.0.0.1:{flower_port}")
        cluster = start_cluster(15)
        tablespace = populate(cluster)
        expected = sample.digest(cluster.sql)
        size = int(cluster.sql("SELECT sum(pg_database_size(oid)) FROM pg_database")[0][0])
        say(f"PostgreSQL 15 on 127.0.0.1:{cluster.port} with {size / 1e6:.0f} MB of sample data")

        began = time.monotonic()
        out = cloud_dump("backup", "--name", "demo", "--db-url", cluster.replication_url(),
                         "--no-progress", env=env)
        backup_s = time.monotonic() - began
        say(out.stdout.strip())
        listing = cloud_dump("list", env=env).stdout

        pgdata = make_postgres_dir("cloud-dump-demo-restore-") / "data"
        new_ts = make_postgres_dir("cloud-dump-demo-ts-")
        began = time.monotonic()
        cloud_dump("restore", "--name", "demo", "--pgdata", str(pgdata),
                   f"--tablespace-mapping={tablespace}={new_ts}", env=env)
        restore_s = time.monotonic() - began
        with started(15, pgdata, new_ts) as restored:
            same = sample.digest(restored.sql) == expected
        print(listing)
        print("demo summary")
        print(f"  source       {size / 1e6:.0f} MB in 3 databases and an extra tablespace")
        print(f"  storage      {env['CLOUD_DUMP_STORAGE']}")
        print(f"  backup       {backup_s:.1f} s through 2 workers "
              f"({size / 1e6 / backup_s:.0f} MB/s of database)")
        print(f"  restore      {restore_s:.1f} s with every file verified "
              f"({size / 1e6 / restore_s:.0f} MB/s)")
        print(f"  rows         {'identical in every table' if same else 'DIFFERENT'}")
        print(f"  flower       http://127.0.0.1:{flower_port} (while the demo ran)")
        print(f"  logs         {work}")
        shutil.rmtree(pgdata.parent, ignore_errors=True)
        shutil.rmtree(new_ts, ignore_errors=True)
        return 0 if same else 1
    finally:
        if cluster is not None:
            cluster.destroy()
        for proc in reversed(processes):
            proc.stop()
        say("stopped everything it started")


if __name__ == "__main__":
    sys.exit(main())
