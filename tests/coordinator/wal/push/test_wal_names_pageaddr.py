"""wal-push archives a segment only under its own name: the first page's address
(``xlp_pageaddr``) must be the start of the segment the name says, for segments and ``.partial``
files, on every route (in the call, pushed ahead by the call, through the detached WAL pusher).
The timeline in the header is not compared: the first segment of a new timeline starts as a copy
of the old timeline's and keeps its header, and is archived.

Real segments come from PostgreSQL 15 and 17 clusters archiving with ``cp``: a promoted copy
(``standby.signal``, then ``pg_promote()``) gives the first segment of timeline 2 and the old
timeline's ``.partial``.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from devrig.moto import StorageTarget, local_target
from devrig.postgres import PgFactory, make_postgres_dir
from devrig.recovery import wait_archived
from devrig.restored import RestoredCluster
from devrig.services import WorkerPool, error_line
from devrig.walfiles import SEG1, SEG2, SEG3, SYSID_A, WalDir, make_segment
from storage.walnames import Segment


def stored_names(target: StorageTarget) -> set[str]:
    return {info.key.removeprefix("wal_archive/").removesuffix(".zst")
            for info in target.open().list("wal_archive/0")}  # fmt: skip


def assert_refused(done: subprocess.CompletedProcess[str], name: str, held: str) -> None:
    assert done.returncode == ExitCode.INTEGRITY, done.stderr
    line = error_line(done.stderr)
    assert f"WAL file '{name}' holds segment {held}" in line, line


# --- segments written by the rig ------------------------------------------------------------


@pytest.mark.parametrize("route", ["no-broker", "pusher"])
def test_a_segment_under_another_segments_name_is_refused_on_every_route(
    route: str, wal_dir: WalDir, tmp_path: Path, start_workers: Callable[..., WorkerPool]
) -> None:
    target = local_target(tmp_path / "store")
    env = dict(target.env)
    if route == "pusher":
        env["CLOUD_DUMP_BROKER_URL"] = start_workers(target.env, count=1, queues="wal").broker_url
    # SEG1 is right; SEG2 holds SEG3's bytes and waits .ready behind it.
    wal_dir.add(SEG1, make_segment(SYSID_A, 400, SEG1), ready=True)
    wal_dir.add(SEG2, make_segment(SYSID_A, 401, SEG3), ready=True)
    assert wal_dir.push(SEG1, env=env).returncode == 0
    wal_dir.wait_for_pusher()
    assert stored_names(target) == {SEG1}  # not pushed ahead either
    assert not wal_dir.marker(SEG2).exists()
    assert_refused(wal_dir.push(SEG2, env=env), SEG2, SEG3)
    wal_dir.wait_for_pusher()
    assert stored_names(target) == {SEG1}


def test_a_partial_segment_is_checked_like_a_segment(wal_dir: WalDir, tmp_path: Path) -> None:
    target = local_target(tmp_path / "store")
    wrong, right = f"{SEG2}.partial", f"{SEG3}.partial"
    wal_dir.add(wrong, make_segment(SYSID_A, 410, SEG1))
    wal_dir.add(right, make_segment(SYSID_A, 411, right))
    assert_refused(wal_dir.push(wrong, env=target.env), wrong, SEG1)
    done = wal_dir.push(right, env=target.env)
    assert done.returncode == 0, done.stderr
    assert stored_names(target) == {right}


def test_a_segment_of_another_size_is_checked_with_its_own_size(
    wal_dir: WalDir, tmp_path: Path
) -> None:
    """1 MiB segments (initdb --wal-segsize 1): 4096 of them per "log" in the name, where
    16 MiB segments have 256: the name is read with the header's segment size."""
    size = 1024 * 1024
    target = local_target(tmp_path / "store")

    def segment(number: int) -> bytes:
        data = bytearray(size)
        struct.pack_into("<HHIQI", data, 0, 0xD110, 0x0002, 1, number * size, 0)
        struct.pack_into("<QII", data, 24, SYSID_A, size, 8192)
        return bytes(data)

    name = Segment(1, 0x10FF).name(size)
    assert name == "0000000100000001000000FF"
    wal_dir.add(name, segment(0x10FF))
    done = wal_dir.push(name, "--compression", "none", env=target.env)
    assert done.returncode == 0, done.stderr
    other = Segment(1, 0x1100).name(size)
    wal_dir.add(other, segment(0x10FF))
    assert_refused(wal_dir.push(other, env=target.env), other, name)


# --- segments written by PostgreSQL ---------------------------------------------------------


@dataclass(frozen=True)
class RealWal:
    major: int
    archived: Path  # what the source cluster archived (timeline 1)
    promoted: Path  # what its promoted copy archived (timeline 2, and timeline 1's .partial)


@pytest.fixture(scope="module", params=[15, 17])
def real_wal(request: pytest.FixtureRequest, pg_factory: PgFactory) -> Iterator[RealWal]:
    """A cluster archiving with ``cp``; a copy of its data directory, cleanly shut down, started
    as a standby (``standby.signal``) and promoted, archiving with ``cp`` too."""
    major = int(request.param)
    archived = make_postgres_dir("cloud-dump-pa-src-")
    promoted = make_postgres_dir("cloud-dump-pa-new-")
    source = pg_factory(major, archive_command=f"cp %p {archived}/%f")
    source.sql("CREATE TABLE t AS SELECT generate_series(1, 1000) AS g")
    wait_archived(source)
    source.stop()
    base = make_postgres_dir("cloud-dump-pa-copy-")
    subprocess.run(["cp", "-a", str(source.datadir), str(base / "data")], check=True)
    (base / "data" / "standby.signal").touch()
    copy = RestoredCluster(major, base / "data")
    copy.start(settings={"archive_mode": "on", "archive_command": f"cp %p {promoted}/%f"})
    try:
        copy.sql("SELECT pg_promote()")
        copy.sql("INSERT INTO t SELECT generate_series(1, 1000)")
        wait_archived(copy)
    finally:
        copy.stop()
    yield RealWal(major, archived, promoted)
    for path in (archived, promoted, base):
        shutil.rmtree(path, ignore_errors=True)


def header_timeline(data: bytes) -> int:
    return int(struct.unpack_from("<I", data, 4)[0])


def segments_in(directory: Path, timeline: int) -> list[str]:
    return sorted(p.name for p in directory.iterdir()
                  if len(p.name) == 24 and int(p.name[:8], 16) == timeline)  # fmt: skip


def test_a_real_segment_is_archived_and_its_copy_under_the_next_name_is_refused(
    real_wal: RealWal, wal_dir: WalDir, tmp_path: Path
) -> None:
    target = local_target(tmp_path / "store")
    name = segments_in(real_wal.archived, 1)[-1]
    data = (real_wal.archived / name).read_bytes()
    wal_dir.add(name, data)
    done = wal_dir.push(name, env=target.env)
    assert done.returncode == 0, done.stderr
    for number in (Segment.parse(name).number + 1, Segment.parse(name).number - 1):
        other = Segment(1, number).name()
        wal_dir.add(other, data)
        assert_refused(wal_dir.push(other, env=target.env), other, name)
        partial = f"{other}.partial"
        wal_dir.add(partial, data)
        assert_refused(wal_dir.push(partial, env=target.env), partial, name)
    assert stored_names(target) == {name}


def test_the_first_segment_of_a_new_timeline_and_the_old_partial_are_archived(
    real_wal: RealWal, wal_dir: WalDir, tmp_path: Path
) -> None:
    target = local_target(tmp_path / "store")
    first = segments_in(real_wal.promoted, 2)[0]
    partial = f"{Segment(1, Segment.parse(first).number).name()}.partial"
    files = {name: (real_wal.promoted / name).read_bytes() for name in (first, partial)}
    # The case the timeline must not be compared for: timeline 2's file, timeline 1's header.
    assert header_timeline(files[first]) == 1
    for name, data in files.items():
        wal_dir.add(name, data)
        done = wal_dir.push(name, "--compression", "none", env=target.env)
        assert done.returncode == 0, done.stderr
        assert target.open().get(f"wal_archive/{name}") == data
