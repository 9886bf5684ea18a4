"""Restore with a recovery target: the settings written for PostgreSQL, the restore config file
that keeps secrets out of postgresql.auto.conf, target validation, the WAL archive checked before
anything is written, and ``list``'s WAL ranges.

Backups are real (``cloud-dump backup`` of a PostgreSQL 15 cluster); WAL is archived here in
wal-push's format (``devrig.walarchive.archive_wal``), or only the archive's identity object
is written where a test needs an archive to exist. Full PITR cycles are in test_pitr.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.restore.restoreconfig import default_restore_config
from devrig.moto import StorageTarget, local_target
from devrig.postgres import PgCluster, make_postgres_dir
from devrig.roundtrip import backup_cli
from devrig.services import run_cli
from devrig.walarchive import archive_wal, segment_bytes
from storage.base import Storage
from storage.layout import WAL_ARCHIVE_INFO_NAME, Layout
from storage.manifest import BackupManifest
from storage.walnames import Segment

PASSPHRASE = "pitr-passphrase-6f1c"
AWS_SECRET = "aws-secret-value-93b7"
# After every backup the tests take (a target before a backup's end is refused).
TARGET_TIME = "2099-03-22 14:30:00+00"


def restore(target: StorageTarget, name: str, *extra: str,
            env: dict[str, str] | None = None) -> tuple[Path, subprocess.CompletedProcess[str]]:
    pgdata = make_postgres_dir("cloud-dump-pitr-") / "data"
    done = run_cli("restore", "--name", name, "--pgdata", str(pgdata), *extra,
                   env={**target.env, **(env or {})})
    return pgdata, done


def settings_of(pgdata: Path) -> dict[str, str]:
    """The last value of each setting in postgresql.auto.conf, unquoted as PostgreSQL does."""
    values = {}
    for line in (pgdata / "postgresql.auto.conf").read_text().splitlines():
        key, sep, value = line.partition(" = ")
        if sep and not line.startswith("#"):
            values[key] = value[1:-1].replace("''", "'").replace("\\\\", "\\")
    return values


def open_archive(store: Storage, manifest: BackupManifest, layout: Layout | None = None) -> None:
    """Make a WAL archive exist under ``layout`` as the first wal-push would: its identity."""
    from workers.wal import WalArchiveInfo

    info = WalArchiveInfo(system_identifier=manifest.system_identifier)
    store.put((layout or Layout()).wal_root + WAL_ARCHIVE_INFO_NAME,
              info.model_dump_json().encode())


def config_of(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(ln.split("=", 1) for ln in lines if "=" in ln and not ln.startswith("#"))


@pytest.fixture(scope="module")
def local_backup(pg15: PgCluster, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[StorageTarget, BackupManifest]]:
    """One backup in a local store, shared by the tests that only restore it."""
    target = local_target(tmp_path_factory.mktemp("pitr") / "store")
    backup_cli(pg15, target, "base")
    store = target.open()
    yield target, BackupManifest.from_json(store.get("base/manifest.json"), "base")
    store.close()


def test_restore_with_target_time_writes_recovery_settings_without_secrets(
    pg15: PgCluster, storage_target: StorageTarget
) -> None:
    backup_cli(pg15, storage_target, "pitr")
    store = storage_target.open()
    open_archive(store, BackupManifest.from_json(store.get("pitr/manifest.json"), "pitr"))
    store.close()
    env = {"CLOUD_DUMP_PASSPHRASE": PASSPHRASE}
    if storage_target.kind == "s3":
        env["AWS_SECRET_ACCESS_KEY"] = AWS_SECRET  # moto accepts any credentials
    pgdata, done = restore(storage_target, "pitr", "--recovery-target-time", TARGET_TIME,
                           env=env)
    assert done.returncode == 0, done.stderr

    settings = settings_of(pgdata)
    config = default_restore_config(pgdata)
    assert settings["restore_command"].endswith(f"wal-fetch %f %p --config {config}")
    assert settings["recovery_target_time"] == TARGET_TIME
    assert settings["recovery_target_inclusive"] == "on"
    assert settings["recovery_target_action"] == "promote"
    assert settings["recovery_target_lsn"] == ""  # any target left by the source is unset
    assert (pgdata / "recovery.signal").is_file()

    auto_conf = (pgdata / "postgresql.auto.conf").read_text()
    assert PASSPHRASE not in auto_conf and AWS_SECRET not in auto_conf
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    values = config_of(config)
    assert values["CLOUD_DUMP_STORAGE"] == f'"{storage_target.url}"'
    assert values["CLOUD_DUMP_PASSPHRASE"] == f'"{PASSPHRASE}"'
    if storage_target.kind == "s3":
        assert values["AWS_SECRET_ACCESS_KEY"] == f'"{AWS_SECRET}"'
        endpoint = storage_target.env["CLOUD_DUMP_S3_ENDPOINT"]
        assert values["CLOUD_DUMP_S3_ENDPOINT"] == f'"{endpoint}"'
    assert str(config) in done.stdout and "restore_command" in done.stdout


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--recovery-target-lsn", "7f/03000060", "--recovery-target-exclusive"],
         {"recovery_target_lsn": "7F/3000060", "recovery_target_inclusive": "off"}),
        (["--recovery-target-xid", "742"], {"recovery_target_xid": "742"}),
        (["--recovery-target-name", "before-upgrade"],
         {"recovery_target_name": "before-upgrade"}),
        (["--recovery-target", "immediate"], {"recovery_target": "immediate"}),
        (["--recovery-target", "immediate", "--archive-mode", "off"],
         {"recovery_target": "immediate", "archive_mode": "off"}),
        (["--recovery-target", "latest", "--recovery-target-timeline", "current"],
         {"recovery_target": "", "recovery_target_time": "",
          "recovery_target_timeline": "current"}),
    ],
    ids=["lsn-exclusive", "xid", "name", "immediate", "archive-off", "latest-timeline"],
)
def test_restore_writes_the_requested_target(
    local_backup: tuple[StorageTarget, BackupManifest], flags: list[str],
    expected: dict[str, str],
) -> None:
    target, manifest = local_backup
    store = target.open()
    open_archive(store, manifest)
    store.close()
    pgdata, done = restore(target, "base", *flags)
    assert done.returncode == 0, done.stderr
    settings = settings_of(pgdata)
    assert {k: settings.get(k) for k in expected} == expected
    assert settings["recovery_target_action"] == "promote"
    assert (pgdata / "recovery.signal").is_file()


def test_plain_restore_writes_no_recovery_settings(
    local_backup: tuple[StorageTarget, BackupManifest],
) -> None:
    target, _ = local_backup
    pgdata, done = restore(target, "base")
    assert done.returncode == 0, done.stderr
    assert not (pgdata / "recovery.signal").exists()
    assert "restore_command" not in settings_of(pgdata)
    assert not (default_restore_config(pgdata)).exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--recovery-target-lsn", "3000060"],
        ["--recovery-target-xid", "12a"],
        ["--recovery-target-time", "yesterday"],
        ["--recovery-target-name", "x" * 64],
        ["--recovery-target", "immediate", "--recovery-target-exclusive"],
        ["--recovery-target-timeline", "two"],
    ],
    ids=["lsn", "xid", "time", "name", "exclusive-immediate", "timeline"],
)
def test_invalid_target_is_refused_before_restoring(
    local_backup: tuple[StorageTarget, BackupManifest], flags: list[str]
) -> None:
    target, _ = local_backup
    pgdata, done = restore(target, "base", *flags)
    assert done.returncode == 3, done.stderr
    assert not pgdata.exists()


def test_restore_command_of_cluster_layout_fetches_from_the_cluster_prefix(
    pg15: PgCluster, tmp_path: Path
) -> None:
    target = local_target(tmp_path / "store")
    backup_cli(pg15, target, "base", "--cluster", "prod-pg15")
    name = "000000010000000000000042"
    store = target.open()
    archive_wal(store, Layout(cluster="prod-pg15"), name, segment_bytes(42))
    store.close()
    pgdata, done = restore(target, "base", "--cluster", "prod-pg15",
                           "--recovery-target", "latest", "--restore-config",
                           str(tmp_path / "it's 100% restore.conf"))
    assert done.returncode == 0, done.stderr
    config = config_of(tmp_path / "it's 100% restore.conf")
    assert config["CLOUD_DUMP_CLUSTER"] == '"prod-pg15"'

    # Run restore_command as PostgreSQL would: %f/%p substituted, through the shell, in PGDATA.
    command = settings_of(pgdata)["restore_command"]
    command = command.replace("%f", name).replace("%p", "pg_wal/RECOVERYXLOG")
    command = command.replace("%%", "%")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUD_DUMP_")}
    # PostgreSQL runs restore_command through the shell, so the quoting is tested that way.
    done = subprocess.run(command, shell=True, cwd=pgdata, env=env,  # noqa: S602
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == segment_bytes(42)


def test_list_shows_the_wal_range_after_each_backup(
    local_backup: tuple[StorageTarget, BackupManifest],
) -> None:
    target, manifest = local_backup
    list_json = json.loads(run_cli("list", "--json", env=target.env).stdout)
    assert list_json[0]["wal"] is None
    assert "no WAL archived" in run_cli("list", env=target.env).stdout

    first = Segment.parse(manifest.start_wal_file)
    names = [first.name()]
    for _ in range(3):
        first = first.next()
        names.append(first.name())
    store = target.open()
    for name in names:
        archive_wal(store, Layout(), name, segment_bytes(1), compression="none")
    archive_wal(store, Layout(), first.next().next().name(), segment_bytes(2))  # after a gap
    store.close()
    listed = run_cli("list", env=target.env)
    assert listed.returncode == 0, listed.stderr
    assert f"WAL {names[0]} .. {names[-1]} (4 segments)" in listed.stdout
    list_json = json.loads(run_cli("list", "--json", env=target.env).stdout)
    assert list_json[0]["wal"] == {"first": names[0], "last": names[-1], "segments": 4}


def test_target_restore_without_a_wal_archive_is_refused_before_writing(
    pg15: PgCluster, storage_target: StorageTarget
) -> None:
    """Item 3: recovery from a location where nothing was ever archived would promote at the
    end of the backup's own WAL; restore refuses it (exit 18) before writing anything."""
    backup_cli(pg15, storage_target, "no-archive")
    pgdata, done = restore(storage_target, "no-archive", "--recovery-target", "immediate")
    assert done.returncode == 18, done.stderr
    assert "no WAL archive at" in done.stderr and "wal_archive" in done.stderr
    assert not pgdata.exists()
    assert not (default_restore_config(pgdata)).exists()


def test_target_restore_with_the_archive_under_another_cluster_is_refused(
    pg15: PgCluster, tmp_path: Path
) -> None:
    """The backup is under --cluster prod, but archive_command pushed to the flat prefix."""
    target = local_target(tmp_path / "store")
    backup_cli(pg15, target, "base", "--cluster", "prod")
    store = target.open()
    archive_wal(store, Layout(), "000000010000000000000042", segment_bytes(42))
    store.close()
    pgdata = make_postgres_dir("cloud-dump-pitr-") / "data"
    pgdata.mkdir()  # an empty target directory stays empty
    done = run_cli("restore", "--name", "base", "--pgdata", str(pgdata), "--cluster", "prod",
                   "--recovery-target-time", TARGET_TIME, env=target.env)
    assert done.returncode == 18, done.stderr
    assert "prod/wal_archive" in done.stderr
    assert list(pgdata.iterdir()) == []
