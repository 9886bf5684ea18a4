"""One store, two histories: a restored copy that archives and is backed up into its source's
store while the source goes on. Restore without ``--name`` and expire must not choose between
the lineages by age alone (exit 3, nothing downloaded or removed); named, they do as told.

The history (PostgreSQL 15, WAL archived with ``cloud-dump wal-push``): backup s1 of the
source; a point-in-time restore of s1 promotes onto timeline 2 (a copy, archiving into the same
store, as restore's default ``--archive-mode preserve`` leaves it); rows 'copy' and backup
'copybk' on the copy; meanwhile rows 'source' and backup s2 on the source's timeline 1, after
timeline 2 began.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from coordinator.cli.exitcodes import ExitCode
from coordinator.restore.restoreconfig import default_restore_config
from devrig.launcher import postgres_cloud_dump
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
from devrig.restored import chown_postgres, started
from devrig.roundtrip import backup_cli
from devrig.services import error_line, run_cli


@dataclass(frozen=True)
class Store:
    target: StorageTarget
    root: Path
    source: PgCluster
    later: str  # a time after every backup, before the source's last commit


@pytest.fixture(scope="module")
def store(pg_factory: PgFactory) -> Iterator[Store]:
    target = archive_store()
    source = archiving_cluster(pg_factory, 15, target)
    source.sql("CREATE TABLE t (phase text)")
    backup_cli(source, target, "s1")
    source.sql("INSERT INTO t VALUES ('s1')")
    fork = source.sql("SELECT clock_timestamp()")[0][0]
    source.sql("INSERT INTO t VALUES ('source')")  # a commit after the target: recovery stops
    wait_archived(source)

    pgdata, done = restore(target, "s1", "--recovery-target-time", fork.isoformat())
    assert done.returncode == 0, done.stderr
    with started_as_configured(15, pgdata, {"listen_addresses": "127.0.0.1"}) as copy:
        wait_promoted(copy)
        copy.sql("INSERT INTO t VALUES ('copy')")
        url = (f"postgres://{source.repl_user}:{quote(source.repl_password, safe='')}"
               f"@127.0.0.1:{copy.port}/postgres?replication=yes")  # fmt: skip
        done = run_cli("backup", "--name", "copybk", "--db-url", url, "--no-progress",
                       env=target.env)
        assert done.returncode == 0, done.stderr
        wait_archived(copy)
    # The source never stopped: its timeline 1 goes on past the segment timeline 2 began in.
    for _ in range(2):
        source.sql("INSERT INTO t VALUES ('source')")
        source.sql("SELECT pg_switch_wal()")
    backup_cli(source, target, "s2")
    later = source.sql("SELECT clock_timestamp()")[0][0].isoformat()
    source.sql("INSERT INTO t VALUES ('after')")  # a commit after the target: recovery stops
    wait_archived(source)
    yield Store(target, Path(target.url.removeprefix("file://")), source, later)


def backups(root: Path) -> set[str]:
    return {p.parent.name for p in root.glob("*/manifest.json")}


def test_restore_by_time_alone_refuses_to_pick_a_lineage(store: Store) -> None:
    pgdata, done = restore_unnamed(store, "--recovery-target-time", store.later)
    assert done.returncode == int(ExitCode.CONFIG), done.stderr
    line = error_line(done.stderr)
    assert "diverging histories" in line and "'s2'" in line and "'copybk'" in line
    assert "--recovery-target-timeline 1 or 2" in line
    assert not pgdata.exists() or not any(pgdata.iterdir())  # nothing downloaded
    # Without a target too: "the newest backup" is either lineage's.
    _, latest = restore_unnamed(store)
    assert latest.returncode == int(ExitCode.CONFIG), latest.stderr
    assert "diverging histories" in error_line(latest.stderr)


def test_a_numeric_target_timeline_chooses_the_lineage(store: Store) -> None:
    pgdata, done = restore_unnamed(store, "--recovery-target-time", store.later,
                                   "--recovery-target-timeline", "1", "--archive-mode", "off")
    assert done.returncode == 0, done.stderr
    assert "restoring backup 's2'" in done.stderr
    with started(15, pgdata) as copy:
        wait_promoted(copy)
        found = copy.sql("SELECT phase, count(*) FROM t GROUP BY phase ORDER BY phase")
    assert found == [("s1", 1), ("source", 3)]


def test_expire_refuses_until_one_history_is_left(store: Store) -> None:
    before = backups(store.root)
    wal_before = sorted(p.name for p in (store.root / "wal_archive").iterdir())
    done = run_cli("expire", "--retain", "1", env=store.target.env)
    assert done.returncode == int(ExitCode.CONFIG), done.stderr
    line = error_line(done.stderr)
    assert "will not choose between histories" in line and "'s2'" in line
    assert "'copybk'" in line
    assert backups(store.root) == before == {"s1", "s2", "copybk"}
    assert sorted(p.name for p in (store.root / "wal_archive").iterdir()) == wal_before

    deleted = run_cli("delete", "--name", "copybk", env=store.target.env)
    assert deleted.returncode == 0, deleted.stderr
    done = run_cli("expire", "--retain", "1", env=store.target.env)
    assert done.returncode == 0, done.stderr
    assert backups(store.root) == {"s2"}


def restore_unnamed(store: Store, *flags: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """``cloud-dump restore`` without ``--name`` into a new directory."""
    pgdata = make_postgres_dir("cloud-dump-diverging-") / "data"
    done = run_cli("restore", "--pgdata", str(pgdata), *flags,
                   env={**store.target.env, "CLOUD_DUMP_EXECUTABLE": str(postgres_cloud_dump())})
    config = default_restore_config(pgdata)
    if config.exists():  # restore_command runs as postgres and reads it
        chown_postgres(config)
    return pgdata, done


def test_a_copy_continuing_its_sources_timeline_is_not_backed_up_beside_it(
    pg_factory: PgFactory,
) -> None:
    target = archive_store()
    source = archiving_cluster(pg_factory, 15, target)
    backup_cli(source, target, "p1")
    for _ in range(3):  # the source's timeline 1 goes on in the archive
        source.sql("SELECT txid_current()")
        source.sql("SELECT pg_switch_wal()")
    wait_archived(source)
    # A plain restore of p1, started: it continues timeline 1 from p1's end.
    pgdata, done = restore(target, "p1", "--archive-mode", "off")
    assert done.returncode == 0, done.stderr
    with started_as_configured(15, pgdata, {"listen_addresses": "127.0.0.1"}) as copy:
        url = (f"postgres://{source.repl_user}:{quote(source.repl_password, safe='')}"
               f"@127.0.0.1:{copy.port}/postgres?replication=yes")  # fmt: skip
        refused = run_cli("backup", "--name", "plaincopy", "--db-url", url, "--no-progress",
                          env=target.env)
        assert refused.returncode == int(ExitCode.WAL_CONFLICT), refused.stderr
        line = error_line(refused.stderr)
        assert "another server writes timeline 1 there" in line
        assert not (Path(target.url.removeprefix("file://")) / "plaincopy").exists()
        # Under its own cluster the copy is backed up as any other server.
        own = run_cli("backup", "--name", "plaincopy", "--cluster", "copy", "--db-url", url,
                      "--no-progress", env=target.env)
        assert own.returncode == 0, own.stderr
