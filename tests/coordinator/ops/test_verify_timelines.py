"""``cloud-dump verify`` follows the timelines' history on real WAL: a copy restored to the
backup's end promotes to timeline 2 and archives into the same store while the source goes on on
timeline 1. For the backup, timeline 1 is needed up to the switch point and timeline 2 from
there: a gap on timeline 2 or its missing history file is named, a gap on the abandoned rest of
timeline 1 is not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from devrig.postgres import PgFactory
from devrig.recovery import (
    archive_command,
    archive_store,
    archiving_cluster,
    restore,
    wait_archived,
    wait_promoted,
)
from devrig.restored import started
from devrig.services import run_cli
from storage.walnames import Segment, is_segment

INTEGRITY = int(ExitCode.INTEGRITY)


@pytest.fixture(scope="module")
def two_timelines(pg_factory: PgFactory) -> Path:
    """A store with backup b1 of timeline 1, the source's WAL after it on timeline 1, and a
    copy restored to b1's end (recovery target immediate) that promoted to timeline 2 and
    archived three more segments there. The store's directory."""
    target = archive_store()
    source = archiving_cluster(pg_factory, 15, target)
    source.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
    done = run_cli("backup", "--name", "b1", "--db-url", source.replication_url(),
                   "--no-progress", env=target.env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for _ in range(3):  # the source goes on: timeline 1 after the switch point
        source.sql("INSERT INTO t SELECT g FROM generate_series(1, 1000) g")
        source.sql("SELECT pg_switch_wal()")
    wait_archived(source)
    pgdata, restored = restore(target, "b1", "--recovery-target", "immediate")
    assert restored.returncode == 0, restored.stderr
    settings = {"archive_mode": "on", "archive_command": archive_command(target)}
    with started(15, pgdata, settings=settings) as copy:
        wait_promoted(copy)
        for _ in range(3):
            copy.sql("INSERT INTO t SELECT g FROM generate_series(1, 1000) g")
            copy.sql("SELECT pg_switch_wal()")
        wait_archived(copy)
    store = Path(target.url.removeprefix("file://"))
    assert any(p.name.startswith("00000002.history") for p in (store / "wal_archive").iterdir())
    return store


def copied(store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(store, copy, symlinks=True)
    return copy


def segments(store: Path, timeline: int) -> list[str]:
    names = {p.name[:24] for p in (store / "wal_archive").iterdir()}
    return sorted(n for n in names if is_segment(n) and int(n[:8], 16) == timeline)


def switch_segment(store: Path) -> str:
    """The first segment of timeline 2 (it holds the switch point)."""
    return segments(store, 2)[0]


def remove(store: Path, name: str) -> None:
    for path in (store / "wal_archive").glob(f"{name}*"):
        if ".backup" not in path.name and ".partial" not in path.name:
            path.unlink()


def verify(store: Path, *flags: str) -> tuple[int, str]:
    done = run_cli("verify", *flags, env={"CLOUD_DUMP_STORAGE": f"file://{store}"})
    return done.returncode, done.stdout + done.stderr


def test_both_timelines_intact_pass_plain_and_deep(two_timelines: Path, tmp_path: Path) -> None:
    store = copied(two_timelines, tmp_path)
    code, out = verify(store)
    assert code == 0 and "timeline 2: " in out, out
    code, out = verify(store, "--deep")
    assert code == 0, out
    # Timeline 1 up to the switch (b1's own WAL) and timeline 2's four segments, at least.
    assert "segments, " in out and " read back)" in out, out


def test_the_abandoned_rest_of_timeline_1_is_not_needed(
    two_timelines: Path, tmp_path: Path
) -> None:
    store = copied(two_timelines, tmp_path)
    fork = Segment.parse(switch_segment(store))
    after = [n for n in segments(store, 1) if Segment.parse(n).number > fork.number]
    assert len(after) >= 2, "the source wrote WAL past the switch point"
    remove(store, after[0])  # a gap, but on the line recovery leaves at the switch
    code, out = verify(store)
    assert code == 0, out


def test_a_gap_on_timeline_2_is_named(two_timelines: Path, tmp_path: Path) -> None:
    store = copied(two_timelines, tmp_path)
    gone = segments(store, 2)[1]
    remove(store, gone)
    code, out = verify(store)
    assert code == INTEGRITY, out
    assert f"WAL gap on timeline 2: segment {gone} missing" in out, out


def test_a_missing_history_file_on_the_path_is_named(two_timelines: Path, tmp_path: Path) -> None:
    store = copied(two_timelines, tmp_path)
    for path in (store / "wal_archive").glob("00000002.history*"):
        path.unlink()
    code, out = verify(store)
    assert code == INTEGRITY, out
    assert "timeline 2 has WAL but no history file '00000002.history'" in out, out


def test_deep_reads_timeline_2_and_finds_a_damaged_segment_there(
    two_timelines: Path, tmp_path: Path
) -> None:
    store = copied(two_timelines, tmp_path)
    name = segments(store, 2)[-1]
    path = next(p for p in (store / "wal_archive").glob(f"{name}*") if ".backup" not in p.name)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    code, out = verify(store, "--deep")
    assert code == INTEGRITY, out
    assert f"archived WAL 'wal_archive/{path.name}'" in out, out
