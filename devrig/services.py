"""Fixtures for Redis and real Celery worker processes, and running the installed command.

``redis_server`` (session) is a private ``redis-server`` on a free loopback port, with no
persistence. ``start_workers`` (function) starts worker subprocesses against it with the
environment of a storage target (``start_worker_pool``, for any broker), waits until each answers
a ping, and at the end of the test stops them by PID and flushes Redis, so no message left by
one test is picked up by the workers of the next.

Workers and Flower run the Procfile's own command lines (``procfile_process``), the ones
compose.yaml runs too, so the tests exercise what an operator deploys.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from coordinator.wait import wait_until
from devrig.procs import ServerProcess, free_port, port_open
from tasks.config import make_app

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# What a worker logs when it takes a task (its start-up banner names the tasks too).
PART_RECEIVED = "Task cloud_dump.upload_part["
PUSH_RECEIVED = "Task cloud_dump.push_wal["
PROCFILE = REPO_ROOT / "Procfile"
# Gossip, mingle and heartbeats only slow the start of a test worker. Set through the
# environment (Celery's command line reads CELERY_<COMMAND>_<OPTION>, click's
# auto_envvar_prefix), so that the command stays the Procfile's.
QUICK_WORKER_ENV = {
    "CELERY_WORKER_WITHOUT_GOSSIP": "1",
    "CELERY_WORKER_WITHOUT_MINGLE": "1",
    "CELERY_WORKER_WITHOUT_HEARTBEAT": "1",
}


def procfile_command(entry: str) -> str:
    """The command line of the Procfile's ``entry`` (``worker``, ``flower``)."""
    for line in PROCFILE.read_text().splitlines():
        name, colon, command = line.partition(":")
        if colon and name == entry:
            return command.strip()
    raise LookupError(f"no '{entry}' entry in {PROCFILE}")


def procfile_process(
    entry: str, log_path: Path, env: Mapping[str, str], name: str | None = None
) -> ServerProcess:
    """The Procfile's ``entry`` run as honcho runs it (a shell expands its ``${VAR:-default}``
    words from ``env``), from the repository, with this venv's commands first on PATH."""
    path = f"{VENV_BIN}{os.pathsep}{env.get('PATH', os.environ.get('PATH', ''))}"
    return ServerProcess(
        name or entry,
        ["bash", "-c", f"exec {procfile_command(entry)}"],
        log_path,
        env={**env, "PATH": path},
        cwd=REPO_ROOT,
    )


@dataclass(frozen=True)
class RedisServer:
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def flush(self) -> None:
        redis.Redis(port=self.port).flushall()


def redis_binary() -> str:
    """The ``redis-server`` on PATH; fails the test when there is none."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make setup`")
    return binary


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = redis_binary()
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    server = ServerProcess(
        "redis-server",
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        workdir / "redis.log",
    )
    server.wait_until(lambda: port_open(port), timeout_s=20)
    yield RedisServer(port)
    server.stop()


@dataclass
class WorkerPool:
    """Celery worker processes sharing one broker; each has a known node name."""

    broker_url: str
    processes: list[ServerProcess] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        app = make_app(self.broker_url)
        deadline = time.monotonic() + timeout_s
        pending = set(self.names)
        while pending and time.monotonic() < deadline:
            for proc in self.processes:
                if proc.proc.poll() is not None:
                    pytest.fail(f"{proc.name} exited early; see {proc.log_path}")
            replies = app.control.ping(destination=sorted(pending), timeout=0.5) or []
            for reply in replies:
                pending -= set(reply)
        if pending:
            pytest.fail(f"workers {sorted(pending)} did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        for proc in self.processes:
            proc.stop()


def start_worker_pool(
    broker_url: str, env: Mapping[str, str], *, count: int, queues: str, log_dir: Path
) -> WorkerPool:
    """``count`` workers on ``broker_url`` taking ``queues``, each answering a ping; the caller
    stops them. If one does not come up, all are stopped and the test fails."""
    pool = WorkerPool(broker_url)
    token = uuid.uuid4().hex[:6]
    child_env = {**os.environ, **QUICK_WORKER_ENV, **env, "CLOUD_DUMP_BROKER_URL": broker_url,
                 "WORKER_QUEUES": queues, "WORKER_CONCURRENCY": "1"}  # fmt: skip
    try:
        for i in range(count):
            short = f"w{i + 1}-{token}"
            # The Procfile names a worker ${WORKER_NAME}@%h: Celery's %h is the host name.
            name = f"{short}@{socket.gethostname()}"
            pool.processes.append(
                procfile_process(
                    "worker",
                    log_dir / f"worker-{token}-{i + 1}.log",
                    {**child_env, "WORKER_NAME": short},
                    name=f"celery worker {name}",
                )
            )
            pool.names.append(name)
        pool.wait_ready()
    except BaseException:
        pool.stop()
        raise
    return pool


@pytest.fixture
def start_workers(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., WorkerPool]]:
    """``start(env, count=2, queues="parts,wal")`` starts ``count`` worker processes."""
    pools: list[WorkerPool] = []

    def start(env: Mapping[str, str], count: int = 2, queues: str = "parts,wal") -> WorkerPool:
        pool = start_worker_pool(
            redis_server.url, env, count=count, queues=queues, log_dir=tmp_path
        )
        pools.append(pool)
        return pool

    yield start
    for pool in pools:
        pool.stop()
    redis_server.flush()


def wait_for_log(paths: Sequence[Path], *needles: str, timeout_s: float = 60) -> None:
    """Until one line of one of the logs holds every needle."""

    def appeared() -> bool:
        return any(
            all(n in line for n in needles)
            for path in paths if path.exists()
            for line in path.read_text(errors="replace").splitlines()
        )

    assert wait_until(appeared, timeout_s=timeout_s, first_s=0.002), (
        f"{needles} never appeared in {paths}")


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``cloud-dump`` console script, as an operator would."""
    return subprocess.run(
        [str(VENV_BIN / "cloud-dump"), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
        check=False,
    )


def error_line(stderr: str) -> str:
    """The command's one error line: fails the test unless there is exactly one."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("cloud-dump: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]
