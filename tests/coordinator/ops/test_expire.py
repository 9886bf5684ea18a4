"""``cloud-dump expire`` and ``delete``: the policy keeps what it says, the WAL a kept backup
needs stays, and every kept backup still restores and replays to the end of the archive."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from coordinator.ops.expire import plan_expiry
from coordinator.restore.restoreconfig import default_restore_config
from devrig.launcher import postgres_cloud_dump
from devrig.moto import StorageTarget
from devrig.postgres import PgFactory, make_postgres_dir
from devrig.recovery import archive_store, archiving_cluster, wait_archived, wait_promoted
from devrig.restored import chown_postgres, started
from devrig.services import run_cli
from storage.manifest import BackupManifest
from storage.walnames import is_segment
from tests.coordinator.restore.test_restore_chooses import manifest

# --- the policy, on manifests ------------------------------------------------------------------

NOW = datetime(2026, 3, 10, tzinfo=UTC)
B1, B2, B3 = (manifest(f"b{i}", 24 * i, f"0/{i}000000") for i in (1, 2, 3))  # days 1, 2, 3


def names(backups: list[BackupManifest]) -> list[str]:
    return [m.name for m in backups]


@pytest.mark.parametrize(
    ("retain", "kept"), [(1, ["b3"]), (2, ["b3", "b2"]), (9, ["b3", "b2", "b1"])]
)
def test_retain_keeps_the_newest(retain: int, kept: list[str]) -> None:
    assert names(plan_expiry([B1, B3, B2], retain, None, NOW)[0]) == kept


@pytest.mark.parametrize(
    ("window_days", "kept"),
    [  # b1, b2, b3 ended on March 2, 3 and 4; now is March 10
        (0, ["b3"]),  # the newest is always kept
        (6, ["b3"]),  # the window starts on March 4, when b3 ended: b3 reaches all of it
        (6.5, ["b3", "b2"]),  # starts on March 3.5: b2 is the newest that reaches it
        (7, ["b3", "b2"]),
        (7.5, ["b3", "b2", "b1"]),
        (30, ["b3", "b2", "b1"]),  # no backup reaches it: keep them all
    ],
)
def test_a_recovery_window_keeps_the_backup_that_reaches_its_start(
    window_days: float, kept: list[str]
) -> None:
    now = datetime(2026, 3, 4, tzinfo=UTC) + timedelta(days=6)
    window = timedelta(days=window_days)
    assert names(plan_expiry([B1, B2, B3], None, window, now)[0]) == kept


# --- end to end ---------------------------------------------------------------------------------


def restored_rows(env: dict[str, str], name: str) -> list[tuple[object, ...]]:
    pgdata = make_postgres_dir("cloud-dump-expire-") / "data"
    env = {**env, "CLOUD_DUMP_EXECUTABLE": str(postgres_cloud_dump())}
    done = run_cli("restore", "--name", name, "--pgdata", str(pgdata), "--recovery-target",
                   "latest", env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    chown_postgres(default_restore_config(pgdata))
    with started(15, pgdata) as copy:
        wait_promoted(copy)
        return copy.sql("SELECT phase, count(*) FROM t GROUP BY phase ORDER BY phase")


def three_backups(pg_factory: PgFactory) -> tuple[StorageTarget, Path]:
    """An archiving PG 15 with backups b1, b2, b3, ten rows of table t written after each
    (phase = the backup before them), every segment archived; its store, and the store's
    directory."""
    target = archive_store()
    cluster = archiving_cluster(pg_factory, 15, target)
    cluster.sql("CREATE TABLE t (phase text)")
    for phase in ("b1", "b2", "b3"):
        done = run_cli("backup", "--name", phase, "--db-url", cluster.replication_url(),
                       "--no-progress", env=target.env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        cluster.sql(f"INSERT INTO t SELECT '{phase}' FROM generate_series(1, 10)")
        cluster.sql("SELECT pg_switch_wal()")
    wait_archived(cluster)
    return target, Path(target.url.removeprefix("file://"))


def test_expire_keeps_what_the_policy_says_and_kept_backups_still_restore(
    pg_factory: PgFactory,
) -> None:
    target, store = three_backups(pg_factory)
    wal = store / "wal_archive"
    before = sorted(p.name for p in wal.iterdir())

    dry = run_cli("expire", "--retain", "2", "--dry-run", env=target.env)
    assert dry.returncode == 0, dry.stderr
    assert "(dry run) would remove backup 'b1'" in dry.stdout
    assert sorted(p.name for p in wal.iterdir()) == before and (store / "b1").exists()

    done = run_cli("expire", "--retain", "2", env=target.env)
    assert done.returncode == 0, done.stderr
    assert "removed backup 'b1'" in done.stdout and "kept 2 backup(s): b3, b2" in done.stdout
    assert not (store / "b1").exists() and (store / "b2" / "manifest.json").exists()
    b2_start = json.loads((store / "b2" / "manifest.json").read_text())["start_wal_file"]
    left = sorted(p.name for p in wal.iterdir())
    segments = [n[:24] for n in left if is_segment(n[:24])]
    assert segments and min(segments) == b2_start, left
    assert any(n.endswith(".history") or n == "cloud-dump-archive.json" for n in left)
    assert len(left) < len(before)

    # Everything kept still restores, and replays every archived row.
    expected = [("b1", 10), ("b2", 10), ("b3", 10)]
    assert restored_rows(target.env, "b2") == expected
    assert restored_rows(target.env, "b3") == expected
    verified = run_cli("verify", env=target.env)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    deleted = run_cli("delete", "--name", "b2", env=target.env)
    assert deleted.returncode == 0 and "removed backup 'b2'" in deleted.stdout, deleted.stderr
    gone = run_cli("restore", "--name", "b2", "--pgdata", str(make_postgres_dir("x") / "d"),
                   env=target.env)  # fmt: skip
    assert gone.returncode == int(ExitCode.BACKUP_NOT_FOUND), gone.stderr


def test_expire_needs_one_policy(tmp_path: Path) -> None:
    env = {"CLOUD_DUMP_STORAGE": f"file://{tmp_path}"}
    none = run_cli("expire", env=env)
    assert none.returncode == int(ExitCode.CONFIG) and "--retain" in none.stderr
    both = run_cli("expire", "--retain", "1", "--recovery-window", "1d", env=env)
    assert both.returncode == int(ExitCode.USAGE)
    zero = run_cli("expire", "--retain", "0", env=env)
    assert zero.returncode == int(ExitCode.CONFIG), zero.stderr


def test_a_pinned_backup_and_its_own_wal_survive_expire_until_released(
    pg_factory: PgFactory,
) -> None:
    target, store = three_backups(pg_factory)

    pinned = run_cli("keep", "b1", env=target.env)
    assert pinned.returncode == 0 and "pinned until released" in pinned.stdout, pinned.stderr
    listed = run_cli("list", env=target.env)
    assert "  kept until released" in listed.stdout.split("b1", 1)[1].split("b2")[0]
    as_json = json.loads(run_cli("list", "--json", env=target.env).stdout)
    assert {row["name"]: row["kept"] for row in as_json} == {
        "b1": "until released", "b2": None, "b3": None}
    refused = run_cli("delete", "--name", "b1", env=target.env)
    assert refused.returncode == int(ExitCode.CONFIG) and "--release" in refused.stderr

    done = run_cli("expire", "--retain", "1", env=target.env)
    assert done.returncode == 0, done.stderr
    assert "removed backup 'b2'" in done.stdout and "kept backup 'b1': pinned" in done.stdout
    assert (store / "b1" / "manifest.json").exists() and not (store / "b2").exists()
    # A backup carries the WAL that makes it consistent: the pinned one restores on its own,
    # as it was when it was taken (before any row was written).
    pgdata = make_postgres_dir("cloud-dump-expire-") / "data"
    restored = run_cli("restore", "--name", "b1", "--pgdata", str(pgdata), env=target.env)
    assert restored.returncode == 0, restored.stderr
    with started(15, pgdata) as copy:
        assert copy.sql("SELECT count(*) FROM t") == [(0,)]

    released = run_cli("keep", "b1", "--release", env=target.env)
    assert released.returncode == 0, released.stderr
    again = run_cli("expire", "--retain", "1", env=target.env)
    assert again.returncode == 0 and "removed backup 'b1'" in again.stdout, again.stderr
    assert restored_rows(target.env, "b3") == [("b1", 10), ("b2", 10), ("b3", 10)]


def test_a_pin_in_the_past_and_a_window_without_a_unit_are_refused(tmp_path: Path) -> None:
    env = {"CLOUD_DUMP_STORAGE": f"file://{tmp_path}"}
    past = run_cli("keep", "b1", "--until", "2017-01-31", env=env)
    assert past.returncode == int(ExitCode.CONFIG) and "in the past" in past.stderr, past.stderr
    bare = run_cli("expire", "--recovery-window", "14", env=env)
    assert bare.returncode == int(ExitCode.CONFIG), bare.stderr
    assert "--recovery-window '14' is not an age" in bare.stderr
