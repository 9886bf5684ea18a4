"""``cloud-dump expire`` on a history of backups across two timelines keeps exactly what the
policy says, and every kept backup still restores to every point of its window afterwards.

The history (PostgreSQL 15, every WAL file archived with ``cloud-dump wal-push``): backups a1, a2
and a3 on timeline 1, rows of phase X committed after backup X; then rows 'lost', the mistake,
over three segments. The source stops, and a point-in-time restore of a3 to before 'lost'
promotes onto timeline 2, archiving into the same archive (its history file and timeline 2's
WAL); on it, rows c0, backup c1, rows c1, backup c2, rows c2. a1 is pinned with ``keep``.

Each policy runs on its own copy of that archive: ``--retain 3`` (and a ``--recovery-window``
that means the same) keeps a3, c1 and c2, so a3's window crosses the fork; ``--retain 2`` keeps
c1 and c2 only, so timeline 1's WAL after the fork is needed by no kept backup.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import pytest

from coordinator.catalog import wal_file_name
from devrig.moto import StorageTarget
from devrig.postgres import PgCluster, PgFactory, make_postgres_dir
from devrig.recovery import (
    archive_store,
    archiving_cluster,
    restore,
    started_as_configured,
    wait_archived,
    wait_promoted,
)
from devrig.restored import RestoredCluster, started
from devrig.roundtrip import backup_cli
from devrig.services import run_cli
from storage.manifest import BackupManifest
from storage.options import StorageOptions
from storage.walnames import Segment, kind_of

ROWS = 3
BEFORE_FORK = {"a1": ROWS, "a2": ROWS, "a3": ROWS}  # rows by phase
TIMELINE_2 = {**BEFORE_FORK, "c0": ROWS, "c1": ROWS, "c2": ROWS}  # the end of timeline 2


@dataclass(frozen=True)
class History:
    store: Path  # the archive as the history left it, with a1 pinned: each policy copies it
    manifests: dict[str, BackupManifest]
    timeline_1_end: Segment  # the last segment timeline 1 archived


def insert(cluster: PgCluster | RestoredCluster, phase: str) -> None:
    cluster.sql(f"INSERT INTO t SELECT '{phase}' FROM generate_series(1, {ROWS})")


@pytest.fixture(scope="module")
def history(pg_factory: PgFactory) -> Iterator[History]:
    target = archive_store()
    source = archiving_cluster(pg_factory, 15, target)
    source.sql("CREATE TABLE t (phase text)")
    for name in ("a1", "a2", "a3"):
        backup_cli(source, target, name)
        insert(source, name)
        source.sql("SELECT pg_switch_wal()")
    before_lost = source.sql("SELECT clock_timestamp()")[0][0]
    for _ in range(3):
        insert(source, "lost")
        source.sql("SELECT pg_switch_wal()")
    wait_archived(source)
    source.stop()  # the operator recovers to before the mistake: the copy replaces the source

    pgdata, done = restore(target, "a3", "--recovery-target-time", before_lost.isoformat())
    assert done.returncode == 0, done.stderr
    with started_as_configured(15, pgdata, {"listen_addresses": "127.0.0.1"}) as copy:
        wait_promoted(copy)
        assert copy.sql("SELECT timeline_id FROM pg_control_checkpoint()") == [(2,)]
        url = (f"postgres://{source.repl_user}:{quote(source.repl_password, safe='')}"
               f"@127.0.0.1:{copy.port}/postgres?replication=yes")  # fmt: skip
        insert(copy, "c0")
        for name in ("c1", "c2"):
            done = run_cli("backup", "--name", name, "--db-url", url, "--part-size-mib", "5",
                           "--no-progress", env=target.env)  # fmt: skip
            assert done.returncode == 0, done.stderr
            insert(copy, name)
            copy.sql("SELECT pg_switch_wal()")
        wait_archived(copy)

    pinned = run_cli("keep", "a1", env=target.env)
    assert pinned.returncode == 0, pinned.stderr
    store = Path(target.url.removeprefix("file://"))
    manifests = {name: BackupManifest.from_json((store / name / "manifest.json").read_bytes(),
                                                name)
                 for name in ("a1", "a2", "a3", "c1", "c2")}  # fmt: skip
    assert {m.timeline for m in manifests.values()} == {1, 2}
    timeline_1 = [segment(n) for n in wal_names(store)
                  if kind_of(n) == "segment" and segment(n).timeline == 1]  # fmt: skip
    yield History(store, manifests, max(timeline_1))


def segment(name: str) -> Segment:
    return Segment.parse(name[:24])


def wal_names(store: Path) -> set[str]:
    """What the WAL archive holds: WAL file names without the stored suffixes, other objects
    (the archive's identity) by their own name."""
    return {wal_file_name(p.name) or p.name for p in (store / "wal_archive").iterdir()}


def backups_in(store: Path) -> set[str]:
    return {p.parent.name for p in store.glob("*/manifest.json")}


def own_wal(manifest: BackupManifest) -> range:
    """Segment numbers of a pinned backup's own WAL: its first to the one after its last."""
    return range(segment(manifest.start_wal_file).number,
                 segment(manifest.end_wal_file).number + 2)  # fmt: skip


def copy_of(history: History) -> StorageTarget:
    root = make_postgres_dir("cloud-dump-expire-tl-")
    # cp -a: the WAL stays the postgres user's, for the restored copies' wal-fetch.
    subprocess.run(["cp", "-a", f"{history.store}/.", str(root)], check=True)
    url = f"file://{root}"
    return StorageTarget("local", url, StorageOptions(), {"CLOUD_DUMP_STORAGE": url})


def rows(cluster: RestoredCluster) -> dict[str, int]:
    found = cluster.sql("SELECT phase, count(*) FROM t GROUP BY phase ORDER BY phase")
    return {str(phase): int(str(count)) for phase, count in found}


def restored_rows(target: StorageTarget, name: str, *flags: str) -> dict[str, int]:
    """Restore ``name`` with ``flags``, start it (no archiving) and wait until it is a primary;
    its rows by phase."""
    pgdata, done = restore(target, name, *flags)
    assert done.returncode == 0, done.stderr
    with started(15, pgdata) as copy:
        wait_promoted(copy)
        return rows(copy)


def expired(target: StorageTarget, *policy: str) -> str:
    done = run_cli("expire", *policy, env=target.env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def non_segments(names: set[str]) -> set[str]:
    """History files and the archive's identity: expire keeps them all."""
    return {n for n in names if kind_of(n) not in ("segment", "partial", "backup")}


# --- --retain 3: a3's window crosses the fork ----------------------------------------------


@pytest.fixture(scope="module")
def retain_3(history: History) -> StorageTarget:
    target = copy_of(history)
    store = Path(target.url.removeprefix("file://"))
    before = wal_names(store)
    # A window starting between a3's end and c1's: a3 is the newest backup that reaches it.
    a3_end, c1_end = (history.manifests[n].end_time for n in ("a3", "c1"))
    age = (datetime.now(UTC) - (a3_end + (c1_end - a3_end) / 2)).total_seconds()
    dry = expired(target, "--recovery-window", f"{age:.1f}s", "--dry-run")
    assert "(dry run) would remove backup 'a2'" in dry and "kept 3 backup(s): c2, c1, a3" in dry
    assert wal_names(store) == before and backups_in(store) == set(history.manifests)

    done = expired(target, "--retain", "3")
    assert "removed backup 'a2'" in done and "kept 3 backup(s): c2, c1, a3" in done, done
    assert "kept backup 'a1': pinned until released" in done
    return target


def test_retain_3_keeps_the_backups_a1s_wal_and_everything_from_a3_on(
    history: History, retain_3: StorageTarget
) -> None:
    store = Path(retain_3.url.removeprefix("file://"))
    before = wal_names(history.store)
    a1, a3 = own_wal(history.manifests["a1"]), segment(history.manifests["a3"].start_wal_file)

    def kept(name: str) -> bool:
        s = segment(name)
        return s.timeline == 2 or s.number in a1 or s.number >= a3.number

    expected = non_segments(before) | {n for n in before - non_segments(before) if kept(n)}
    assert backups_in(store) == {"a1", "a3", "c1", "c2"}
    assert wal_names(store) == expected
    assert {"00000002.history", "cloud-dump-archive.json"} <= expected
    assert before - expected, "the history left nothing between a1's WAL and a3's to expire"
    verified = run_cli("verify", env=retain_3.env)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_after_retain_3_a3_restores_to_its_end(retain_3: StorageTarget) -> None:
    assert restored_rows(retain_3, "a3", "--recovery-target", "immediate") == {
        "a1": ROWS,
        "a2": ROWS,
    }


def test_after_retain_3_a3_restores_through_the_fork_to_the_end_of_timeline_2(
    retain_3: StorageTarget,
) -> None:
    assert restored_rows(retain_3, "a3", "--recovery-target", "latest",
                         "--recovery-target-timeline", "2") == TIMELINE_2  # fmt: skip


def test_after_retain_3_a3_restores_to_the_end_of_its_own_timeline(
    retain_3: StorageTarget,
) -> None:
    assert restored_rows(
        retain_3, "a3", "--recovery-target", "latest", "--recovery-target-timeline", "current"
    ) == {**BEFORE_FORK, "lost": 3 * ROWS}


# --- --retain 2: nothing kept on timeline 1 but the pinned a1 ----------------------------------


@pytest.fixture(scope="module")
def retain_2(history: History) -> StorageTarget:
    target = copy_of(history)
    done = expired(target, "--retain", "2")
    assert "removed backup 'a2'" in done and "removed backup 'a3'" in done, done
    assert "kept 2 backup(s): c2, c1" in done and "kept backup 'a1': pinned" in done, done
    return target


def test_retain_2_keeps_a1s_wal_and_timeline_2s_from_c1_on(
    history: History, retain_2: StorageTarget
) -> None:
    store = Path(retain_2.url.removeprefix("file://"))
    before = wal_names(history.store)
    a1, c1 = own_wal(history.manifests["a1"]), segment(history.manifests["c1"].start_wal_file)
    # Timeline 1 went on after the fork, past c1's first segment: WAL no kept backup reads.
    assert history.timeline_1_end.number >= c1.number

    def kept(name: str) -> bool:
        s = segment(name)
        return s.number in a1 if s.timeline == 1 else s.number >= c1.number

    expected = non_segments(before) | {n for n in before - non_segments(before) if kept(n)}
    assert backups_in(store) == {"a1", "c1", "c2"}
    assert wal_names(store) == expected
    assert "00000002.history" in expected
    verified = run_cli("verify", env=retain_2.env)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.parametrize(
    ("name", "flags", "expected"),
    [
        ("c1", ["--recovery-target", "immediate"], {**BEFORE_FORK, "c0": ROWS}),
        ("c1", ["--recovery-target", "latest"], TIMELINE_2),
        ("c2", ["--recovery-target", "immediate"], {**BEFORE_FORK, "c0": ROWS, "c1": ROWS}),
        ("c2", ["--recovery-target", "latest"], TIMELINE_2),
    ],
    ids=["c1-end", "c1-latest", "c2-end", "c2-latest"],
)
def test_after_retain_2_each_kept_backup_restores_to_both_ends_of_its_window(
    retain_2: StorageTarget, name: str, flags: list[str], expected: dict[str, int]
) -> None:
    assert restored_rows(retain_2, name, *flags) == expected


def test_after_retain_2_the_pinned_a1_restores_on_its_own(retain_2: StorageTarget) -> None:
    pgdata, done = restore(retain_2, "a1")
    assert done.returncode == 0, done.stderr
    with started(15, pgdata) as copy:
        assert rows(copy) == {}
