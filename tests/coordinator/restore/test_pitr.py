"""Point-in-time recovery, end to end: archive_command = ``cloud-dump wal-push``, a base backup,
rows written in phases, then restores with ``--recovery-target-time``, ``-lsn`` and ``latest``
whose clusters replay WAL through ``cloud-dump wal-fetch`` and must reach promotion.

The servers run as the ``postgres`` OS user, so archive_command and restore_command must be a
cloud-dump that user can run: ``launcher`` provides one where the venv's own cannot be.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from coordinator.restore.restoreconfig import default_restore_config
from coordinator.wait import wait_until
from devrig.launcher import postgres_cloud_dump
from devrig.moto import MotoServer, StorageTarget, s3_target
from devrig.postgres import PgCluster, PgFactory, majors, make_postgres_dir
from devrig.recovery import (
    archive_command,
    archive_store,
    archiving_cluster,
    wait_archived,
    wait_promoted,
)
from devrig.restored import RestoredCluster, chown_postgres, started
from devrig.roundtrip import backup_cli
from devrig.services import run_cli

MAJORS = majors(default=(15, 17))


@pytest.fixture(scope="module")
def launcher() -> Path:
    """The cloud-dump the postgres OS user runs as archive_command and restore_command."""
    return postgres_cloud_dump()


@pytest.fixture(params=["local", "s3"])
def archive_target(request: pytest.FixtureRequest) -> StorageTarget:
    """A store both root (backup, restore) and the postgres user (wal-push/fetch) can reach."""
    if request.param == "local":
        return archive_store()
    server: MotoServer = request.getfixturevalue("moto_server")
    env: dict[str, str] = request.getfixturevalue("aws_env")
    return s3_target(server.endpoint, request.getfixturevalue("s3_bucket"), env)


def restore_into(target: StorageTarget, launcher: Path, name: str, *flags: str) -> Path:
    return restore_reporting(target, launcher, name, *flags)[0]


def restore_reporting(
    target: StorageTarget, launcher: Path, name: str, *flags: str
) -> tuple[Path, str]:
    """Restore ``name``: the data directory and what restore printed."""
    pgdata = make_postgres_dir("cloud-dump-pitr-restore-") / "data"
    done = run_cli("restore", "--name", name, "--pgdata", str(pgdata), *flags,
                   env={**target.env, "CLOUD_DUMP_EXECUTABLE": str(launcher)})
    assert done.returncode == 0, done.stderr
    chown_postgres(default_restore_config(pgdata))
    return pgdata, done.stdout


def restore_and_count(
    cluster: PgCluster, target: StorageTarget, launcher: Path, *flags: str
) -> list[tuple[object, ...]]:
    pgdata = restore_into(target, launcher, "base", *flags)
    with started(cluster.major, pgdata) as restored:
        wait_promoted(restored)
        return restored.sql("SELECT phase, count(*) FROM pitr GROUP BY phase ORDER BY phase")


def server_clock(cluster: PgCluster) -> datetime:
    value = cluster.sql("SELECT clock_timestamp()")[0][0]
    assert isinstance(value, datetime)
    return value


def server_clock_after(cluster: PgCluster, instant: datetime) -> datetime:
    """The server's clock, once it reads later than ``instant``."""

    def moved() -> datetime | None:
        now = server_clock(cluster)
        return now if now > instant else None

    later = wait_until(moved, timeout_s=10, first_s=0.001)
    assert later, f"the server's clock did not move past {instant}"
    return later


@pytest.fixture
def pitr_cluster(pg_factory: PgFactory, archive_target: StorageTarget,
                 request: pytest.FixtureRequest) -> Iterator[PgCluster]:
    major = request.param
    if archive_target.kind == "s3" and major != 15:
        pytest.skip("the storage side does not depend on the server version: s3 runs on 15")
    yield archiving_cluster(pg_factory, major, archive_target)


@pytest.mark.parametrize("pitr_cluster", MAJORS, indirect=True)
def test_point_in_time_recovery_through_wal_push_and_wal_fetch(
    pitr_cluster: PgCluster, archive_target: StorageTarget, launcher: Path
) -> None:
    cluster = pitr_cluster
    backup_cli(cluster, archive_target, "base")
    cluster.sql("CREATE TABLE pitr (id int, phase text)")
    cluster.sql("INSERT INTO pitr SELECT g, 'a' FROM generate_series(1, 100) g")
    # A target strictly between the commits of A and B: read after A committed, the server's
    # clock is at or past A's commit timestamp; B commits once it has moved past the target.
    committed_a = server_clock(cluster)
    target = server_clock_after(cluster, committed_a)
    server_clock_after(cluster, target)
    target_time = str(target)
    cluster.sql("INSERT INTO pitr SELECT g, 'b' FROM generate_series(1, 50) g")
    after_b = str(cluster.sql("SELECT pg_current_wal_lsn()")[0][0])
    cluster.sql("INSERT INTO pitr SELECT g, 'c' FROM generate_series(1, 25) g")
    wait_archived(cluster)

    assert restore_and_count(cluster, archive_target, launcher,
                             "--recovery-target-time", target_time) == [("a", 100)]
    assert restore_and_count(cluster, archive_target, launcher,
                             "--recovery-target-lsn", after_b) == [("a", 100), ("b", 50)]
    assert restore_and_count(cluster, archive_target, launcher,
                             "--recovery-target", "latest") == [("a", 100), ("b", 50), ("c", 25)]


@pytest.mark.parametrize("archive_target", ["local"], indirect=True)
def test_restore_after_restore_follows_the_new_timeline(
    pg_factory: PgFactory, archive_target: StorageTarget, launcher: Path
) -> None:
    """Promote a PITR copy (timeline 2, its .history archived), back it up, archive more, and
    restore that lineage to a point on the new timeline."""
    command = archive_command(archive_target)
    source = pg_factory(15, archive_command=command)
    backup_cli(source, archive_target, "base")
    source.sql("CREATE TABLE pitr (id int, phase text)")
    source.sql("INSERT INTO pitr SELECT g, 'a' FROM generate_series(1, 10) g")
    fork_lsn = str(source.sql("SELECT pg_current_wal_lsn()")[0][0])
    source.sql("INSERT INTO pitr SELECT g, 'b' FROM generate_series(1, 10) g")
    wait_archived(source)

    copy_data = restore_into(archive_target, launcher, "base", "--recovery-target-lsn", fork_lsn)
    with started(15, copy_data, settings={
        "listen_addresses": "127.0.0.1", "archive_mode": "on",
        "archive_command": command,
    }) as copy:
        wait_promoted(copy)
        assert copy.sql("SELECT timeline_id FROM pg_control_checkpoint()")[0][0] == 2
        copy.sql("INSERT INTO pitr SELECT g, 'c' FROM generate_series(1, 10) g")
        wait_archived(copy)
        history = [i.key for i in archive_target.open().list("wal_archive/00000002.history")]
        assert history, "the new timeline's history file was not archived"
        url = f"postgres://repl:{source.repl_password}@127.0.0.1:{copy.port}/postgres"
        done = run_cli("backup", "--name", "base2", "--no-progress",
                       env={**archive_target.env, "CLOUD_DUMP_DB_URL": url})
        assert done.returncode == 0, done.stderr
        copy.sql("INSERT INTO pitr SELECT g, 'd' FROM generate_series(1, 10) g")
        target_lsn = str(copy.sql("SELECT pg_current_wal_lsn()")[0][0])
        copy.sql("INSERT INTO pitr SELECT g, 'e' FROM generate_series(1, 10) g")
        wait_archived(copy)

    lineage = restore_into(archive_target, launcher, "base2", "--recovery-target-lsn", target_lsn)
    with started(15, lineage) as restored:
        wait_promoted(restored)
        rows = restored.sql("SELECT phase, count(*) FROM pitr GROUP BY phase ORDER BY phase")
        assert rows == [("a", 10), ("c", 10), ("d", 10)]
        assert restored.sql("SELECT timeline_id FROM pg_control_checkpoint()")[0][0] == 3


@pytest.mark.parametrize("archive_target", ["local"], indirect=True)
def test_a_backup_taken_before_archiving_began_replays_into_the_archive(
    pg_factory: PgFactory, archive_target: StorageTarget, launcher: Path
) -> None:
    """The backup's own WAL never reached the archive (archive_command stored nothing then);
    the archive begins after it. Recovery past the backup's end reads the backup's whole
    copies from pg_wal (wal-fetch answers 'not archived' for them, not 'a gap'), then the
    archive, and promotes with every row (it used to stop with exit 200 at the first one)."""
    cluster = pg_factory(15, archive_command="/bin/true")  # archive_mode on, nothing stored
    cluster.sql("CREATE TABLE pitr (id int, phase text)")
    cluster.sql("INSERT INTO pitr SELECT g, 'a' FROM generate_series(1, 100) g")
    backup_cli(cluster, archive_target, "base")
    wait_archived(cluster)  # by /bin/true: the backup's segments are done, and not stored
    command = archive_command(archive_target).replace("'", "''")
    cluster.sql(f"ALTER SYSTEM SET archive_command = '{command}'")
    cluster.sql("SELECT pg_reload_conf()")
    cluster.sql("INSERT INTO pitr SELECT g, 'b' FROM generate_series(1, 50) g")
    wait_archived(cluster)
    stored = sorted(i.key for i in archive_target.open().list("wal_archive/0000000"))
    backup_end = archive_target.open().get("base/manifest.json")
    assert stored, "nothing was archived after archive_command was set"

    assert restore_and_count(cluster, archive_target, launcher, "--recovery-target",
                             "latest") == [("a", 100), ("b", 50)], backup_end  # fmt: skip


@pytest.mark.parametrize("archive_target", ["local"], indirect=True)
def test_a_target_past_the_archived_wal_stops_the_copy_and_promotes_nothing(
    pg_factory: PgFactory, archive_target: StorageTarget, launcher: Path
) -> None:
    """A time or LSN the archive does not reach yet is restored as asked (the WAL may still
    come), restore's last line says what PostgreSQL will do, and PostgreSQL stops at the end
    of the archived WAL instead of promoting there with less than was asked for."""
    cluster = archiving_cluster(pg_factory, 15, archive_target)
    backup_cli(cluster, archive_target, "base")
    cluster.sql("CREATE TABLE pitr (id int, phase text)")
    cluster.sql("INSERT INTO pitr SELECT g, 'a' FROM generate_series(1, 10) g")
    wait_archived(cluster)
    now = server_clock(cluster)
    lsn = str(cluster.sql("SELECT pg_current_wal_lsn() + 1024 * 1024 * 1024")[0][0])

    for flags in (("--recovery-target-time", str(now + timedelta(hours=1))),
                  ("--recovery-target-lsn", lsn)):
        pgdata, stdout = restore_reporting(archive_target, launcher, "base", *flags)
        on_start = next(line for line in stdout.splitlines() if line.startswith("on start:"))
        assert "if the archived WAL ends before that target, PostgreSQL stops instead" in on_start
        log = start_until_it_stops(pgdata)
        assert "recovery ended before configured recovery target was reached" in log, log
        assert "selected new timeline ID" not in log, log


def start_until_it_stops(pgdata: Path) -> str:
    """Start a restored PostgreSQL 15 copy, wait until its postmaster has exited: its log."""
    copy = RestoredCluster(15, pgdata)
    pid_file = pgdata / "postmaster.pid"
    try:
        # pg_ctl -w may see the server accept connections before it stops, or not.
        with contextlib.suppress(AssertionError):
            copy.start()
        stopped = wait_until(lambda: not pid_file.exists(), timeout_s=120, first_s=0.1)
        log = copy.log_path.read_text()
    finally:
        copy.stop()
    assert stopped, f"the copy did not stop at the end of the archived WAL:\n{log}"
    return log
