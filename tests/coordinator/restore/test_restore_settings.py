"""What a restored copy does when started: settings earlier restores left, standby backups,
archiving, and the sentences restore ends with (issue 9 items 6, 7, 2, 15).

The lineage (PostgreSQL 15): a source archiving with ``cloud-dump wal-push``, its backup "base",
a copy restored from it to a target time, promoted and archiving on timeline 2, and three
backups of that copy whose postgresql.auto.conf carries the first restore's settings: "base2"
as this version marks them, "base3" as older versions did (one header line), "base4" after an
ALTER SYSTEM on the copy rewrote the file without any comment. The copy keeps running as the
primary later copies follow.

Sibling copies (T.md bug 3): two copies restored with a target side by side, from two stores,
each with its own restore config file, which no other restore replaces.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.restore.restoreconfig import default_restore_config
from coordinator.wait import wait_until
from devrig.launcher import postgres_cloud_dump
from devrig.moto import StorageTarget, local_target
from devrig.pgbin import bin_dir
from devrig.postgres import PgCluster, PgFactory, as_postgres, make_postgres_dir
from devrig.procs import free_port, log_tail
from devrig.recovery import (
    active_settings,
    archive_command,
    archive_store,
    restore,
    started_as_configured,
    wait_archived,
    wait_promoted,
)
from devrig.restored import RestoredCluster, chown_postgres, started
from devrig.roundtrip import backup_cli
from devrig.services import run_cli
from storage.layout import WAL_ARCHIVE_INFO_NAME, Layout
from workers.wal import WalArchiveInfo

FOLLOW_TIMEOUT_S = 30
# How this version marks the settings it writes in postgresql.auto.conf, and how older ones did.
BLOCK_BEGIN = "# BEGIN cloud-dump restore settings"
BLOCK_END = "# END cloud-dump restore settings"
OLD_BLOCK_HEADER = "# point-in-time recovery, written by cloud-dump restore"


@dataclass(frozen=True)
class Lineage:
    store: StorageTarget
    source: PgCluster
    copy: RestoredCluster
    first_config: Path  # the first restore's restore config file


def _backup_of(cluster: RestoredCluster, password: str, store: StorageTarget, name: str) -> None:
    url = f"postgres://repl:{password}@127.0.0.1:{cluster.port}/postgres"
    done = run_cli("backup", "--name", name, "--no-progress", "--part-size-mib", "5",
                   env={**store.env, "CLOUD_DUMP_DB_URL": url})
    assert done.returncode == 0, done.stderr


def _as_older_version_wrote_it(auto_conf: Path) -> None:
    """The marked block rewritten as cloud-dump wrote it before: one header, no end line."""
    lines = []
    for line in auto_conf.read_text().splitlines():
        if line.startswith(BLOCK_BEGIN):
            line = OLD_BLOCK_HEADER
        if line != BLOCK_END:
            lines.append(line)
    auto_conf.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def lineage(pg_factory: PgFactory) -> Iterator[Lineage]:
    store = archive_store()
    command = archive_command(store)
    source = pg_factory(15, archive_command=command)
    source.sql("CREATE TABLE t (id int, phase text)")
    _backup_without_postgresql_conf(source, store)
    backup_cli(source, store, "base")
    source.sql("INSERT INTO t SELECT g, 'a' FROM generate_series(1, 10) g")
    target = source.sql("SELECT clock_timestamp()")[0][0].isoformat()
    source.sql("INSERT INTO t SELECT g, 'b' FROM generate_series(1, 10) g")
    wait_archived(source)

    pgdata, done = restore(store, "base", "--recovery-target-time", target)
    assert done.returncode == 0, done.stderr
    copy = RestoredCluster(15, pgdata)
    # wal_keep_size: the later standbys stream from the copy, with nothing else to catch up from.
    copy.start(settings={"listen_addresses": "127.0.0.1", "archive_mode": "on",
                         "archive_command": command, "wal_keep_size": "256MB"})
    try:
        wait_promoted(copy)
        _backup_of(copy, source.repl_password, store, "base2")
        _as_older_version_wrote_it(pgdata / "postgresql.auto.conf")
        _backup_of(copy, source.repl_password, store, "base3")
        # ALTER SYSTEM rewrites the file: no comment survives. recovery_end_command is an
        # operator's recovery setting, which restores keep (and report).
        copy.sql("ALTER SYSTEM SET recovery_end_command = 'true'")
        _backup_of(copy, source.repl_password, store, "base4")
        yield Lineage(store, source, copy, default_restore_config(pgdata))
    finally:
        copy.stop()


def _backup_without_postgresql_conf(source: PgCluster, store: StorageTarget) -> None:
    """Backup "no-conf": a data directory whose main configuration lives elsewhere (Debian)."""
    conf = source.datadir / "postgresql.conf"
    aside = source.base_dir / "postgresql.conf.aside"
    conf.rename(aside)
    try:
        backup_cli(source, store, "no-conf")
    finally:
        aside.rename(conf)


# --- item 6: settings left by an earlier restore -----------------------------------------------


@pytest.mark.parametrize("backup", ["base2", "base3", "base4"],
                         ids=["marked", "older-version", "after-alter-system"])
def test_plain_copy_made_a_standby_of_the_copy_stays_a_standby_and_follows_it(
    lineage: Lineage, backup: str
) -> None:
    pgdata, done = restore(lineage.store, backup)
    assert done.returncode == 0, done.stderr
    active = active_settings(pgdata)
    assert "restore_command" not in active and "recovery_target_time" not in active, active
    (pgdata / "standby.signal").touch()
    with (pgdata / "postgresql.auto.conf").open("a") as conf:
        conf.write(f"primary_conninfo = 'host=127.0.0.1 port={lineage.copy.port} user=repl "
                   f"password={lineage.source.repl_password}'\n")
    with started(15, pgdata) as standby:
        phase = uuid.uuid4().hex[:8]
        lineage.copy.sql(f"INSERT INTO t SELECT g, '{phase}' FROM generate_series(1, 7) g")

        def followed() -> bool:
            assert standby.sql("SELECT pg_is_in_recovery()")[0][0], (
                "the standby promoted itself: a second primary\n" + log_tail(standby.log_path))
            return bool(standby.sql(f"SELECT count(*) FROM t WHERE phase = '{phase}'")[0][0] == 7)

        assert wait_until(followed, timeout_s=FOLLOW_TIMEOUT_S, first_s=0.2), (
            "the standby does not follow the copy\n" + log_tail(standby.log_path))


def test_second_pitr_restore_comments_out_the_first_restores_settings(lineage: Lineage) -> None:
    lineage.copy.sql("INSERT INTO t SELECT g, 'e' FROM generate_series(1, 5) g")
    lsn = str(lineage.copy.sql("SELECT pg_current_wal_lsn()")[0][0])
    wait_archived(lineage.copy)
    pgdata, done = restore(lineage.store, "base2", "--recovery-target-lsn", lsn)
    assert done.returncode == 0, done.stderr

    text = (pgdata / "postgresql.auto.conf").read_text()
    disabled = [ln for ln in text.splitlines()
                if ln.startswith("# disabled by cloud-dump restore of backup 'base2'")]
    assert any("written by cloud-dump restore of backup 'base', restored" in ln
               and "recovery_target_time = '" in ln for ln in disabled), text
    active = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    assert not any(str(lineage.first_config) in ln for ln in active), text
    assert active_settings(pgdata)["recovery_target_time"] == ""
    assert "commented out in postgresql.auto.conf" in done.stdout
    assert f"up to recovery_target_lsn = '{lsn}'" in done.stdout
    # A new timeline: no collision, but the branch it would push into the archive is warned.
    assert "continues timeline" not in done.stderr
    assert ("the copy promotes to a new timeline and archives with cloud-dump wal-push into the "
            "archive it was restored from") in done.stderr
    assert "for a test copy, restore with --archive-mode off" in done.stderr
    assert "on timeline 2, the backup's own" in done.stdout
    with started(15, pgdata) as restored:
        wait_promoted(restored)
        assert ("e", 5) in restored.sql("SELECT phase, count(*) FROM t GROUP BY phase")


def test_plain_restore_after_an_older_versions_pitr_opens_as_a_primary(lineage: Lineage) -> None:
    pgdata, done = restore(lineage.store, "base3")
    assert done.returncode == 0, done.stderr
    text = (pgdata / "postgresql.auto.conf").read_text()
    assert OLD_BLOCK_HEADER not in text
    assert "(written by an earlier cloud-dump restore): restore_command = '" in text
    assert active_settings(pgdata).keys().isdisjoint(
        {"restore_command", "recovery_target_time", "recovery_target_action"})
    assert "opens as a primary on timeline 2, the source's timeline" in done.stdout
    with started(15, pgdata) as restored:
        assert restored.sql("SELECT pg_is_in_recovery()")[0][0] is False
        assert restored.sql("SHOW recovery_target_time") == [("",)]
        assert restored.sql("SHOW restore_command") == [("",)]


def test_operators_recovery_setting_is_kept_and_reported(lineage: Lineage) -> None:
    pgdata, done = restore(lineage.store, "base4", "--recovery-target", "immediate")
    assert done.returncode == 0, done.stderr
    assert active_settings(pgdata)["recovery_end_command"] == "true"
    assert ("recovery_end_command = 'true' is set in " f"{pgdata}/postgresql.auto.conf, not by "
            "cloud-dump restore: it applies during this restore's recovery") in done.stderr


def test_timeline_below_the_backups_is_refused_naming_an_earlier_backup(lineage: Lineage) -> None:
    pgdata, done = restore(lineage.store, "base2", "--recovery-target", "latest",
                           "--recovery-target-timeline", "1")
    assert done.returncode == 3, done.stderr
    assert "timeline 1 is lower than the timeline of backup 'base2' (2)" in done.stderr
    assert "backup 'base'" in done.stderr
    assert not pgdata.exists()


# --- item 2: --archive-mode, and what restore says about archiving ------------------------------


def test_archive_mode_off_copy_archives_nothing(lineage: Lineage) -> None:
    pgdata, done = restore(lineage.store, "base", "--archive-mode", "off")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == (
        "archiving: off: this restore wrote archive_mode = 'off' (--archive-mode off), so the "
        "copy archives nothing")
    assert "--archive-mode off" not in done.stderr
    # Started with its own configuration: postgresql.conf says archive_mode = on.
    with started_as_configured(15, pgdata) as copy:
        assert copy.sql("SHOW archive_mode") == [("off",)]
        copy.sql("CREATE TABLE churn AS SELECT g FROM generate_series(1, 10000) g")
        copy.sql("SELECT pg_switch_wal()")
        copy.sql("CHECKPOINT")
        assert copy.sql("SELECT archived_count, failed_count FROM pg_stat_archiver") == [(0, 0)]
        assert not list((pgdata / "pg_wal" / "archive_status").glob("*.ready"))


def test_preserve_says_the_copy_archives_into_its_source_archive_and_warns(
    lineage: Lineage
) -> None:
    pgdata, done = restore(lineage.store, "base")
    assert done.returncode == 0, done.stderr
    last = done.stdout.splitlines()[-1]
    assert last.startswith(f"archiving: on (archive_mode = 'on' in {pgdata}/postgresql.conf): "
                           "archive_command '")
    assert last.endswith(f" into {lineage.store.url}/wal_archive")
    assert "continues timeline 1 of its source" in done.stderr
    assert "restore with --archive-mode off" in done.stderr


def test_restore_says_what_it_could_not_see(lineage: Lineage) -> None:
    _, done = restore(lineage.store, "no-conf")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith(
        "archiving: not known: PGDATA has no postgresql.conf")


# --- item 7: a standby's backup -------------------------------------------------------------------


@dataclass(frozen=True)
class StandbyBackup:
    store: StorageTarget
    primary: PgCluster


@pytest.fixture(scope="module")
def standby_backup(pg_factory: PgFactory) -> Iterator[StandbyBackup]:
    """Backup "from-standby" of a streaming standby (pg_basebackup -R) of an archiving primary."""
    store = archive_store()
    primary = pg_factory(15, archive_command=archive_command(store))
    primary.sql("CREATE TABLE t (id int, phase text)")
    primary.sql("INSERT INTO t SELECT g, 'a' FROM generate_series(1, 10) g")
    base = make_postgres_dir("cloud-dump-standby-")
    datadir, port = base / "data", free_port()
    conninfo = (f"host=127.0.0.1 port={primary.port} user=repl "
                f"password={primary.repl_password}")
    subprocess.run(as_postgres([str(bin_dir(15) / "pg_basebackup"), "-D", str(datadir), "-R",
                                "-X", "stream", "-c", "fast", "-d", conninfo]),
                   cwd=base, check=True, capture_output=True)
    pg_ctl = [str(bin_dir(15) / "pg_ctl"), "-D", str(datadir)]
    subprocess.run(as_postgres([*pg_ctl, "start", "-w", "-l", str(base / "server.log"), "-o",
                                f"-p {port} -k {base} -c archive_mode=off"]),
                   cwd=base, check=True, capture_output=True)
    try:
        url = f"postgres://repl:{primary.repl_password}@127.0.0.1:{port}/postgres"
        done = run_cli("backup", "--name", "from-standby", "--no-progress",
                       env={**store.env, "CLOUD_DUMP_DB_URL": url})
        assert done.returncode == 0, done.stderr
    finally:
        subprocess.run(as_postgres([*pg_ctl, "stop", "-m", "fast", "-w"]), cwd=base,
                       check=False, capture_output=True)
    primary.sql("INSERT INTO t SELECT g, 'b' FROM generate_series(1, 20) g")
    wait_archived(primary)
    yield StandbyBackup(store, primary)


def test_target_restore_of_a_standbys_backup_removes_standby_signal_and_promotes(
    standby_backup: StandbyBackup,
) -> None:
    pgdata, done = restore(standby_backup.store, "from-standby", "--recovery-target", "latest")
    assert done.returncode == 0, done.stderr
    assert (pgdata / "recovery.signal").exists()
    with started(15, pgdata) as restored:
        wait_promoted(restored)  # with standby.signal left in place it never would
        assert restored.sql("SELECT phase, count(*) FROM t GROUP BY phase ORDER BY phase") == [
            ("a", 10), ("b", 20)]
    assert "removed the standby.signal that came with the backup" in done.stdout


def test_plain_restore_of_a_standbys_backup_says_it_starts_as_a_standby(
    standby_backup: StandbyBackup,
) -> None:
    primary = standby_backup.primary
    pgdata, done = restore(standby_backup.store, "from-standby")
    assert done.returncode == 0, done.stderr
    on_start = next(ln for ln in done.stdout.splitlines() if ln.startswith("on start:"))
    assert on_start.startswith(
        "on start: the copy starts as a standby (the backup was taken from a standby and "
        "carries standby.signal): it streams from primary_conninfo '"), on_start
    assert f"host=127.0.0.1 port={primary.port}" in on_start and "password=***" in on_start
    assert done.stdout.splitlines()[-1].startswith(
        "archiving: none while it is a standby (archive_mode = 'on' in ")
    assert "--archive-mode off" not in done.stderr
    assert primary.repl_password not in done.stdout + done.stderr
    with started(15, pgdata) as copy:
        primary.sql("INSERT INTO t SELECT g, 'c' FROM generate_series(1, 3) g")

        def streamed() -> bool:
            if copy.sql("SELECT count(*) FROM t WHERE phase = 'c'")[0][0] == 3:
                return True
            assert copy.sql("SELECT pg_is_in_recovery()")[0][0]
            return False

        assert wait_until(streamed, timeout_s=FOLLOW_TIMEOUT_S, first_s=0.2), (
            "the copy does not stream from the primary")


def test_standby_without_a_source_of_wal_is_said_to_wait_forever(tmp_path: Path) -> None:
    """The sentence for a standby.signal with neither primary_conninfo nor restore_command."""
    from coordinator.restore.pgconf import ConfigView, Setting
    from coordinator.restore.report import _standby, hide_password

    view = ConfigView({"archive_mode": Setting("on", tmp_path / "postgresql.conf")})
    assert "it will wait for WAL forever" in _standby(view)
    assert hide_password("host=h port=5 user=u password=secret") == (
        "host=h port=5 user=u password=***")


# --- item 15: what restore prints -----------------------------------------------------------------


def test_restore_prints_sentences_about_what_it_did(pg_factory: PgFactory) -> None:
    cluster = pg_factory(15)
    location = make_postgres_dir("cloud-dump-ts-")
    cluster.sql(f"CREATE TABLESPACE ts LOCATION '{location}'")
    cluster.sql("CREATE TABLE in_ts TABLESPACE ts AS SELECT g FROM generate_series(1, 1000) g")
    oid = cluster.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts'")[0][0]
    store = local_target(make_postgres_dir("cloud-dump-text-store-"))
    backup_cli(cluster, store, "text")
    new_location = make_postgres_dir("cloud-dump-ts-new-")
    pgdata, done = restore(store, "text", "--tablespace-mapping", f"{location}={new_location}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "RestoreSummary" not in done.stdout
    assert re.fullmatch(rf"restored backup 'text' \(PostgreSQL 15\.\d+[^,]*, timeline 1, ended "
                        rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC\) into {pgdata}", lines[0])
    assert lines[1] == f"  tablespace {oid} into {new_location}"
    assert re.fullmatch(r"fetched \d+(\.\d)? (B|KiB|MiB), wrote \d+\.\d MiB; [\d,]+ files "
                        r"verified against backup_manifest; \d+\.\d s", lines[2]), lines[2]
    assert re.fullmatch(r"on start: the copy recovers to the backup's end with the WAL inside "
                        r"the backup \(0{7}1[0-9A-F]{16} \.\. 0{7}1[0-9A-F]{16}\), then opens "
                        r"as a primary on timeline 1, the source's timeline", lines[3]), lines[3]
    assert lines[4] == "archiving: off (archive_mode is not set in PGDATA's configuration)"
    assert len(lines) == 5


def test_plain_restore_removes_a_recovery_signal_that_came_with_the_backup(tmp_path: Path) -> None:
    """A backup taken from a server in archive recovery carries recovery.signal; a plain restore
    starts with crash recovery. (On a directory: no server in archive recovery is needed to see
    what the step does with the file.)"""
    from datetime import UTC, datetime

    from coordinator.restore.recoveryconf import SettingsRequest, apply_settings

    (tmp_path / "recovery.signal").touch()
    (tmp_path / "postgresql.auto.conf").write_text("recovery_target_name = 'x'\n")
    outcome = apply_settings(tmp_path, SettingsRequest("b", None, None, "preserve",
                                                       datetime.now(UTC)))
    assert not (tmp_path / "recovery.signal").exists()
    assert outcome.signal_notes == ["removed the recovery.signal that came with the backup: a "
                                    "plain restore starts with crash recovery, not archive "
                                    "recovery"]
    assert (tmp_path / "postgresql.auto.conf").read_text().startswith(
        "# disabled by cloud-dump restore of backup 'b' on ")


# --- one restore config per copy (T.md bug 3) -----------------------------------------------------


@dataclass(frozen=True)
class Siblings:
    """Copies q1 (from store "a") and q2 (from store "b", a copy of "a") in one directory, both
    restored with a target; then b's WAL archive was removed: a restore_command reading b's
    settings stops recovery (exit 200)."""

    parent: Path
    a: StorageTarget
    b: StorageTarget
    outputs: tuple[subprocess.CompletedProcess[str], ...]


def _restore_copy(store: StorageTarget, pgdata: Path, *flags: str
                  ) -> subprocess.CompletedProcess[str]:
    """Restore "base" with a target into ``pgdata``; restore (run as root) gives what it writes
    to the owner of the postgres-owned parent."""
    return run_cli("restore", "--name", "base", "--pgdata", str(pgdata),
                   "--recovery-target", "latest", *flags,
                   env={**store.env, "CLOUD_DUMP_EXECUTABLE": str(postgres_cloud_dump())})


def _storage_in(config: Path) -> str:
    return next(line.split("=", 1)[1].strip('"') for line in config.read_text().splitlines()
                if line.startswith("CLOUD_DUMP_STORAGE="))


@pytest.fixture(scope="module")
def siblings(pg15: PgCluster) -> Siblings:
    stores = make_postgres_dir("cloud-dump-sibling-stores-")
    a = local_target(stores / "a")
    backup_cli(pg15, a, "base")
    info = WalArchiveInfo(system_identifier=str(pg15.system_identifier()))
    store = a.open()
    store.put(Layout().wal_root + WAL_ARCHIVE_INFO_NAME, info.model_dump_json().encode())
    store.close()
    shutil.copytree(stores / "a", stores / "b")
    b = local_target(stores / "b")
    chown_postgres(stores)  # wal-fetch runs as the server's user
    parent = make_postgres_dir("cloud-dump-r2-")
    outputs = (_restore_copy(a, parent / "q1"), _restore_copy(b, parent / "q2"))
    shutil.rmtree(stores / "b" / "wal_archive")
    return Siblings(parent, a, b, outputs)


def test_sibling_copies_each_have_their_own_restore_config_and_recover_from_their_store(
    siblings: Siblings,
) -> None:
    for done in siblings.outputs:
        assert done.returncode == 0, done.stderr
    q1 = siblings.parent / "q1"
    with started(15, q1) as copy:  # its restore_command must still read store "a"
        wait_promoted(copy)
    first, second = (siblings.parent / f"{q}.cloud-dump-restore.conf" for q in ("q1", "q2"))
    assert _storage_in(first) == siblings.a.url and _storage_in(second) == siblings.b.url
    assert f"# serves PGDATA: {q1}\n" in first.read_text()
    assert f"--config {first}" in active_settings(q1)["restore_command"]
    assert not (siblings.parent / "cloud-dump-restore.conf").exists()


def test_restore_config_serving_another_copy_is_never_replaced(siblings: Siblings) -> None:
    first = siblings.parent / "q1.cloud-dump-restore.conf"
    before = first.read_bytes()
    q3 = siblings.parent / "q3"
    done = _restore_copy(siblings.b, q3, "--restore-config", str(first))
    assert done.returncode == 13, done.stderr
    assert (f"restore config '{first}' exists and serves PGDATA '{siblings.parent / 'q1'}'"
            in done.stderr)
    assert first.read_bytes() == before
    assert not q3.exists()


def test_restore_config_that_does_not_say_whose_it_is_is_never_replaced(
    siblings: Siblings,
) -> None:
    """A file written by an earlier version (one per parent directory, no PGDATA recorded)."""
    older = siblings.parent / "old" / "cloud-dump-restore.conf"
    older.parent.mkdir()
    chown_postgres(older.parent)
    older.write_text('# cloud-dump settings for restore_command (wal-fetch); mode 0600, may '
                     f'hold secrets\nCLOUD_DUMP_STORAGE="{siblings.a.url}"\n')
    q4 = older.parent / "q4"
    done = _restore_copy(siblings.a, q4, "--restore-config", str(older))
    assert done.returncode == 13, done.stderr
    assert "does not say which PGDATA it serves" in done.stderr
    assert not q4.exists()


def test_restore_into_the_same_pgdata_again_replaces_its_own_restore_config(
    siblings: Siblings,
) -> None:
    q2 = siblings.parent / "q2"
    shutil.rmtree(q2)
    done = _restore_copy(siblings.a, q2)
    assert done.returncode == 0, done.stderr
    config = siblings.parent / "q2.cloud-dump-restore.conf"
    assert _storage_in(config) == siblings.a.url
    assert f"# serves PGDATA: {q2}\n" in config.read_text()
    assert _storage_in(siblings.parent / "q1.cloud-dump-restore.conf") == siblings.a.url


def test_restore_config_inside_the_restored_directory_is_refused(siblings: Siblings) -> None:
    """Found by an operator: a --restore-config inside PGDATA put the storage credentials in
    every later base backup of the copy. Refused before anything is written."""
    q4 = siblings.parent / "q4"
    done = _restore_copy(siblings.a, q4, "--restore-config", str(q4 / "cd.conf"))
    assert done.returncode == 3, done.stderr
    assert f"--restore-config '{q4 / 'cd.conf'}' is inside '{q4}'" in done.stderr
    assert not q4.exists()
