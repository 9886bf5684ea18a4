"""Which timeline a restore with a target follows: a test copy's timeline in the shared archive
is never followed silently, a failover's is (T.md bug 1).

"branched" (PostgreSQL 15 and 17): a source archiving with ``cloud-dump wal-push``, backups b3
and b4, then a test copy of b4 restored with ``--recovery-target immediate`` and the default
``--archive-mode preserve``, started as configured: it promotes to timeline 2, writes a row
and pushes its history and WAL into the source's archive. Meanwhile the source writes phases d
to k on timeline 1, is backed up again (b5, after the fork), and a target time is taken after k.
Without the check, a restore of b4 to that time followed the copy's timeline (PostgreSQL's
default 'latest') and promoted without d to k.

"failover" (15 and 17): a primary and a streaming standby made from its backup; the primary
stops, the standby is promoted (timeline 2) and writes more: a chain, followed by default.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from coordinator.restore.targets import format_lsn, parse_lsn
from coordinator.wait import wait_until
from devrig.moto import StorageTarget, local_target
from devrig.postgres import PgCluster, PgFactory, make_postgres_dir
from devrig.recovery import (
    ConfiguredCluster,
    active_settings,
    archive_command,
    archive_store,
    archiving_cluster,
    restore,
    started_as_configured,
    wait_archived,
    wait_promoted,
)
from devrig.restored import RestoredCluster, started
from devrig.roundtrip import backup_cli
from devrig.walarchive import archive_wal, passphrase_segments
from storage.layout import Layout
from storage.manifest import BackupManifest

SOURCE_PHASES = ["a", "b", "d", "e", "f", "g", "h", "i", "j", "k"]
FOLLOW_TIMEOUT_S = 60


@dataclass(frozen=True)
class Branched:
    major: int
    store: StorageTarget
    copy_stderr: str  # what the test copy's restore warned
    after_k: datetime  # after phase k, before phase l (all on the source)
    xid_k: int
    lsn_after_k: str


def _now(cluster: PgCluster | ConfiguredCluster) -> datetime:
    value = cluster.sql("SELECT clock_timestamp()")[0][0]
    assert isinstance(value, datetime)
    return value


def _insert(cluster: PgCluster | ConfiguredCluster, phase: str, rows: int = 5) -> None:
    cluster.sql(f"INSERT INTO t SELECT g, '{phase}' FROM generate_series(1, {rows}) g")


@pytest.fixture(scope="module", params=[15, 17])
def branched(request: pytest.FixtureRequest, pg_factory: PgFactory) -> Iterator[Branched]:
    major = request.param
    store = archive_store()
    source = archiving_cluster(pg_factory, major, store)
    source.sql("CREATE TABLE t (id int, phase text)")
    _insert(source, "a")
    backup_cli(source, store, "b3")
    _insert(source, "b")
    backup_cli(source, store, "b4")
    wait_archived(source)

    pgdata, done = restore(store, "b4", "--recovery-target", "immediate")
    assert done.returncode == 0, done.stderr
    with started_as_configured(major, pgdata) as copy:  # archives into the source's archive
        wait_promoted(copy)
        copy.sql("INSERT INTO t VALUES (1, 'copy')")
        wait_archived(copy)
    assert [i.key for i in store.open().list("wal_archive/00000002.history")]

    for phase in SOURCE_PHASES[2:-1]:
        _insert(source, phase)
    xid_k = int(source.sql(
        "WITH ins AS (INSERT INTO t SELECT g, 'k' FROM generate_series(1, 5) g RETURNING 1) "
        "SELECT pg_current_xact_id()::text::bigint FROM ins LIMIT 1")[0][0])
    source.sql("SELECT pg_create_restore_point('rp-k')")
    lsn_after_k = str(source.sql("SELECT pg_current_wal_lsn()")[0][0])
    backup_cli(source, store, "b5")  # taken on timeline 1 after the copy forked from it
    after_k = _now(source)
    _insert(source, "l")  # the commit a time target stops before
    wait_archived(source)
    yield Branched(major, store, done.stderr, after_k, xid_k, lsn_after_k)


def _phases(cluster: RestoredCluster) -> list[str]:
    return [str(row[0]) for row in cluster.sql("SELECT DISTINCT phase FROM t ORDER BY 1")]


def _on_start(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("on start:"))


def _refused(branched: Branched, backup: str, *flags: str) -> str:
    pgdata, done = restore(branched.store, backup, *flags)
    assert done.returncode == 3, done.stderr
    assert not pgdata.exists()
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done.stderr


def test_test_copy_with_a_target_is_warned_that_it_pushes_its_timeline(
    branched: Branched,
) -> None:
    assert ("the copy promotes to a new timeline and archives with cloud-dump wal-push into the "
            "archive it was restored from") in branched.copy_stderr
    assert "for a test copy, restore with --archive-mode off" in branched.copy_stderr


@pytest.mark.parametrize("kind", ["time", "xid", "name", "lsn", "latest", "time-earlier-backup"])
def test_target_past_a_test_copys_fork_is_refused_naming_the_branches(
    branched: Branched, kind: str
) -> None:
    if kind != "time" and branched.major != 15:
        pytest.skip("decided from the archive before any server runs: 15 covers the kinds")
    backup, flags = "b4", {
        "time": ["--recovery-target-time", branched.after_k.isoformat()],
        "xid": ["--recovery-target-xid", str(branched.xid_k)],
        "name": ["--recovery-target-name", "rp-k"],
        "lsn": ["--recovery-target-lsn", branched.lsn_after_k],
        "latest": ["--recovery-target", "latest"],
    }.get(kind, [])
    if kind == "time-earlier-backup":
        backup, flags = "b3", ["--recovery-target-time", branched.after_k.isoformat()]
    stderr = _refused(branched, backup, *flags)
    assert f"the timelines in the archive branch after backup '{backup}' (timeline 1" in stderr
    assert ("recovery could end on timeline 1, the backup's own, which went on after timeline 2 "
            "forked from it at ") in stderr
    assert ("; or on timeline 2, forked from 1 at " in stderr
            and "('reached consistency', stopped at a recovery target: looks like a restored "
            "copy)" in stderr), stderr
    assert "PostgreSQL would follow timeline 2" in stderr
    assert "--recovery-target-timeline: current (timeline 1, the backup's own)" in stderr


def test_backups_own_timeline_chosen_explicitly_restores_the_sources_rows(
    branched: Branched,
) -> None:
    chosen = "current" if branched.major == 15 else "1"
    pgdata, done = restore(branched.store, "b4", "--recovery-target-time",
                           branched.after_k.isoformat(), "--recovery-target-timeline", chosen)
    assert done.returncode == 0, done.stderr
    assert "on timeline 1, the backup's own, then promotes" in _on_start(done.stdout)
    assert active_settings(pgdata)["recovery_target_timeline"] == chosen
    with started(branched.major, pgdata) as copy:
        wait_promoted(copy)
        assert _phases(copy) == SOURCE_PHASES  # d to k, no 'copy', no 'l'


def test_copys_timeline_chosen_explicitly_is_followed(branched: Branched) -> None:
    if branched.major != 15:
        pytest.skip("the other choice of the same branch: 15 covers it")
    pgdata, done = restore(branched.store, "b4", "--recovery-target", "latest",
                           "--recovery-target-timeline", "2")
    assert done.returncode == 0, done.stderr
    assert "on timeline 2 (timeline 1 until " in _on_start(done.stdout)
    with started(branched.major, pgdata) as copy:
        wait_promoted(copy)
        assert _phases(copy) == ["a", "b", "copy"]


def test_latest_chosen_explicitly_is_written_as_asked_despite_the_branch(
    branched: Branched,
) -> None:
    if branched.major != 15:
        pytest.skip("decided from the archive before any server runs")
    pgdata, done = restore(branched.store, "b4", "--recovery-target", "latest",
                           "--recovery-target-timeline", "latest", "--archive-mode", "off")
    assert done.returncode == 0, done.stderr
    assert active_settings(pgdata)["recovery_target_timeline"] == "latest"
    assert ("on timeline 2 (timeline 1 until 0/" in _on_start(done.stdout)
            and "as the archive has it now" in _on_start(done.stdout))


def test_immediate_target_stops_before_any_fork_and_is_not_refused(branched: Branched) -> None:
    if branched.major != 15:
        pytest.skip("decided from the archive before any server runs")
    pgdata, done = restore(branched.store, "b4", "--recovery-target", "immediate",
                           "--archive-mode", "off")
    assert done.returncode == 0, done.stderr
    assert active_settings(pgdata)["recovery_target_timeline"] == "current"


@pytest.mark.parametrize(
    ("backup", "flags", "named"),
    [
        ("b4", ["--recovery-target", "latest", "--recovery-target-timeline", "7"],
         "recovery target timeline 7: the archive at file://"),
        ("b5", ["--recovery-target", "latest", "--recovery-target-timeline", "2"],
         "recovery target timeline 2 left timeline 1 at LSN "),
        ("b5", ["--recovery-target", "latest"],
         "PostgreSQL would follow timeline 2 (recovery_target_timeline 'latest', the highest in "
         "the archive), which left timeline 1 at LSN "),
        ("b5", ["--recovery-target", "latest", "--recovery-target-timeline", "latest"],
         "PostgreSQL would follow timeline 2"),
    ],
    ids=["no-history", "forked-before-the-backup", "default-not-a-child", "latest-not-a-child"],
)
def test_timeline_the_archive_cannot_lead_from_the_backup_is_refused(
    branched: Branched, backup: str, flags: list[str], named: str
) -> None:
    if branched.major != 15:
        pytest.skip("decided from the archive before any server runs")
    stderr = _refused(branched, backup, *flags)
    assert named in stderr
    if "7" in flags:
        assert "has no history file for it (00000007.history)" in stderr
    else:
        assert "before the backup's end" in stderr and f"backup '{backup}'" in stderr
        assert "--recovery-target-timeline: current (timeline 1, the backup's own)" in stderr


# --- a failover makes a chain ---------------------------------------------------------------------


@dataclass(frozen=True)
class Failover:
    major: int
    store: StorageTarget
    after_c: datetime  # on timeline 2, after the promoted standby wrote phase c


@contextmanager
def _failed_over(major: int, pg_factory: PgFactory) -> Iterator[tuple[Failover, PgCluster]]:
    """A primary backed up, a standby of it promoted after the primary stopped (timeline 2),
    rows a and b before the failover, c and d after it; and the stopped old primary."""
    store = archive_store()
    # wal_keep_size: the standby streams from the backup's start, with no archive to read.
    primary = pg_factory(major, archive_command=archive_command(store),
                         settings={"wal_keep_size": "256MB"})
    primary.sql("CREATE TABLE t (id int, phase text)")
    _insert(primary, "a")
    backup_cli(primary, store, "base")
    pgdata, done = restore(store, "base")
    assert done.returncode == 0, done.stderr
    (pgdata / "standby.signal").touch()
    with (pgdata / "postgresql.auto.conf").open("a") as conf:
        conf.write(f"primary_conninfo = 'host=127.0.0.1 port={primary.port} user=repl "
                   f"password={primary.repl_password}'\n")
    standby = ConfiguredCluster(major, pgdata)
    standby.start()
    try:
        _insert(primary, "b")
        _wait_for_phase(standby, "b")
        primary.stop()  # the primary fails; its last segment is never archived whole
        assert standby.sql("SELECT pg_promote()") == [(True,)]
        _insert(standby, "c")
        after_c = _now(standby)
        _insert(standby, "d")
        wait_archived(standby)
        yield Failover(major, store, after_c), primary
    finally:
        standby.stop()


@pytest.fixture(scope="module", params=[15, 17])
def failover(request: pytest.FixtureRequest, pg_factory: PgFactory) -> Iterator[Failover]:
    with _failed_over(request.param, pg_factory) as (done, _):
        yield done


def _wait_for_phase(cluster: ConfiguredCluster, phase: str) -> None:
    assert wait_until(
        lambda: cluster.sql(f"SELECT count(*) FROM t WHERE phase = '{phase}'")[0][0] != 0,
        timeout_s=FOLLOW_TIMEOUT_S, first_s=0.2,
    ), "the standby does not stream from the primary"


def test_failover_chain_is_followed_with_the_default_timeline(failover: Failover) -> None:
    pgdata, done = restore(failover.store, "base", "--recovery-target-time",
                           failover.after_c.isoformat())
    assert done.returncode == 0, done.stderr
    assert "on timeline 2 (timeline 1 until " in _on_start(done.stdout)
    assert active_settings(pgdata)["recovery_target_timeline"] == "2"
    with started(failover.major, pgdata) as copy:
        wait_promoted(copy)
        assert _phases(copy) == ["a", "b", "c"]


def test_failover_chain_is_followed_to_the_end_of_the_archive(failover: Failover) -> None:
    if failover.major != 15:
        pytest.skip("decided from the archive before any server runs: 15 covers it")
    _, done = restore(failover.store, "base", "--recovery-target", "latest")
    assert done.returncode == 0, done.stderr
    assert ("up to the end of the archived WAL on timeline 2 (timeline 1 until "
            in _on_start(done.stdout))


def test_old_primary_that_went_on_within_the_fork_segment_is_a_branch(
    pg_factory: PgFactory,
) -> None:
    """Split brain: the old primary comes back and completes the segment the switch point falls
    in. The promoted server archived that segment as .partial; archived whole under its own
    name, it holds timeline 1's WAL past the fork, which the default would silently skip."""
    with _failed_over(15, pg_factory) as (failed_over, old_primary):
        old_primary.start()
        _insert(old_primary, "x")
        wait_archived(old_primary)  # one switch: the fork segment, nothing after it
        _, done = restore(failed_over.store, "base", "--recovery-target-time",
                          failed_over.after_c.isoformat())
        old_primary.stop()
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert "timeline 1, the backup's own, which went on after timeline 2 forked" in done.stderr
    assert "is archived)" in done.stderr


# --- history files as the archive stores them: encrypted, compressed, with gaps -------------------


@dataclass(frozen=True)
class PlainBackup:
    store: StorageTarget
    manifest: BackupManifest


@pytest.fixture(scope="module")
def plain_backup(pg15: PgCluster) -> Iterator[PlainBackup]:
    """A backup of a cluster that never archived: the tests write its WAL prefixes' history
    files in wal-push's format, one prefix per case."""
    store = local_target(make_postgres_dir("cloud-dump-histories-") / "store")
    backup_cli(pg15, store, "base")
    opened = store.open()
    yield PlainBackup(store, BackupManifest.from_json(opened.get("base/manifest.json"), "base"))
    opened.close()


def _history(*switches: tuple[int, int, str]) -> bytes:
    return "".join(f"{tli}\t{format_lsn(lsn)}\t{why}\n" for tli, lsn, why in switches).encode()


def test_encrypted_history_files_of_two_copies_are_read_and_the_branch_refused(
    plain_backup: PlainBackup, tmp_path: Path
) -> None:
    end = parse_lsn(plain_backup.manifest.end_lsn)
    layout = Layout(wal_prefix="wal_encrypted")
    storage = plain_backup.store.open()
    passphrase_file = passphrase_segments(storage, layout, {
        "00000002.history": _history((1, end + 0x1000, "no recovery target specified")),
        "00000003.history": _history((1, end + 0x2000, "before transaction 900")),
    }, tmp_path)
    storage.close()
    flags = ["--recovery-target", "latest", "--wal-prefix", "wal_encrypted"]

    pgdata, done = restore(plain_backup.store, "base", *flags,
                           "--passphrase-file", str(passphrase_file))
    assert done.returncode == 3, done.stderr
    assert not pgdata.exists()
    ends = (f"recovery could end on timeline 1, the backup's own, which went on after timeline "
            f"3 forked from it at {format_lsn(end + 0x2000)} (timeline 3 stopped at a recovery "
            f"target); or on timeline 2, forked from 1 at {format_lsn(end + 0x1000)} ('no "
            "recovery target specified'); or on timeline 3, forked from 1 at "
            f"{format_lsn(end + 0x2000)} ('before transaction 900', stopped at a recovery "
            "target: looks like a restored copy); PostgreSQL would follow timeline 3")
    assert ends in done.stderr

    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    pgdata, done = restore(plain_backup.store, "base", *flags, "--passphrase-file", str(wrong))
    assert done.returncode == 14, done.stderr
    assert "wal_encrypted/" in done.stderr
    assert not pgdata.exists()


@pytest.mark.parametrize("case", ["copy-past-the-gap", "failovers-past-the-gap"])
def test_history_files_past_a_gap_are_seen_and_the_restore_refused(
    plain_backup: PlainBackup, case: str
) -> None:
    """00000002.history never reached the archive: PostgreSQL stops probing at the gap and
    follows timeline 1 to its end. Timeline 3 is either a copy forked from 1 (a branch) or the
    end of two failovers 1 -> 2 -> 3, whose WAL PostgreSQL would not replay."""
    end = parse_lsn(plain_backup.manifest.end_lsn)
    if case == "copy-past-the-gap":
        history = _history((1, end + 0x1000, "reached consistency"))
        expected = ("recovery could end on timeline 1, the backup's own, which went on after "
                    "timeline 3 forked from it at ")
    else:
        history = _history((1, end + 0x1000, "no recovery target specified"),
                           (2, end + 0x2000, "no recovery target specified"))
        expected = (f"recovery could end on timeline 3, forked from 2 at "
                    f"{format_lsn(end + 0x2000)} ('no recovery target specified'); PostgreSQL "
                    "would follow timeline 1 (recovery_target_timeline 'latest', its default), "
                    "which is none of them")
    storage = plain_backup.store.open()
    archive_wal(storage, Layout(wal_prefix=f"wal_{case}"), "00000003.history", history,
                compression="none")
    storage.close()
    pgdata, done = restore(plain_backup.store, "base", "--recovery-target", "latest",
                           "--wal-prefix", f"wal_{case}")
    assert done.returncode == 3, done.stderr
    assert expected in done.stderr
    assert "PostgreSQL would follow timeline 1 (" in done.stderr
    assert not pgdata.exists()
