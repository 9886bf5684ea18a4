"""Flower as deployed: started from the Procfile with a login, it shows what each task does and
never a secret.

One fleet for the module: Redis, two workers and Flower, all started from the Procfile's own
lines, workers storing in a moto bucket under an AWS secret key only they know. Through them a
passphrase-encrypted backup of PostgreSQL 15 and two WAL pushes; then everything is read back
through Flower's HTTP API, as an operator's browser would.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from coordinator.broker.client import connect_broker
from coordinator.wait import wait_until
from devrig.moto import MotoServer, s3_target
from devrig.postgres import PgCluster
from devrig.procs import ServerProcess, free_port, port_open
from devrig.services import (
    RedisServer,
    WorkerPool,
    procfile_command,
    procfile_process,
    run_cli,
    start_worker_pool,
)
from devrig.walfiles import SEG1, SEG2, WalDir, make_segment

USER = "ops"
WAL_FILES = (SEG1, SEG2)


@dataclass(frozen=True)
class Dashboard:
    """Flower at ``url``, and every secret the fleet was given."""

    url: str
    password: str
    backup: str
    secrets: dict[str, str]
    flower: ServerProcess
    pool: WorkerPool

    def get(self, path: str, login: tuple[str, str] | None = None) -> tuple[int, Any]:
        """GET ``path`` (status, parsed JSON or None); ``login`` defaults to the real one."""
        status, body = http_get(self.url + path, login or (USER, self.password))
        return status, json.loads(body) if status == 200 else None

    def tasks(self) -> dict[str, dict[str, Any]]:
        status, body = self.get("/api/tasks")
        assert status == 200, status
        assert isinstance(body, dict)
        return body


def seen(dashboard: Dashboard, names: Mapping[str, int]) -> bool:
    """Whether Flower has seen, finished, at least ``count`` tasks of each name."""
    done = [t["name"] for t in dashboard.tasks().values() if t.get("state") == "SUCCESS"]
    return all(done.count(name) >= count for name, count in names.items())


@pytest.fixture(scope="module")
def dashboard(
    redis_server: RedisServer,
    moto_server: MotoServer,
    moto_admin_client: Any,
    aws_env: dict[str, str],
    pg15: PgCluster,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Dashboard]:
    work = tmp_path_factory.mktemp("flower")
    known = {
        "passphrase": f"pass-{secrets.token_hex(12)}",
        "aws secret key": f"aws-{secrets.token_hex(16)}",
        "flower password": f"login-{secrets.token_hex(12)}",
    }
    bucket = f"cd-flower-{uuid.uuid4().hex[:12]}"
    moto_admin_client.create_bucket(Bucket=bucket)
    # moto takes any key pair: this secret key is known to the workers alone.
    target = s3_target(moto_server.endpoint, bucket, aws_env)
    worker_env = {**target.env, "AWS_SECRET_ACCESS_KEY": known["aws secret key"]}
    port = free_port()
    flower = procfile_process("flower", work / "flower.log", {
        "CLOUD_DUMP_BROKER_URL": redis_server.url, "FLOWER_PORT": str(port),
        "FLOWER_BASIC_AUTH": f"{USER}:{known['flower password']}", "PATH": "/usr/bin:/bin",
    })  # fmt: skip
    pool: WorkerPool | None = None
    try:
        flower.wait_until(lambda: port_open(port), timeout_s=60)
        pool = start_worker_pool(redis_server.url, worker_env, count=2, queues="parts,wal",
                                 log_dir=work)  # fmt: skip
        board = Dashboard(f"http://127.0.0.1:{port}", known["flower password"],
                          f"flower-{uuid.uuid4().hex[:8]}", known, flower, pool)  # fmt: skip
        # Flower listens before it receives events: ping until it has seen a task.
        app = connect_broker(redis_server.url)
        assert wait_until(lambda: bool(app.send_task("cloud_dump.ping_storage").get(timeout=30))
                          and seen(board, {"cloud_dump.ping_storage": 1}),
                          timeout_s=60, first_s=0.2, factor=2.0, max_s=2.0), (
            "flower never saw a task")  # fmt: skip
        run_through(board, pg15, redis_server, work)
        yield board
    finally:
        if pool is not None:
            pool.stop()
        flower.stop()
        redis_server.flush()


def run_through(board: Dashboard, cluster: PgCluster, redis_server: RedisServer,
                work: Path) -> None:
    """A passphrase-encrypted backup and two WAL pushes through the workers, seen by Flower."""
    passphrase_file = work / "passphrase"
    passphrase_file.write_text(board.secrets["passphrase"] + "\n")
    env = {"CLOUD_DUMP_BROKER_URL": redis_server.url, "CLOUD_DUMP_STORAGE": "",
           "CLOUD_DUMP_PASSPHRASE_FILE": str(passphrase_file)}  # fmt: skip
    result = run_cli("backup", "--name", board.backup, "--db-url", cluster.replication_url(),
                     "--part-size-mib", "5", "--no-progress", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    wal_dir = WalDir(work / "pgdata")
    for seed, name in enumerate(WAL_FILES):
        wal_dir.add(name, make_segment(cluster.system_identifier(), seed, name))
        result = wal_dir.push(name, "--look-ahead", "0", env=env)
        assert result.returncode == 0, result.stderr
    finished = {"cloud_dump.finalize_backup": 1, "cloud_dump.push_wal": len(WAL_FILES)}
    assert wait_until(lambda: seen(board, finished), timeout_s=60, first_s=0.1, factor=2.0,
                      max_s=1.0), board.tasks()


def test_flower_answers_only_with_the_login(dashboard: Dashboard) -> None:
    assert dashboard.get("/api/tasks")[0] == 200
    assert dashboard.get("/api/tasks", (USER, "wrong"))[0] == 401
    assert http_get(dashboard.url + "/api/tasks", None)[0] == 401
    # The pages too, not only the API.
    assert http_get(dashboard.url + "/tasks", None)[0] == 401


def http_get(url: str, login: tuple[str, str] | None) -> tuple[int, bytes]:
    """GET ``url`` with basic auth (none when ``login`` is None): status and body."""
    headers = {}
    if login is not None:
        token = base64.b64encode(":".join(login).encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    # S310: the test's own loopback http:// URL.
    request = urllib.request.Request(url, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def test_task_arguments_name_backup_archive_part_and_wal_file(dashboard: Dashboard) -> None:
    by_name: dict[str, list[str]] = {}
    for task in dashboard.tasks().values():
        by_name.setdefault(task["name"], []).append(task["args"])
    backup = re.escape(dashboard.backup)
    parts = by_name["cloud_dump.upload_part"]
    assert parts and all(
        re.fullmatch(rf"backup={backup} archive=base\.tar(\.zst)?\.age part=\d+ bytes=\d+", a)
        for a in parts if "archive=base" in a
    ), parts
    assert any("part=1 " in a for a in parts), parts
    assert re.fullmatch(rf"backup={backup} archive=base\.tar(\.zst)?\.age",
                        by_name["cloud_dump.open_archive"][0])  # fmt: skip
    assert by_name["cloud_dump.claim_backup"][0].startswith(f"backup={dashboard.backup} run=")
    assert re.fullmatch(rf"backup={backup} archives=\d+ parts=\d+ bytes=\d+",
                        by_name["cloud_dump.finalize_backup"][0])  # fmt: skip
    pushes = sorted(by_name["cloud_dump.push_wal"])
    assert [a.split()[0] for a in pushes] == [f"wal={name}" for name in WAL_FILES], pushes
    assert all(re.fullmatch(r"wal=\w{24} bytes=\d+", a) for a in pushes), pushes


def test_task_results_say_what_was_stored(dashboard: Dashboard) -> None:
    results = {t["name"]: t["result"] for t in dashboard.tasks().values()}
    assert f"'backup': '{dashboard.backup}'" in results["cloud_dump.finalize_backup"]
    assert "'parts': " in results["cloud_dump.finalize_backup"]
    assert "'status': 'stored'" in results["cloud_dump.push_wal"]
    assert "'part_number': " in results["cloud_dump.upload_part"]


def test_nothing_flower_serves_holds_a_secret(dashboard: Dashboard) -> None:
    tasks = dashboard.tasks()
    served = [json.dumps(tasks)]
    for task_id in tasks:
        status, info = dashboard.get(f"/api/task/info/{task_id}")
        assert status == 200
        served.append(json.dumps(info))
    for path in ("/api/workers?refresh=1", "/api/queues/length"):
        status, body = dashboard.get(path)
        served.append(json.dumps(body))
    assert len(served) > 10
    for what, secret in dashboard.secrets.items():
        leaks = [text for text in served if secret in text]
        assert not leaks, f"flower serves the {what}: {leaks[0][:300]}"


def test_the_fleet_runs_the_procfile_command_lines(dashboard: Dashboard) -> None:
    worker_env = {"WORKER_QUEUES": "parts,wal", "WORKER_CONCURRENCY": "1",
                  "WORKER_NAME": dashboard.pool.names[0].split("@")[0]}  # fmt: skip
    for process, entry, env in ((dashboard.pool.processes[0], "worker", worker_env),
                                (dashboard.flower, "flower", {})):  # fmt: skip
        words = expanded(procfile_command(entry), env)
        argv = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        # celery is a script: the kernel runs its interpreter with the script's path first.
        assert Path(argv[1]).name == words[0] == "celery"
        assert argv[2:] == words[1:], (argv, words)


def expanded(command: str, env: Mapping[str, str]) -> list[str]:
    """The words a shell runs for ``command`` in ``env``."""
    done = subprocess.run(["bash", "-c", f"printf '%s\\0' {command}"], env=dict(env),
                          capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout.split("\0")[:-1]

