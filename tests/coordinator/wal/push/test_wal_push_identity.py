"""wal-push: a confirmation marker answers only for the very file it confirmed, and a call run by
hand outside ``pg_wal`` keeps no spool — through the installed command, against real storage,
Redis and Celery workers.

The marker lets a later call answer 0 without reading the file. A file put under an archived
name afterwards (different bytes of the same size, written in place or renamed in) must not be
answered from it: the call pushes, the worker compares content and refuses (exit 17), and the
stored object stays as it was. On every path: without a broker, through the WAL pusher, and
``--look-ahead 0`` through the workers; for markers the call wrote and markers a look-ahead
push wrote.
"""

from __future__ import annotations

import os
import struct
import subprocess
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from coordinator.cli import fastpath
from coordinator.cli.exitcodes import ExitCode
from coordinator.wal.push.encode import read_wal
from coordinator.wal.push.spool import archive_location
from devrig.moto import local_target
from devrig.procs import free_port
from devrig.services import VENV_BIN, WorkerPool, error_line, run_cli
from devrig.walfiles import SEG1, SEG2, SEG3, SYSID_A, WalDir, make_segment
from storage.base import Storage
from storage.errors import IntegrityError


def snapshot(storage: Storage) -> dict[str, tuple[bytes, Mapping[str, str] | None]]:
    """Every stored WAL object: its bytes and its metadata."""
    return {
        info.key: (storage.get(info.key), storage.head(info.key).metadata)
        for info in storage.list("wal_archive/")
    }


def overwrite_in_place(path: Path, data: bytes) -> None:
    """Same inode, same size: only the content (and mtime/ctime) changes."""
    assert len(data) == path.stat().st_size
    with path.open("r+b") as f:
        f.write(data)


DEAD_BROKER = {"CLOUD_DUMP_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}


@pytest.mark.parametrize("route", ["no-broker", "pusher", "look-ahead-0"])
def test_a_marker_answers_only_for_the_file_it_confirmed(
    route: str, wal_dir: WalDir, tmp_path: Path, start_workers: Callable[..., WorkerPool]
) -> None:
    target = local_target(tmp_path / "store")
    env = dict(target.env)
    flags: list[str] = []
    if route != "no-broker":
        env["CLOUD_DUMP_BROKER_URL"] = start_workers(target.env, count=1, queues="wal").broker_url
    if route == "look-ahead-0":
        flags = ["--look-ahead", "0"]
    first, second = make_segment(SYSID_A, 100, SEG1), make_segment(SYSID_A, 101, SEG2)
    wal_dir.add(SEG1, first, ready=True)
    wal_dir.add(SEG2, second, ready=True)
    result = wal_dir.push(SEG1, *flags, env=env)
    assert result.returncode == 0, result.stderr
    if route == "look-ahead-0":
        assert wal_dir.push(SEG2, *flags, env=env).returncode == 0
    else:
        wal_dir.wait_for_pusher()  # SEG2 went ahead (marked by the pusher or the batch)
    assert wal_dir.marker(SEG1).exists() and wal_dir.marker(SEG2).exists()
    storage = target.open()
    before = snapshot(storage)
    assert set(before) >= {f"wal_archive/{SEG1}.zst", f"wal_archive/{SEG2}.zst"}

    # Different bytes of the same size: in place (SEG1, a marker its own call wrote), renamed
    # in (SEG2, a marker the look-ahead wrote), in place with the old mtime put back (SEG1).
    overwrite_in_place(wal_dir.pg_wal / SEG1, make_segment(SYSID_A, 102, SEG1))
    wal_dir.replace_by_rename(SEG2, make_segment(SYSID_A, 103, SEG2))
    for name in (SEG1, SEG2):
        result = wal_dir.push(name, *flags, env=env)
        assert result.returncode == ExitCode.WAL_CONFLICT, result.stderr
        assert "already archived with different content" in error_line(result.stderr)
    old_mtime = (wal_dir.pg_wal / SEG1).stat().st_mtime_ns
    overwrite_in_place(wal_dir.pg_wal / SEG1, make_segment(SYSID_A, 104, SEG1))
    os.utime(wal_dir.pg_wal / SEG1, ns=(old_mtime, old_mtime))
    result = wal_dir.push(SEG1, *flags, env=env)
    assert result.returncode == ExitCode.WAL_CONFLICT, result.stderr
    assert snapshot(storage) == before

    # The archived bytes back, in a new file: pushed again (no marker answers), "already
    # archived", and marked again, so that the next call answers from the marker.
    wal_dir.replace_by_rename(SEG1, first)
    result = wal_dir.push(SEG1, *flags, env=env)
    assert result.returncode == 0, result.stderr
    if route == "pusher":
        wal_dir.wait_for_pusher()
        assert f"WAL file '{SEG1}' was already archived" in wal_dir.pusher_log()
    else:
        assert f"WAL file '{SEG1}' was already archived" in result.stderr
    assert wal_dir.push(SEG1, *flags, env={**target.env, **DEAD_BROKER}).returncode == 0
    assert snapshot(storage) == before


def test_a_history_file_changed_under_its_marker_is_refused(
    wal_dir: WalDir, tmp_path: Path
) -> None:
    """Not only segments: another timeline's history under an archived name (any size)."""
    target = local_target(tmp_path / "store")
    (wal_dir.root / "global").mkdir()
    (wal_dir.root / "global" / "pg_control").write_bytes(struct.pack("<Q", SYSID_A) + bytes(100))
    name = "00000002.history"
    wal_dir.add(name, b"1\t0/3000000\tno recovery target specified\n", ready=True)
    assert wal_dir.push(name, env=target.env).returncode == 0
    assert wal_dir.marker(name).exists()
    storage = target.open()
    before = snapshot(storage)
    wal_dir.replace_by_rename(name, b"1\t0/5000000\tbefore 2026-11-30 12:00:00+00\n")
    result = wal_dir.push(name, env=target.env)
    assert result.returncode == ExitCode.WAL_CONFLICT, result.stderr
    assert f"'{name}' is already archived with different content" in error_line(result.stderr)
    assert snapshot(storage) == before


def test_a_marker_without_the_file_identity_answers_for_nothing(
    wal_dir: WalDir, tmp_path: Path
) -> None:
    """Markers of the first format ("<sha256> <location>") say nothing about which file."""
    target = local_target(tmp_path / "store")
    segment = make_segment(SYSID_A, 110, SEG1)
    wal_dir.add(SEG1, segment)
    location = archive_location(target.url, None, None)
    wal_dir.marker(SEG1).parent.mkdir(parents=True)
    wal_dir.marker(SEG1).write_text(f"{'0' * 64} {location}\n")
    path = str(wal_dir.pg_wal / SEG1)
    assert not fastpath.wal_push_confirmed([path, SEG1, "--storage", target.url])
    result = wal_dir.push(SEG1, env=target.env)
    assert result.returncode == 0, result.stderr
    assert f"WAL file '{SEG1}' archived at" in result.stderr  # pushed, not answered
    assert target.open().get(f"wal_archive/{SEG1}.zst")


def test_fast_path_compares_the_marker_with_the_file(tmp_path: Path) -> None:
    """The entry point's answer, before argparse: a stat of %p, no hashing."""
    target = local_target(tmp_path / "store")
    wal_dir = WalDir(tmp_path / "pgdata")
    wal_dir.add(SEG1, make_segment(SYSID_A, 120, SEG1))
    assert wal_dir.push(SEG1, env=target.env).returncode == 0
    path = wal_dir.pg_wal / SEG1
    argv = [str(path), SEG1, "--storage", target.url]
    assert fastpath.wal_push_confirmed(argv)
    os.utime(path)  # touched: the mtime differs
    assert not fastpath.wal_push_confirmed(argv)
    path.unlink()  # gone: nothing to answer for
    assert not fastpath.wal_push_confirmed(argv)


def test_a_file_changing_while_it_is_read_is_not_pushed(tmp_path: Path) -> None:
    """A writer keeps changing the file (as only someone other than PostgreSQL would): the read
    that overlaps a change is refused instead of yielding bytes and an identity for a marker."""
    path = tmp_path / SEG1
    path.write_bytes(make_segment(SYSID_A, 130, SEG1))
    stop = threading.Event()

    def touch() -> None:
        while not stop.is_set():
            os.utime(path)

    writer = threading.Thread(target=touch, daemon=True)
    writer.start()
    refused = 0
    try:
        for _ in range(50):
            try:
                raw = read_wal(path, SEG1)
            except IntegrityError as exc:
                assert f"WAL file '{SEG1}' changed while it was being read" in str(exc)
                refused += 1
            else:
                assert len(raw.data) == path.stat().st_size
    finally:
        stop.set()
        writer.join()
    assert refused > 0


# --- no spool outside pg_wal ----------------------------------------------------------------


@pytest.mark.parametrize("broker", [False, True], ids=["no-broker", "broker"])
def test_wal_push_by_hand_outside_pg_wal_creates_no_spool(
    broker: bool, tmp_path: Path, start_workers: Callable[..., WorkerPool]
) -> None:
    target = local_target(tmp_path / "store")
    env = dict(target.env)
    if broker:
        env["CLOUD_DUMP_BROKER_URL"] = start_workers(target.env, count=1, queues="wal").broker_url
    somewhere = tmp_path / "some" / "dir"
    somewhere.mkdir(parents=True)
    (somewhere / "archive_status").mkdir()
    (somewhere / SEG1).write_bytes(make_segment(SYSID_A, 140, SEG1))
    (somewhere / SEG2).write_bytes(make_segment(SYSID_A, 141, SEG2))
    (somewhere / "archive_status" / f"{SEG2}.ready").touch()
    result = run_cli("wal-push", str(somewhere / SEG1), SEG1, env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in somewhere.iterdir()) == [SEG1, SEG2, "archive_status"]
    storage = target.open()
    assert storage.get(f"wal_archive/{SEG1}.zst")
    # Synchronous and alone: no pusher, no look-ahead without a spool.
    assert not list(storage.list(f"wal_archive/{SEG2}"))
    # Again: no marker to answer from, the archive answers.
    result = run_cli("wal-push", str(somewhere / SEG1), SEG1, env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in somewhere.iterdir()) == [SEG1, SEG2, "archive_status"]

    # An explicit --spool-dir is a spool: markers go there.
    spool = tmp_path / "my-spool"
    result = run_cli("wal-push", str(somewhere / SEG1), SEG1, "--spool-dir", str(spool),
                     "--look-ahead", "0", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (spool / "archived" / SEG1).exists()
    assert not (somewhere / "cloud-dump").exists()


def test_wal_push_in_a_pg_wal_directory_keeps_its_spool_there(tmp_path: Path) -> None:
    """%p relative to the data directory, as PostgreSQL passes it (pg_wal/NAME)."""
    target = local_target(tmp_path / "store")
    wal_dir = WalDir(tmp_path / "pgdata")
    wal_dir.add(SEG3, make_segment(SYSID_A, 150, SEG3))
    done = subprocess.run(
        [str(VENV_BIN / "cloud-dump"), "wal-push", f"pg_wal/{SEG3}", SEG3],
        env={**os.environ, **target.env}, cwd=wal_dir.root, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert wal_dir.marker(SEG3).exists()
