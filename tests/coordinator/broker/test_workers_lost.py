"""Workers that vanish, and storage that never answers: the work resumes as soon as a worker can
take it, and no call waits past its own timeout."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from devrig.moto import StorageTarget
from devrig.roundtrip import restore_and_compare, start_backup
from devrig.sample import BigSource
from devrig.services import (
    PART_RECEIVED,
    RedisServer,
    WorkerPool,
    error_line,
    run_cli,
    wait_for_log,
)
from devrig.tcpproxy import TcpProxy
from devrig.walfiles import SEG1, SYSID_A, WalDir, make_segment


def test_backup_resumes_soon_after_every_worker_was_killed_and_new_ones_started(
    big_source: BigSource,
    s3_store: StorageTarget,
    s3_proxy: TcpProxy,
    redis_server: RedisServer,
    start_workers: Callable[..., WorkerPool],
    children: list[subprocess.Popen[str]],
) -> None:
    cluster, tablespace, expected = big_source
    doomed = start_workers({**s3_store.env, "CLOUD_DUMP_S3_ENDPOINT": s3_proxy.endpoint}, count=2)
    logs = [p.log_path for p in doomed.processes]
    # The default --part-timeout (300 s): only noticing the lost parts brings them back.
    coordinator = start_backup(cluster, s3_store, redis_server.url, "b1")
    children.append(coordinator)
    # Once the first archive's upload is open and the WAL archive was read (its answer is
    # waited for before the first part is sent), hold every upload inside the workers, as on
    # a host that hangs before it dies...
    wait_for_log(logs, "cloud_dump.open_archive[", "succeeded")
    wait_for_log(logs, "cloud_dump.open_wal_archive[", "succeeded")
    s3_proxy.hold()
    wait_for_log(logs, PART_RECEIVED)
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
    wal_dir.add(SEG1, make_segment(SYSID_A, 95, SEG1), ready=True)
    flags = ["--storage", "s3://bucket/wal", "--s3-endpoint", silent_endpoint, "--timeout", "3"]
    if encryption == "passphrase":
        (tmp_path / "pass").write_text("secret\n")
        flags += ["--passphrase-file", str(tmp_path / "pass")]
    # Far less than the client library's own timeouts (60 s a request, 5 attempts).
    result = run_cli("wal-push", str(wal_dir.pg_wal / SEG1), SEG1, *flags, timeout_s=40)
    assert result.returncode == ExitCode.STORAGE_UNREACHABLE, result.stderr
    assert "s3://bucket/wal" in error_line(result.stderr)
    assert not wal_dir.marker(SEG1).exists()
