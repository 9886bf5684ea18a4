"""The detached WAL pusher: files pushed ahead, failures handed to their own call, settings
off its command line, and no segment lost when a worker or the pusher is killed mid-push.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from coordinator.background import helper_pid
from coordinator.cli.exitcodes import ExitCode
from coordinator.wal.push.spool import (
    PUSHER_LOCK,
)
from devrig.moto import StorageTarget, local_target
from devrig.procs import free_port
from devrig.services import PUSH_RECEIVED, WorkerPool, error_line, wait_for_log
from devrig.tcpproxy import TcpProxy
from devrig.walfiles import SEG1, SEG2, SEG3, SYSID_A, WalDir, make_segment


def test_pusher_pushes_ready_files_ahead_and_later_calls_need_no_broker(
    wal_dir: WalDir, start_workers: Callable[..., WorkerPool], tmp_path: Path
) -> None:
    target = local_target(tmp_path / "store")
    pool = start_workers(target.env, count=2, queues="wal")
    names = [f"0000000100000000000000{i:02X}" for i in range(1, 7)]
    segments = {name: make_segment(SYSID_A, 60 + i, name) for i, name in enumerate(names)}
    for name, data in segments.items():
        wal_dir.add(name, data, ready=True)
    env = {"CLOUD_DUMP_BROKER_URL": pool.broker_url}
    result = wal_dir.push(names[0], "--look-ahead", "3", env=env)
    assert result.returncode == 0, result.stderr
    wal_dir.wait_for_pusher()
    storage = target.open()
    for name, data in segments.items():
        blob = storage.get(f"wal_archive/{name}.zst")
        assert zstandard.ZstdDecompressor().decompress(blob) == data
        assert wal_dir.marker(name).exists()
    assert not list((wal_dir.spool / "requests").iterdir())
    # PostgreSQL's own status files are left alone: it marks .done after each 0.
    assert len(list((wal_dir.pg_wal / "archive_status").glob("*.ready"))) == len(names)
    # The later calls answer from their markers: no broker needed, none contacted.
    dead = {"CLOUD_DUMP_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    for name in names[1:]:
        assert wal_dir.push(name, env=dead).returncode == 0


def test_pusher_failure_of_a_look_ahead_file_is_reported_by_its_own_call(
    wal_dir: WalDir, start_workers: Callable[..., WorkerPool], tmp_path: Path
) -> None:
    target = local_target(tmp_path / "store")
    other = WalDir(tmp_path / "other")
    other.add(SEG2, make_segment(SYSID_A, 70, SEG2))
    assert other.push(SEG2, env=target.env).returncode == 0  # SEG2 archived, other content
    pool = start_workers(target.env, count=1, queues="wal")
    env = {"CLOUD_DUMP_BROKER_URL": pool.broker_url}
    wal_dir.add(SEG1, make_segment(SYSID_A, 71, SEG1), ready=True)
    wal_dir.add(SEG2, make_segment(SYSID_A, 72, SEG2), ready=True)
    assert wal_dir.push(SEG1, env=env).returncode == 0
    wal_dir.wait_for_pusher()
    assert not wal_dir.marker(SEG2).exists()
    assert (wal_dir.spool / "errors" / SEG2).exists()  # kept for SEG2's own call
    stored_before = target.open().get(f"wal_archive/{SEG2}.zst")
    result = wal_dir.push(SEG2, env=env)
    assert result.returncode == ExitCode.WAL_CONFLICT, result.stderr
    assert "already archived with different content" in error_line(result.stderr)
    assert target.open().get(f"wal_archive/{SEG2}.zst") == stored_before
    wal_dir.wait_for_pusher()
    assert not (wal_dir.spool / "errors" / SEG2).exists()
    assert not (wal_dir.spool / "requests" / SEG2).exists()


def test_pusher_gets_its_settings_off_its_command_line(
    wal_dir: WalDir, start_workers: Callable[..., WorkerPool], tmp_path: Path
) -> None:
    target = local_target(tmp_path / "store")
    pool = start_workers(target.env, count=1, queues="wal")
    wal_dir.add(SEG1, make_segment(SYSID_A, 80, SEG1), ready=True)
    secret = "pusher-secret-passphrase"
    env = {"CLOUD_DUMP_BROKER_URL": pool.broker_url}
    result = wal_dir.push(SEG1, "--passphrase", secret, env=env)
    assert result.returncode == 0, result.stderr
    pid = helper_pid(wal_dir.spool / PUSHER_LOCK)  # idle, it lingers a moment before exiting
    assert pid is not None, "no pusher running right after the push"
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1:3] == [b"-m", b"coordinator.wal.push.helper"], cmdline
    assert secret.encode() not in b" ".join(cmdline)
    wal_dir.wait_for_pusher()
    assert secret not in wal_dir.pusher_log()
    assert target.open().get(f"wal_archive/{SEG1}.zst.age")


@dataclass
class StuckPush:
    """A wal-push of SEG1 whose one worker is inside its push, held there by the proxy."""

    proxy: TcpProxy
    pool: WorkerPool
    segment: bytes
    call: subprocess.Popen[str]

    def finish(self) -> str:
        """Wait for the call; its stderr (it must have succeeded)."""
        _, stderr = self.call.communicate(timeout=60)
        assert self.call.returncode == 0, stderr
        return stderr


@pytest.fixture
def stuck_push(
    wal_dir: WalDir,
    start_workers: Callable[..., WorkerPool],
    s3_store: StorageTarget,
    s3_proxy: TcpProxy,
) -> StuckPush:
    s3_proxy.hold()
    pool = start_workers(
        {**s3_store.env, "CLOUD_DUMP_S3_ENDPOINT": s3_proxy.endpoint}, count=1, queues="wal"
    )
    segment = make_segment(SYSID_A, 50, SEG1)
    wal_dir.add(SEG1, segment, ready=True)
    call = wal_dir.start_push(
        SEG1, env={"CLOUD_DUMP_BROKER_URL": pool.broker_url, "CLOUD_DUMP_WAL_RETRY_S": "3"}
    )
    wait_for_log([pool.processes[0].log_path], PUSH_RECEIVED, timeout_s=30)
    return StuckPush(s3_proxy, pool, segment, call)


def assert_archived(s3_store: StorageTarget, segment: bytes) -> None:
    blob = s3_store.open().get(f"wal_archive/{SEG1}.zst")
    assert zstandard.ZstdDecompressor().decompress(blob) == segment


def test_a_worker_killed_mid_push_does_not_lose_the_segment(
    wal_dir: WalDir,
    stuck_push: StuckPush,
    start_workers: Callable[..., WorkerPool],
    s3_store: StorageTarget,
) -> None:
    stuck_push.pool.processes[0].kill_group(signal.SIGKILL)
    start_workers(s3_store.env, count=1, queues="wal")
    stuck_push.finish()
    assert "sending it again" in wal_dir.pusher_log()
    assert_archived(s3_store, stuck_push.segment)


def test_a_pusher_killed_mid_push_is_replaced_and_nothing_is_lost(
    wal_dir: WalDir, stuck_push: StuckPush, s3_store: StorageTarget
) -> None:
    first = helper_pid(wal_dir.spool / PUSHER_LOCK)
    assert first is not None
    os.kill(first, signal.SIGKILL)  # with the push in flight, its answer still to come
    stuck_push.proxy.release()
    stuck_push.finish()
    assert wal_dir.marker(SEG1).exists()
    assert_archived(s3_store, stuck_push.segment)
    assert wal_dir.pusher_log().count("WAL pusher started") == 2  # the call started another


def test_a_call_waiting_for_a_running_pusher_is_answered_without_the_full_cli(
    wal_dir: WalDir, start_workers: Callable[..., WorkerPool], tmp_path: Path
) -> None:
    """The common call under load: the pusher runs, the file is not confirmed yet. It waits for
    its marker without argparse, logging or settings (coordinator.wal.push.quickwait); an error
    the pusher records for it still comes out of the full CLI with its own exit status."""
    target = local_target(tmp_path / "store")
    other = WalDir(tmp_path / "other")
    other.add(SEG3, make_segment(SYSID_A, 80, SEG3))
    assert other.push(SEG3, env=target.env).returncode == 0  # SEG3 archived, other content
    pool = start_workers(target.env, count=1, queues="wal")
    # A pusher that stays up between the calls, so that each finds it running.
    env = {"CLOUD_DUMP_BROKER_URL": pool.broker_url, "CLOUD_DUMP_WAL_PUSHER_IDLE_EXIT": "120"}
    wal_dir.add(SEG1, make_segment(SYSID_A, 81, SEG1), ready=True)
    assert wal_dir.push(SEG1, env=env).returncode == 0  # starts the pusher
    pusher = helper_pid(wal_dir.spool / PUSHER_LOCK)
    assert pusher is not None
    # Not .ready: the pusher does not push it ahead, so its call has to ask and wait.
    second = make_segment(SYSID_A, 82, SEG2)
    wal_dir.add(SEG2, second)
    result = wal_dir.push(SEG2, env={**env, "PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr
    imported = {
        line.rpartition("|")[2].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "coordinator.wal.push.quickwait" in imported
    assert "coordinator.cli.main" not in imported
    assert zstandard.ZstdDecompressor().decompress(
        target.open().get(f"wal_archive/{SEG2}.zst")) == second  # fmt: skip
    assert wal_dir.marker(SEG2).exists()
    assert not (wal_dir.spool / "requests" / SEG2).exists()
    # The same pusher answered: the call started none.
    assert helper_pid(wal_dir.spool / PUSHER_LOCK) == pusher
    wal_dir.add(SEG3, make_segment(SYSID_A, 83, SEG3))
    stored_before = target.open().get(f"wal_archive/{SEG3}.zst")
    conflict = wal_dir.push(SEG3, env=env)
    assert conflict.returncode == ExitCode.WAL_CONFLICT, conflict.stderr
    assert "already archived with different content" in error_line(conflict.stderr)
    assert target.open().get(f"wal_archive/{SEG3}.zst") == stored_before
    assert not (wal_dir.spool / "errors" / SEG3).exists()
    assert not (wal_dir.spool / "requests" / SEG3).exists()
