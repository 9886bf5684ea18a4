"""The broker going away: a Redis restarted mid-backup or mid-push costs re-sends, not the
work; a Redis that stays away ends the command with one line naming it (exit 6).

Each test runs its own ``redis-server`` (with a password, which must never be printed), not
the session's, so that killing it touches nothing else; real Celery workers, PostgreSQL and
storage as everywhere else.
"""

from __future__ import annotations

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

from coordinator.backup.work import BackupWork
from coordinator.broker.client import open_broker
from coordinator.broker.flights import CeleryRunner
from coordinator.cli.exitcodes import ExitCode
from coordinator.wait import wait_until
from devrig.moto import StorageTarget, local_target
from devrig.procs import ServerProcess, free_port, port_open
from devrig.roundtrip import restore_and_compare, start_backup
from devrig.sample import BigSource
from devrig.services import (
    PART_RECEIVED,
    PUSH_RECEIVED,
    WorkerPool,
    error_line,
    start_worker_pool,
    wait_for_log,
)
from devrig.tcpproxy import TcpProxy
from devrig.walfiles import SEG1, SYSID_A, WalDir, make_segment
from storage.errors import NoWorkerAvailable
from workers.backup import BackupRef, ClaimRequest
from workers.staging import STAGE_KEY_PREFIX

PASSWORD = "broker-pw-7f3a"  # a test server's password, checked never to leak


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
        pool = start_worker_pool(own_redis.url, env, count=count, queues=queues, log_dir=tmp_path)
        pools.append(pool)
        return pool

    yield start
    for pool in pools:
        # At once: a worker whose broker is gone takes its time over a polite shutdown.
        for process in pool.processes:
            process.kill_group(signal.SIGKILL)
        pool.stop()


def redacted(redis: OwnRedis) -> str:
    return f"redis://:***@127.0.0.1:{redis.port}/0"


# --- backups -----------------------------------------------------------------------------------


@pytest.fixture
def start_backup_under_way(
    big_source: BigSource,
    own_redis: OwnRedis,
    own_workers: Callable[..., WorkerPool],
    children: list[subprocess.Popen[str]],
) -> Callable[..., tuple[subprocess.Popen[str], WorkerPool]]:
    """``start(target, *extra)``: backup "b1" of ``big_source`` into ``target`` through two
    workers on ``own_redis``, returned with the workers once a worker has taken a part."""

    def start(target: StorageTarget, *extra: str) -> tuple[subprocess.Popen[str], WorkerPool]:
        pool = own_workers(target.env, count=2)
        coordinator = start_backup(big_source[0], target, own_redis.url, "b1", *extra)
        children.append(coordinator)
        wait_for_log([p.log_path for p in pool.processes], PART_RECEIVED)
        return coordinator, pool

    return start


def test_backup_survives_a_broker_restart_and_restores_identically(
    big_source: BigSource,
    own_redis: OwnRedis,
    start_backup_under_way: Callable[..., tuple[subprocess.Popen[str], WorkerPool]],
    tmp_path: Path,
) -> None:
    cluster, tablespace, expected = big_source
    target = local_target(tmp_path / "store")
    coordinator, pool = start_backup_under_way(target)
    # Workers stopped, the coordinator fills its window: parts are staged and unconfirmed at
    # the kill, whatever the pace of either side (a fast store once confirmed every part
    # before Redis went, and nothing was left to lose).
    for process in pool.processes:
        process.kill_group(signal.SIGSTOP)
    try:
        client = redis.Redis.from_url(own_redis.url)
        staged = wait_until(lambda: client.keys(f"{STAGE_KEY_PREFIX}*"), timeout_s=60, first_s=0.01)
        client.close()
        assert staged, "no part was staged while the workers were stopped"
        own_redis.kill()  # parts queued, staged and unconfirmed: all of it is gone with Redis
        assert coordinator.poll() is None, "the backup ended before the broker went away"
        own_redis.start()
    finally:
        for process in pool.processes:
            process.kill_group(signal.SIGCONT)
    restarted = time.monotonic()
    _, stderr = coordinator.communicate(timeout=240)
    print(f"backup completed {time.monotonic() - restarted:.1f} s after Redis was back")
    assert coordinator.returncode == 0, stderr
    assert "sending" in stderr and "again" in stderr, stderr  # the outage was noticed
    assert PASSWORD not in stderr
    restore_and_compare(cluster, target, "b1", tablespace, expected)
    # The uploads opened again after the restart were completed or aborted: none is left.
    assert target.open().list_multipart_uploads("") == []


def _blocked_on_a_lock(pid: int) -> bool:
    """Whether the main thread of ``pid`` sleeps on a futex (a queue or lock), not on the
    replication socket: the backup's reader waiting for room for its next part."""
    return Path(f"/proc/{pid}/task/{pid}/wchan").read_text().startswith("futex")


def test_backup_interrupted_while_its_workers_are_stopped_ends_and_names_its_claim(
    own_redis: OwnRedis,
    start_backup_under_way: Callable[..., tuple[subprocess.Popen[str], WorkerPool]],
    tmp_path: Path,
) -> None:
    # The reader waits for room in the part queue while the part thread waits for a worker's
    # answer. SIGTERM there once joined that thread, which waited for the stopped workers as
    # long as they stayed stopped (ten minutes in a trial). The undo now waits 30 s at most.
    target = local_target(tmp_path / "store")
    coordinator, pool = start_backup_under_way(target)
    for process in pool.processes:
        process.kill_group(signal.SIGSTOP)
    try:
        client = redis.Redis.from_url(own_redis.url)
        assert wait_until(lambda: client.keys(f"{STAGE_KEY_PREFIX}*"), timeout_s=60, first_s=0.01)
        client.close()
        waiting = wait_until(lambda: all(_blocked_on_a_lock(coordinator.pid) for _ in range(3)),
                             timeout_s=60, first_s=0.01)  # fmt: skip
        assert waiting, "the backup never waited for room"
        coordinator.send_signal(signal.SIGTERM)
        # A deadline only to fail rather than hang: the backup gives its undo 30 s.
        _, stderr = coordinator.communicate(timeout=150)
    finally:
        for process in pool.processes:
            process.kill_group(signal.SIGCONT)
    assert coordinator.returncode == ExitCode.INTERRUPTED, stderr
    assert f"'{target.url}/b1/backup.claim'" in stderr, stderr  # what it could not undo
    assert PASSWORD not in stderr


def test_backup_whose_broker_stays_away_exits_6_with_one_line(
    own_redis: OwnRedis,
    start_backup_under_way: Callable[..., tuple[subprocess.Popen[str], WorkerPool]],
    tmp_path: Path,
) -> None:
    target = local_target(tmp_path / "store")
    # --part-timeout is also how long a broker may stay away: short here, so that the test
    # does not wait the default five minutes.
    coordinator, _ = start_backup_under_way(target, "--part-timeout", "5")
    own_redis.kill()
    killed = time.monotonic()
    _, stderr = coordinator.communicate(timeout=90)
    print(f"backup exited {time.monotonic() - killed:.1f} s after Redis was killed")
    assert coordinator.returncode == ExitCode.BROKER_UNREACHABLE, stderr
    error = error_line(stderr)
    assert f"cannot reach broker '{redacted(own_redis)}'" in error
    assert PASSWORD not in stderr
    assert stderr.rstrip().splitlines()[-1] == error  # the real error is the last word
    # Its claim could not be removed without the broker: the warning names the whole key.
    claim = f"{target.url}/b1/backup.claim"
    assert f"'{claim}'" in stderr
    assert (tmp_path / "store" / "b1" / "backup.claim").exists()


def test_backup_with_a_password_broker_that_is_down_exits_6_naming_it(
    big_source: BigSource,
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
    assert redacted(own_redis) in error_line(stderr)
    assert PASSWORD not in stderr
    assert not list((tmp_path / "store").iterdir())  # nothing stored


# --- WAL pushes ---------------------------------------------------------------------------------


@pytest.fixture(params=["8", "0"], ids=["pusher", "synchronous"])
def start_held_push(
    request: pytest.FixtureRequest,
    own_workers: Callable[..., WorkerPool],
    own_redis: OwnRedis,
    s3_store: StorageTarget,
    s3_proxy: TcpProxy,
    wal_dir: WalDir,
    children: list[subprocess.Popen[str]],
) -> Callable[[bytes, str], subprocess.Popen[str]]:
    """``start(segment, timeout)``: ``wal-push`` of SEG1 holding ``segment``, with ``--timeout``
    and ``--look-ahead`` 8 (through the WAL pusher) or 0 (synchronous), returned once its one
    worker on ``own_redis`` has taken it and is inside its request to S3, held there by the
    proxy (every request is) until ``s3_proxy.release()``."""

    def start(segment: bytes, timeout: str) -> subprocess.Popen[str]:
        s3_proxy.hold()
        pool = own_workers(
            {**s3_store.env, "CLOUD_DUMP_S3_ENDPOINT": s3_proxy.endpoint}, count=1, queues="wal"
        )
        wal_dir.add(SEG1, segment, ready=True)
        call = wal_dir.start_push(SEG1, "--look-ahead", request.param, "--timeout", timeout,
                                  env={"CLOUD_DUMP_BROKER_URL": own_redis.url})
        children.append(call)
        wait_for_log([pool.processes[0].log_path], PUSH_RECEIVED)
        return call

    return start


def test_wal_push_across_a_broker_restart_is_stored(
    own_redis: OwnRedis,
    start_held_push: Callable[[bytes, str], subprocess.Popen[str]],
    s3_proxy: TcpProxy,
    s3_store: StorageTarget,
    wal_dir: WalDir,
) -> None:
    # The worker is inside its push while Redis is killed and started again, and finishes it
    # only afterwards.
    segment = make_segment(SYSID_A, 90, SEG1)
    call = start_held_push(segment, "120")
    own_redis.kill()
    own_redis.start()
    s3_proxy.release()
    _, stderr = call.communicate(timeout=120)
    assert call.returncode == 0, stderr + wal_dir.pusher_log()
    assert PASSWORD not in stderr + wal_dir.pusher_log()
    blob = s3_store.open().get(f"wal_archive/{SEG1}.zst")
    assert zstandard.ZstdDecompressor().decompress(blob) == segment
    assert wal_dir.marker(SEG1).exists()


def test_wal_push_whose_broker_stays_away_exits_6_naming_it(
    own_redis: OwnRedis,
    start_held_push: Callable[[bytes, str], subprocess.Popen[str]],
    wal_dir: WalDir,
) -> None:
    call = start_held_push(make_segment(SYSID_A, 91, SEG1), "10")
    own_redis.kill()
    _, stderr = call.communicate(timeout=60)
    assert call.returncode == ExitCode.BROKER_UNREACHABLE, stderr + wal_dir.pusher_log()
    assert redacted(own_redis) in error_line(stderr)
    assert PASSWORD not in stderr + wal_dir.pusher_log()
    assert not wal_dir.marker(SEG1).exists()


# --- a task the restarted broker lost before any worker took it ----------------------------------


def test_a_claim_lost_with_a_restarted_broker_is_sent_again(
    own_redis: OwnRedis, own_workers: Callable[..., WorkerPool], tmp_path: Path
) -> None:
    """No worker yet: the claim waits in the queue, and the restart takes it away. Without a
    re-send it would be waited for until the task timeout."""
    target = local_target(tmp_path / "store")
    runner = BackupWork(CeleryRunner(
        open_broker(own_redis.url), "parts", storage_url=None, grace_s=600, payload_ttl_s=6000,
        resend_after_s=600,
    ), task_timeout_s=600)  # fmt: skip
    request = ClaimRequest(backup=BackupRef(name="b1"), run_id="r1", host="h", started_at="t")
    answer: list[object] = []
    claiming = threading.Thread(target=lambda: answer.append(runner.claim(request)), daemon=True)
    try:
        claiming.start()
        assert wait_until(  # the claim is queued
            lambda: redis.Redis.from_url(own_redis.url).llen("parts"), timeout_s=30, first_s=0.01
        ), "the claim never reached the queue"
        own_redis.kill()
        own_redis.start()
        own_workers(target.env, count=1, queues="parts")
        claiming.join(timeout=60)  # far less than the task timeout
        assert answer == [f"{target.url}/b1/backup.claim"]
        assert (tmp_path / "store" / "b1" / "backup.claim").exists()
    finally:
        runner.close()


# --- a unit given up on for want of a worker ---------------------------------------------------


def test_a_claim_given_up_on_is_not_taken_when_a_worker_comes_later(
    own_redis: OwnRedis, own_workers: Callable[..., WorkerPool], tmp_path: Path
) -> None:
    """No worker within the task timeout: the backup fails (exit 7), and its claim, still
    queued, must not run when a worker starts later: it would hold the name, with no run
    behind it, until `cleanup` removed it. Each copy is sent with an expiry at the flight's
    timeout, and the worker drops it (REVOKED)."""
    target = local_target(tmp_path / "store")
    runner = CeleryRunner(open_broker(own_redis.url), "parts", storage_url=None, grace_s=60,
                          payload_ttl_s=600, resend_after_s=600)  # fmt: skip
    request = ClaimRequest(backup=BackupRef(name="late"), run_id="r1", host="h", started_at="t")
    try:
        handle = runner.start("cloud_dump.claim_backup", request, "the claim", timeout_s=2)
        assert wait_until(handle.done, timeout_s=60, first_s=0.05)
        with pytest.raises(NoWorkerAvailable):
            handle.result()
        task_ids = list(handle.flight.task_ids)  # type: ignore[attr-defined]
        assert redis.Redis.from_url(own_redis.url).llen("parts") == len(task_ids)

        own_workers(target.env, count=1, queues="parts")

        def dropped() -> bool:
            return all(s.status == "REVOKED" for s in runner.broker.states(task_ids))

        assert wait_until(dropped, timeout_s=60, first_s=0.05), runner.broker.states(task_ids)
        assert not (tmp_path / "store" / "late").exists()
        # The name is free: a claim that a worker answers takes it.
        work = BackupWork(runner, task_timeout_s=60)
        assert work.claim(request.model_copy(update={"run_id": "r2"})).endswith(
            "late/backup.claim"
        )
    finally:
        runner.close()
