"""Workers that vanish, and storage that never answers: the work resumes as soon as a worker can
take it, and no call waits past its own timeout."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.exitcodes import ExitCode
from tests.rig import sample
from tests.rig.moto import MotoServer, StorageTarget, s3_target
from tests.rig.postgres import PgCluster, PgFactory
from tests.rig.roundtrip import restore_and_compare
from tests.rig.services import VENV_BIN, RedisServer, WorkerPool, run_cli
from tests.test_wal_push import SEG1, SYSID_A, WalDir, make_segment

PART_RECEIVED = "Task cloud_dump.upload_part["


class FreezableProxy:
    """A TCP proxy to the S3 server whose traffic can be frozen: a worker whose upload is under
    way when ``freeze()`` is called stays inside it, as one hung on a dying host would."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self._flowing = threading.Event()
        self._flowing.set()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self._flowing.clear()

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._server.accept()
                upstream = socket.create_connection(("127.0.0.1", self._upstream))
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                self._flowing.wait()
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


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
    cluster = pg_factory(15)
    tablespace = sample.populate(cluster, rows=200_000)
    return cluster, tablespace, sample.digest(cluster.sql)


@pytest.fixture
def s3_store(moto_server: MotoServer, aws_env: dict[str, str], s3_bucket: str) -> StorageTarget:
    return s3_target(moto_server.endpoint, s3_bucket, aws_env)


def wait_for(paths: list[Path], *needles: str, timeout_s: float = 60) -> None:
    """Until one line of one of the logs holds every needle."""
    deadline = time.monotonic() + timeout_s
    while True:
        for path in paths:
            for line in path.read_text(errors="replace").splitlines():
                if all(n in line for n in needles):
                    return
        assert time.monotonic() < deadline, f"{needles} never appeared in {paths}"
        time.sleep(0.002)


def test_backup_resumes_soon_after_every_worker_was_killed_and_new_ones_started(
    big_source: tuple[PgCluster, Path, dict[str, str]],
    s3_store: StorageTarget,
    moto_server: MotoServer,
    redis_server: RedisServer,
    start_workers: Callable[..., WorkerPool],
    children: list[subprocess.Popen[str]],
) -> None:
    cluster, tablespace, expected = big_source
    proxy = FreezableProxy(int(moto_server.endpoint.rsplit(":", 1)[1]))
    try:
        doomed = start_workers(
            {**s3_store.env, "CLOUD_DUMP_S3_ENDPOINT": f"http://127.0.0.1:{proxy.port}"}, count=2
        )
        logs = [p.log_path for p in doomed.processes]
        # The default --part-timeout (300 s): only noticing the lost parts brings them back.
        coordinator = subprocess.Popen(
            [str(VENV_BIN / "cloud-dump"), "backup", "--name", "b1", "--db-url",
             cluster.replication_url(), "--broker", redis_server.url, "--part-size-mib", "5",
             "--compression", "none", "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **s3_store.env},
        )  # fmt: skip
        children.append(coordinator)
        # Once the first archive's upload is open, hold every upload inside the workers...
        wait_for(logs, "cloud_dump.open_archive[", "succeeded")
        proxy.freeze()
        wait_for(logs, PART_RECEIVED)
        # ...and kill them all there: the parts they took are lost with them.
        for process in doomed.processes:
            process.kill_group(signal.SIGKILL)
        start_workers(s3_store.env, count=2)
        ready = time.monotonic()
        # Well under the part timeout: fails if the lost parts wait for it.
        _, stderr = coordinator.communicate(timeout=150)
        print(f"backup completed {time.monotonic() - ready:.1f} s after new workers were up")
        assert coordinator.returncode == 0, stderr
        assert "sending it again" in stderr  # a lost part was noticed and sent again
        restore_and_compare(cluster, s3_store, "b1", tablespace, expected)
    finally:
        proxy.close()


# --- wal-push without a broker: --timeout bounds the call --------------------------------------


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An "S3 endpoint" that accepts connections and never answers. A stub: no real server
    hangs on demand, and a store that stops answering mid-request is what this is about."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize("encryption", ["none", "passphrase"])
def test_wal_push_without_a_broker_gives_up_at_its_timeout(
    encryption: str, silent_endpoint: str, tmp_path: Path, aws_env: dict[str, str]
) -> None:
    wal_dir = WalDir(tmp_path / "pgdata")
    wal_dir.add(SEG1, make_segment(SYSID_A, 95), ready=True)
    flags = ["--storage", "s3://bucket/wal", "--s3-endpoint", silent_endpoint, "--timeout", "3"]
    if encryption == "passphrase":
        (tmp_path / "pass").write_text("secret\n")
        flags += ["--passphrase-file", str(tmp_path / "pass")]
    # Far less than the client library's own timeouts (60 s a request, 5 attempts).
    result = run_cli("wal-push", str(wal_dir.pg_wal / SEG1), SEG1, *flags, timeout_s=40)
    assert result.returncode == ExitCode.STORAGE_UNREACHABLE, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("cloud-dump: error: ")]
    assert len(errors) == 1 and "s3://bucket/wal" in errors[0], result.stderr
    assert not wal_dir.marker(SEG1).exists()
