"""``cloud_dump.ping_storage`` through real worker processes, against both storage backends."""

from __future__ import annotations

from collections.abc import Callable

from coordinator.broker.client import connect_broker
from coordinator.broker.flights import run_on_worker
from coordinator.cli.exitcodes import ExitCode
from devrig.moto import StorageTarget
from devrig.procs import free_port
from devrig.services import RedisServer, WorkerPool, run_cli
from workers.diagnostics import PING_PREFIX, PingResult


def test_ping_storage_runs_on_each_of_two_worker_processes(
    storage_target: StorageTarget,
    redis_server: RedisServer,
    start_workers: Callable[..., WorkerPool],
) -> None:
    pool = start_workers(storage_target.env, count=2)
    app = connect_broker(redis_server.url)
    results = [
        PingResult.model_validate(run_on_worker(app, name, "cloud_dump.ping_storage", 30))
        for name in pool.names
    ]
    assert [r.worker for r in results] == pool.names
    assert len({r.pid for r in results}) == 2
    assert all(r.storage == storage_target.open().url for r in results)
    # Each round trip cleaned up after itself.
    assert list(storage_target.open().list(PING_PREFIX)) == []


def test_ping_storage_through_the_shared_queue(
    storage_target: StorageTarget,
    redis_server: RedisServer,
    start_workers: Callable[..., WorkerPool],
) -> None:
    pool = start_workers(storage_target.env, count=2)
    app = connect_broker(redis_server.url)
    pending = [app.send_task("cloud_dump.ping_storage", queue="parts") for _ in range(6)]
    workers = {PingResult.model_validate(r.get(timeout=60)).worker for r in pending}
    assert workers <= set(pool.names)


def test_check_command_reports_every_worker(
    storage_target: StorageTarget,
    redis_server: RedisServer,
    start_workers: Callable[..., WorkerPool],
) -> None:
    pool = start_workers(storage_target.env, count=2)
    result = run_cli("check", "--broker", redis_server.url)
    assert result.returncode == 0, result.stderr
    for name in pool.names:
        assert f"worker {name} (queues parts,wal): storage" in result.stdout


def test_check_reports_a_worker_that_cannot_reach_its_storage(
    redis_server: RedisServer,
    start_workers: Callable[..., WorkerPool],
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    start_workers({
        "CLOUD_DUMP_STORAGE": "s3://bucket",
        "CLOUD_DUMP_S3_ENDPOINT": endpoint,
        "CLOUD_DUMP_STORAGE_MAX_ATTEMPTS": "1",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
    }, count=1)
    result = run_cli("check", "--broker", redis_server.url, "--timeout", "60")
    assert result.returncode == ExitCode.TASK_FAILED, result.stderr
    assert endpoint in result.stderr
