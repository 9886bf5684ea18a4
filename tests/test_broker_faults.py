"""The broker going away: a Redis restarted mid-backup or mid-push costs re-sends, not the
work; a Redis that stays away ends the command with one line naming it (exit 6).

Each test runs its own ``redis-server`` (with a password, which must never be printed), not
the session's, so that killing it touches nothing else; real Celery workers, PostgreSQL and
storage as everywhere else.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import zstandard

from coordinator.dispatch import open_broker
from coordinator.exitcodes import ExitCode
from coordinator.runners import CeleryRunner
from tests.rig import sample
from tests.rig.moto import MotoServer, StorageTarget, local_target, s3_target
from tests.rig.postgres import PgCluster, PgFactory
from tests.rig.procs import ServerProcess, free_port, port_open
from tests.rig.roundtrip import restore_and_compare
from tests.rig.services import REPO_ROOT, VENV_BIN, WorkerPool
from tests.test_wal_push import SEG1, SYSID_A, GatedProxy, WalDir, make_segment
from workers.backup import BackupRef, ClaimRequest

PASSWORD = "broker-pw-7f3a"  # a test server's password, checked never to leak
PART_RECEIVED = "Task cloud_dump.upload_part["
PUSH_RECEIVED = "Task cloud_dump.push_wal["


class OwnRedis:
    """A ``redis-server`` with a password that a test may kill and start again on its port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self._workdir = workdir
        self._starts = 0
        self._server: ServerProcess | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed: run `make setup`"
        self._starts += 1
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self._workdir), "--requirepass", PASSWORD]
        self._server = ServerProcess(
            "redis-server", argv, self._workdir / f"redis-{self._starts}.log"
        )
        self._server.wait_until(lambda: port_open(self.port), timeout_s=20)

    def kill(self) -> None:
        """SIGKILL: everything it held (messages, payloads, results) is lost."""
        assert self._server is not None
        self._server.kill_group(signal.SIGKILL)
        self._server.proc.wait(timeout=10)
        self._server.stop()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def own_workers(own_redis: OwnRedis, tmp_path: Path) -> Iterator[Callable[..., WorkerPool]]:
    """``start(env, count, queues)``: Celery workers on ``own_redis`` (cf. ``start_workers``)."""
    pools: list[WorkerPool] = []

    def start(env: dict[str, str], count: int = 2, queues: str = "parts,wal") -> WorkerPool:
        pool = WorkerPool(own_redis.url)
        child_env = {**os.environ, **env, "CLOUD_DUMP_BROKER_URL": own_redis.url}
        for i in range(count):
            name = f"b{len(pools)}-{i + 1}@rig"
            argv = [str(VENV_BIN / "celery"), "-A", "tasks.app", "worker", "-Q", queues,
                    "-c", "1", "-n", name, "-l", "info", "--without-gossip",
                    "--without-mingle", "--without-heartbeat"]
            pool.processes.append(ServerProcess(
                f"celery worker {name}", argv, tmp_path / f"worker-{name}.log",
                env=child_env, cwd=REPO_ROOT,
            ))  # fmt: skip
            pool.names.append(name)
        pools.append(pool)
        pool.wait_ready()
        return pool

    yield start
    for pool in pools:
        # At once: a worker whose broker is gone takes its time over a polite shutdown.
        for process in pool.processes:
            process.kill_group(signal.SIGKILL)
        pool.stop()


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; any still running at its end (a failed test) is killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)


@pytest.fixture(scope="module")
def big_source(pg_factory: PgFactory) -> tuple[PgCluster, Path, dict[str, str]]:
    """Enough data that a backup in 5 MiB parts is made of many parts and takes a moment."""
    cluster = pg_factory(15)
    tablespace = sample.populate(cluster, rows=200_000)
    return cluster, tablespace, sample.digest(cluster.sql)


def start_backup(cluster: PgCluster, target: StorageTarget, broker_url: str, name: str,
                 *extra: str) -> subprocess.Popen[str]:
    argv = [str(VENV_BIN / "cloud-dump"), "backup", "--name", name, "--db-url",
            cluster.replication_url(), "--broker", broker_url, "--part-size-mib", "5",
            "--compression", "none", "--no-progress", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **target.env})


def wait_for_line(paths: list[Path], needle: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(needle in p.read_text(errors="replace") for p in paths if p.exists()):
        assert time.monotonic() < deadline, f"'{needle}' never appeared in {paths}"
        time.sleep(0.002)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("cloud-dump: error: ")]


def redacted(redis: OwnRedis) -> str:
    return f"redis://:***@127.0.0.1:{redis.port}/0"


# --- backups -----------------------------------------------------------------------------------


def test_backup_survives_a_broker_restart_and_restores_identically(
    big_source: tuple[PgCluster, Path, dict[str, str]],
    own_redis: OwnRedis,
    own_workers: Callable[..., WorkerPool],
    tmp_path: Path,
    children: list[subprocess.Popen[str]],
) -> None:
    cluster, tablespace, expected = big_source
    target = local_target(tmp_path / "store")
    pool = own_workers(target.env, count=2)
    coordinator = start_backup(cluster, target, own_redis.url, "b1")
    children.append(coordinator)
    wait_for_line([p.log_path for p in pool.processes], PART_RECEIVED)
    own_redis.kill()  # parts queued, staged and unconfirmed: all of it is gone with Redis
    assert coordinator.poll() is None, "the backup ended before the broker went away"
    own_redis.start()
    restarted = time.monotonic()
    _, stderr = coordinator.communicate(timeout=240)
    print(f"backup completed {time.monotonic() - restarted:.1f} s after Redis was back")
    assert coordinator.returncode == 0, stderr
    assert "sending" in stderr and "again" in stderr, stderr  # the outage was noticed
    assert PASSWORD not in stderr
    restore_and_compare(cluster, target, "b1", tablespace, expected)
    # The uploads opened again after the restart were completed or aborted: none is left.
    assert target.open().list_multipart_uploads("") == []


def test_backup_whose_broker_stays_away_exits_6_with_one_line(
    big_source: tuple[PgCluster, Path, dict[str, str]],
    own_redis: OwnRedis,
    own_workers: Callable[..., WorkerPool],
    tmp_path: Path,
    children: list[subprocess.Popen[str]],
) -> None:
    cluster = big_source[0]
    target = local_target(tmp_path / "store")
    pool = own_workers(target.env, count=2)
    # --part-timeout is also how long a broker may stay away: short here, so that the test
    # does not wait the default five minutes.
    coordinator = start_backup(cluster, target, own_redis.url, "b1", "--part-timeout", "5")
    children.append(coordinator)
    wait_for_line([p.log_path for p in pool.processes], PART_RECEIVED)
    own_redis.kill()
    killed = time.monotonic()
    _, stderr = coordinator.communicate(timeout=90)
    print(f"backup exited {time.monotonic() - killed:.1f} s after Redis was killed")
    assert coordinator.returncode == ExitCode.BROKER_UNREACHABLE, stderr
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr
    assert f"cannot reach broker '{redacted(own_redis)}'" in errors[0]
    assert PASSWORD not in stderr
    assert stderr.rstrip().splitlines()[-1] == errors[0]  # the real error is the last word
    # Its claim could not be removed without the broker: the warning names the whole key.
    claim = f"{target.url}/b1/backup.claim"
    assert f"'{claim}'" in stderr
    assert (tmp_path / "store" / "b1" / "backup.claim").exists()


def test_backup_with_a_password_broker_that_is_down_exits_6_naming_it(
    big_source: tuple[PgCluster, Path, dict[str, str]],
    own_redis: OwnRedis,
    tmp_path: Path,
    children: list[subprocess.Popen[str]],
) -> None:
    own_redis.kill()
    target = local_target(tmp_path / "store")
    coordinator = start_backup(big_source[0], target, own_redis.url, "b1")
    children.append(coordinator)
    _, stderr = coordinator.communicate(timeout=60)
    assert coordinator.returncode == ExitCode.BROKER_UNREACHABLE, stderr
    errors = error_lines(stderr)
    assert len(errors) == 1 and redacted(own_redis) in errors[0], stderr
    assert PASSWORD not in stderr
    assert not (tmp_path / "store").exists()


# --- WAL pushes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("look_ahead", ["8", "0"], ids=["pusher", "synchronous"])
def test_wal_push_across_a_broker_restart_is_stored(
    look_ahead: str,
    own_redis: OwnRedis,
    own_workers: Callable[..., WorkerPool],
    moto_server: MotoServer,
    aws_env: dict[str, str],
    s3_bucket: str,
    tmp_path: Path,
    children: list[subprocess.Popen[str]],
) -> None:
    store = s3_target(moto_server.endpoint, s3_bucket, aws_env)
    # The worker reaches S3 through a proxy that holds every request: it is inside its push
    # while Redis is killed and started again, and finishes it only afterwards.
    proxy = GatedProxy(int(moto_server.endpoint.rsplit(":", 1)[1]))
    try:
        pool = own_workers(
            {**store.env, "CLOUD_DUMP_S3_ENDPOINT": f"http://127.0.0.1:{proxy.port}"},
            count=1, queues="wal",
        )  # fmt: skip
        wal_dir = WalDir(tmp_path / "pgdata")
        segment = make_segment(SYSID_A, 90)
        wal_dir.add(SEG1, segment, ready=True)
        call = subprocess.Popen(
            [str(VENV_BIN / "cloud-dump"), "wal-push", str(wal_dir.pg_wal / SEG1), SEG1,
             "--look-ahead", look_ahead, "--timeout", "120"],
            env={**os.environ, "CLOUD_DUMP_BROKER_URL": own_redis.url},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        children.append(call)
        wait_for_line([pool.processes[0].log_path], PUSH_RECEIVED)
        own_redis.kill()
        own_redis.start()
        proxy.open()
        _, stderr = call.communicate(timeout=120)
        assert call.returncode == 0, stderr + wal_dir.pusher_log()
        assert PASSWORD not in stderr + wal_dir.pusher_log()
        blob = store.open().get(f"wal_archive/{SEG1}.zst")
        assert zstandard.ZstdDecompressor().decompress(blob) == segment
        assert wal_dir.marker(SEG1).exists()
    finally:
        proxy.close()


@pytest.mark.parametrize("look_ahead", ["8", "0"], ids=["pusher", "synchronous"])
def test_wal_push_whose_broker_stays_away_exits_6_naming_it(
    look_ahead: str,
    own_redis: OwnRedis,
    own_workers: Callable[..., WorkerPool],
    moto_server: MotoServer,
    aws_env: dict[str, str],
    s3_bucket: str,
    tmp_path: Path,
    children: list[subprocess.Popen[str]],
) -> None:
    store = s3_target(moto_server.endpoint, s3_bucket, aws_env)
    proxy = GatedProxy(int(moto_server.endpoint.rsplit(":", 1)[1]))
    try:
        pool = own_workers(
            {**store.env, "CLOUD_DUMP_S3_ENDPOINT": f"http://127.0.0.1:{proxy.port}"},
            count=1, queues="wal",
        )  # fmt: skip
        wal_dir = WalDir(tmp_path / "pgdata")
        wal_dir.add(SEG1, make_segment(SYSID_A, 91), ready=True)
        call = subprocess.Popen(
            [str(VENV_BIN / "cloud-dump"), "wal-push", str(wal_dir.pg_wal / SEG1), SEG1,
             "--look-ahead", look_ahead, "--timeout", "10"],
            env={**os.environ, "CLOUD_DUMP_BROKER_URL": own_redis.url},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        children.append(call)
        wait_for_line([pool.processes[0].log_path], PUSH_RECEIVED)
        own_redis.kill()
        _, stderr = call.communicate(timeout=60)
        assert call.returncode == ExitCode.BROKER_UNREACHABLE, stderr + wal_dir.pusher_log()
        errors = error_lines(stderr)
        assert len(errors) == 1 and redacted(own_redis) in errors[0], stderr
        assert PASSWORD not in stderr + wal_dir.pusher_log()
        assert not wal_dir.marker(SEG1).exists()
    finally:
        proxy.close()


# --- a task the restarted broker lost before any worker took it ----------------------------------


def test_a_claim_lost_with_a_restarted_broker_is_sent_again(
    own_redis: OwnRedis, own_workers: Callable[..., WorkerPool], tmp_path: Path
) -> None:
    """No worker yet: the claim waits in the queue, and the restart takes it away. Without a
    re-send it would be waited for until the task timeout."""
    target = local_target(tmp_path / "store")
    runner = CeleryRunner(open_broker(own_redis.url), task_timeout_s=600, part_timeout_s=600)
    request = ClaimRequest(backup=BackupRef(name="b1"), run_id="r1", host="h", started_at="t")
    answer: list[object] = []
    claiming = threading.Thread(target=lambda: answer.append(runner.claim(request)), daemon=True)
    try:
        claiming.start()
        deadline = time.monotonic() + 30
        while not redis.Redis.from_url(own_redis.url).llen("parts"):  # the claim is queued
            assert time.monotonic() < deadline, "the claim never reached the queue"
            time.sleep(0.01)
        own_redis.kill()
        own_redis.start()
        own_workers(target.env, count=1, queues="parts")
        claiming.join(timeout=60)  # far less than the task timeout
        assert answer == [f"{target.url}/b1/backup.claim"]
        assert (tmp_path / "store" / "b1" / "backup.claim").exists()
    finally:
        runner.close()
