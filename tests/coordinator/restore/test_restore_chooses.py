"""Restore without ``--name``: it picks the backup from the store's manifests (restore.choose).

The end-to-end test takes three backups of one archiving cluster with rows written between
them and checks that each target restores from the backup it should, by the rows the promoted
copy holds and the backup the log names. The choice itself is also tested on manifests alone.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from coordinator.restore.choose import choose_backup
from coordinator.restore.recovery import RecoveryTarget
from coordinator.restore.restoreconfig import default_restore_config
from devrig.launcher import postgres_cloud_dump
from devrig.postgres import PgCluster, PgFactory, make_postgres_dir
from devrig.recovery import archive_store, archiving_cluster, wait_archived, wait_promoted
from devrig.restored import chown_postgres, started
from devrig.roundtrip import backup_cli
from devrig.services import run_cli
from storage.errors import BackupNotFound, ConfigError
from storage.manifest import BackupManifest

from .test_pitr import server_clock, server_clock_after

# --- the choice, on manifests --------------------------------------------------------------------

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def manifest(name: str, hour: int, lsn: str, timeline: int = 1, sysid: str = "7") -> BackupManifest:
    end = T0 + timedelta(hours=hour)
    return BackupManifest.model_validate({
        "name": name, "tool_version": "t", "pg_version": "15", "pg_version_num": 150000,
        "system_identifier": sysid, "timeline": timeline, "start_lsn": "0/1000000",
        "end_lsn": lsn, "start_wal_file": "000000010000000000000001",
        "end_wal_file": "000000010000000000000001", "start_time": end - timedelta(minutes=5),
        "end_time": end, "compression": "zstd", "archives": [],
        "backup_manifest_key": f"{name}/backup_manifest", "backup_manifest_size": 1,
        "backup_manifest_sha256": "0" * 64,
    })  # fmt: skip


B1, B2, B3 = (
    manifest("b1", 1, "0/3000000"),
    manifest("b2", 2, "0/5000000"),
    manifest("b3", 3, "0/7000000"),
)


def at(hours: float) -> RecoveryTarget:
    instant = T0 + timedelta(hours=hours)
    return RecoveryTarget("recovery_target_time", str(instant), instant=instant)


def lsn(value: int) -> RecoveryTarget:
    return RecoveryTarget("recovery_target_lsn", f"0/{value:X}", lsn=value)


@pytest.mark.parametrize(
    ("target", "chosen"),
    [
        (None, "b3"),
        (RecoveryTarget("recovery_target", "immediate"), "b3"),
        (RecoveryTarget(None, None, "latest"), "b3"),
        (at(1), "b1"),  # exactly at b1's end: reachable
        (at(1.5), "b1"),
        (at(2.5), "b2"),
        (at(30), "b3"),
        (lsn(0x5000000), "b2"),
        (lsn(0x4FFFFFF), "b1"),
        (RecoveryTarget(None, None, "1"), "b3"),
    ],
)
def test_the_newest_backup_that_reaches_the_target(
    target: RecoveryTarget | None, chosen: str
) -> None:
    assert choose_backup(target, [B2, B1, B3], "here")[0].name == chosen


def test_a_numeric_timeline_excludes_backups_of_later_timelines() -> None:
    b4 = manifest("b4", 4, "0/9000000", timeline=2)
    assert choose_backup(RecoveryTarget(None, None, "1"), [B1, b4], "here")[0].name == "b1"
    with pytest.raises(ConfigError, match=r"timeline 1.*'b4'"):
        choose_backup(RecoveryTarget(None, None, "1"), [b4], "here")


def test_a_target_before_every_backup_is_refused_naming_the_oldest() -> None:
    with pytest.raises(ConfigError, match=r"no backup can reach target time.*'b1' ended"):
        choose_backup(at(0.5), [B3, B2, B1], "here")
    with pytest.raises(ConfigError, match=r"no backup can reach target LSN 0/2000000.*'b1'"):
        choose_backup(lsn(0x2000000), [B3, B1], "here")


@pytest.mark.parametrize("setting", ["recovery_target_xid", "recovery_target_name"])
def test_an_xid_or_restore_point_needs_a_name(setting: str) -> None:
    with pytest.raises(ConfigError, match="needs --name"):
        choose_backup(RecoveryTarget(setting, "1234"), [B1], "here")


def test_no_backup_at_all_is_not_found() -> None:
    with pytest.raises(BackupNotFound, match="none in 'store'"):
        choose_backup(None, [], "'store'")


def test_backups_of_two_clusters_are_not_mixed() -> None:
    with pytest.raises(ConfigError, match=r"2 different clusters.*--name"):
        choose_backup(None, [B1, manifest("x", 5, "0/9000000", sysid="8")], "here")


def test_equal_end_times_are_ordered_by_lsn() -> None:
    same_time = manifest("later-lsn", 1, "0/3000010")
    assert choose_backup(None, [same_time, B1], "here")[0].name == "later-lsn"


# --- end to end ----------------------------------------------------------------------------------


def restore_rows(
    env: dict[str, str], launcher: Path, major: int, *flags: str
) -> tuple[list[tuple[object, ...]], str]:
    """Restore with ``flags`` (no --name unless given), start and promote the copy: its rows by
    phase, and restore's stderr."""
    pgdata = make_postgres_dir("cloud-dump-choose-") / "data"
    done = run_cli("restore", "--pgdata", str(pgdata), *flags,
                   env={**env, "CLOUD_DUMP_EXECUTABLE": str(launcher)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    if default_restore_config(pgdata).exists():  # written for a restore with a target
        chown_postgres(default_restore_config(pgdata))
    with started(major, pgdata) as restored:
        wait_promoted(restored)
        rows = restored.sql("SELECT phase, count(*) FROM t GROUP BY phase ORDER BY phase")
    return rows, done.stderr


def test_restore_without_a_name_takes_the_backup_that_reaches_the_target(
    pg_factory: PgFactory,
) -> None:
    target = archive_store()
    launcher = postgres_cloud_dump()
    cluster: PgCluster = archiving_cluster(pg_factory, 15, target)
    cluster.sql("CREATE TABLE t (phase text)")
    backup_cli(cluster, target, "b1")
    cluster.sql("INSERT INTO t SELECT 'a' FROM generate_series(1, 10)")
    # Between b1's end and b2's: only b1 reaches it.
    after_a = server_clock_after(cluster, server_clock(cluster))
    server_clock_after(cluster, after_a)
    backup_cli(cluster, target, "b2")
    cluster.sql("INSERT INTO t SELECT 'b' FROM generate_series(1, 20)")
    after_b = str(cluster.sql("SELECT pg_current_wal_lsn()")[0][0])
    backup_cli(cluster, target, "b3")
    cluster.sql("INSERT INTO t SELECT 'c' FROM generate_series(1, 30)")
    wait_archived(cluster)

    rows, log = restore_rows(target.env, launcher, 15, "--recovery-target-time", str(after_a))
    assert rows == [("a", 10)] and "restoring backup 'b1'" in log, log
    rows, log = restore_rows(target.env, launcher, 15, "--recovery-target-lsn", after_b)
    assert rows == [("a", 10), ("b", 20)] and "restoring backup 'b2'" in log, log
    rows, log = restore_rows(target.env, launcher, 15)  # no target: the backup as it was
    assert rows == [("a", 10), ("b", 20)] and "restoring backup 'b3'" in log, log
    rows, log = restore_rows(target.env, launcher, 15, "--recovery-target", "latest")
    assert rows == [("a", 10), ("b", 20), ("c", 30)] and "restoring backup 'b3'" in log, log
    rows, log = restore_rows(target.env, launcher, 15, "--name", "latest",
                             "--recovery-target", "immediate")  # fmt: skip
    assert rows == [("a", 10), ("b", 20)] and "restoring backup 'b3'" in log, log

    # Before the oldest backup's end: refused before anything is written.
    pgdata = make_postgres_dir("cloud-dump-choose-") / "data"
    early = str(datetime(2000, 1, 1, tzinfo=UTC))
    done = run_cli("restore", "--pgdata", str(pgdata), "--recovery-target-time", early,
                   env=target.env)  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "no backup can reach" in done.stderr and "'b1'" in done.stderr
    assert not pgdata.exists() or not any(pgdata.iterdir())


@pytest.mark.parametrize("name", ["latest", "LATEST"])
def test_backup_refuses_the_reserved_name_latest(pg_factory: PgFactory, name: str) -> None:
    target = archive_store()
    cluster = pg_factory(15)
    done = run_cli("backup", "--name", name, "--db-url", cluster.replication_url(),
                   "--no-progress", env=target.env)  # fmt: skip
    assert done.returncode == 3 and "reserved" in done.stderr, done.stderr
