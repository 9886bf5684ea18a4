"""WAL files for wal-push tests: segments as PostgreSQL writes them, and a stand-in for PGDATA's
``pg_wal`` to push them from through the installed command.

``wal_dir`` (function) is a ``WalDir`` under the test's tmp_path; at its end a WAL pusher that
outlives the test is stopped (that pid only).
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.background import helper_pid, helper_running
from coordinator.wait import wait_until
from coordinator.wal.push.spool import PUSHER_LOCK, PUSHER_LOG
from devrig.services import VENV_BIN, run_cli
from storage.walnames import Segment

SEGMENT_SIZE = 16 * 1024 * 1024
SYSID_A = 7_300_000_000_000_000_001
SYSID_B = 7_300_000_000_000_000_002
SEG1, SEG2, SEG3, SEG4 = (f"0000000100000000000000{i:02X}" for i in range(1, 5))


def make_segment(system_identifier: int, seed: int, name: str) -> bytes:
    """A 16 MiB segment as PostgreSQL writes it under ``name`` (a segment or ``.partial``
    name): its first page carries a long header with the name's timeline and the segment's
    own address (``xlp_pageaddr``: segment number x segment size), which wal-push checks."""
    data = bytearray(SEGMENT_SIZE)
    pageaddr = Segment.parse(name, SEGMENT_SIZE).number * SEGMENT_SIZE
    # magic (PG 15), info = XLP_LONG_HEADER, tli, pageaddr, rem_len; then sysid, sizes.
    struct.pack_into("<HHIQI", data, 0, 0xD110, 0x0002, int(name[:8], 16), pageaddr, 0)
    struct.pack_into("<QII", data, 24, system_identifier, SEGMENT_SIZE, 8192)
    chunk = seed.to_bytes(8, "little") * 512
    for offset in range(8192, SEGMENT_SIZE // 2, 8192):  # half records, half zeros: like WAL
        data[offset : offset + len(chunk)] = chunk
    return bytes(data)


class WalDir:
    """Stands for PGDATA: ``pg_wal/`` with ``archive_status/``; wal-push runs from here."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pg_wal = root / "pg_wal"
        (self.pg_wal / "archive_status").mkdir(parents=True)

    def add(self, name: str, data: bytes, ready: bool = False) -> str:
        (self.pg_wal / name).write_bytes(data)
        if ready:
            (self.pg_wal / "archive_status" / f"{name}.ready").touch()
        return name

    def replace_by_rename(self, name: str, data: bytes) -> None:
        """A new file (new inode) renamed over ``name``, as a copy tool does."""
        tmp = self.pg_wal / f"{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(self.pg_wal / name)

    def marker(self, name: str) -> Path:
        return self.pg_wal / "cloud-dump" / "archived" / name

    def push(self, name: str, *flags: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return run_cli("wal-push", str(self.pg_wal / name), name, *flags, env=env)

    def start_push(self, name: str, *flags: str, env: dict[str, str]) -> subprocess.Popen[str]:
        """``push``, left running: its output is read with ``communicate()``."""
        return subprocess.Popen(
            [str(VENV_BIN / "cloud-dump"), "wal-push", str(self.pg_wal / name), name, *flags],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @property
    def spool(self) -> Path:
        return self.pg_wal / "cloud-dump"

    def pusher_log(self) -> str:
        path = self.spool / PUSHER_LOG
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_pusher(self, timeout_s: float = 30.0) -> None:
        """Until the detached WAL pusher of this spool has exited (it does when idle)."""
        assert wait_until(lambda: not helper_running(self.spool / PUSHER_LOCK),
                          timeout_s=timeout_s, first_s=0.05), (
            f"the pusher is still running: {self.pusher_log()}")


@pytest.fixture
def wal_dir(tmp_path: Path) -> Iterator[WalDir]:
    wal_dir = WalDir(tmp_path / "pgdata")
    yield wal_dir
    # A pusher exits by itself once idle; stop one that outlives its test (only that pid).
    pid = helper_pid(wal_dir.spool / PUSHER_LOCK)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
