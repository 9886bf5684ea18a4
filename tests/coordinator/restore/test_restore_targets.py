"""Recovery targets: every value restore writes is one PostgreSQL accepts and reaches, and a
target the backup cannot reach is refused before anything is downloaded (issue 9 items 4, 5).

One source cluster per major (15, 17) archives with ``cloud-dump wal-push`` into a local store;
two backups ("early", "late") and four phases of rows around them give targets of every type
whose rows are known. Restores with a target start the copy with its own configuration and wait
for promotion. ``postgres -C`` (the server's own check of a setting, run on the source's data
directory) proves that each normalised spelling passes the check that refused ``...Z``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo

import pytest

from coordinator.cli.main import build_parser
from coordinator.cli.settings import settings_of
from coordinator.restore.command import target_from_args
from coordinator.settings import RestoreSettings
from devrig.moto import StorageTarget
from devrig.pgbin import bin_dir
from devrig.postgres import PgCluster, PgFactory, as_postgres
from devrig.recovery import (
    active_settings,
    archive_store,
    archiving_cluster,
    restore,
    started_as_configured,
    wait_archived,
    wait_promoted,
)
from devrig.roundtrip import backup_cli


@dataclass(frozen=True)
class Source:
    """A cluster, its archive and two backups, with the targets between its phases of rows."""

    cluster: PgCluster
    store: StorageTarget
    before_early: datetime  # before backup "early" began
    after_a: datetime  # phase a committed; before backup "late"
    lsn_after_a: str
    after_b: datetime  # phase b committed (by xid_b), restore point "rp-b" created
    xid_b: int
    lsn_after_c: str


@pytest.fixture(scope="module", params=[15, 17])
def source(request: pytest.FixtureRequest, pg_factory: PgFactory) -> Iterator[Source]:
    store = archive_store()
    cluster = archiving_cluster(pg_factory, request.param, store)
    cluster.sql("CREATE TABLE t (id int, phase text)")
    before_early = _now(cluster)
    backup_cli(cluster, store, "early")
    cluster.sql("INSERT INTO t SELECT g, 'a' FROM generate_series(1, 10) g")
    after_a, lsn_after_a = _now(cluster), _lsn(cluster)
    backup_cli(cluster, store, "late")
    xid_b = int(cluster.sql(
        "WITH ins AS (INSERT INTO t SELECT g, 'b' FROM generate_series(1, 20) g RETURNING 1) "
        "SELECT pg_current_xact_id()::text::bigint FROM ins LIMIT 1")[0][0])
    cluster.sql("SELECT pg_create_restore_point('rp-b')")
    after_b = _now(cluster)
    cluster.sql("INSERT INTO t SELECT g, 'c' FROM generate_series(1, 30) g")
    lsn_after_c = _lsn(cluster)
    cluster.sql("INSERT INTO t SELECT g, 'd' FROM generate_series(1, 40) g")
    wait_archived(cluster)
    yield Source(cluster, store, before_early, after_a, lsn_after_a, after_b, xid_b, lsn_after_c)


def _now(cluster: PgCluster) -> datetime:
    value = cluster.sql("SELECT clock_timestamp()")[0][0]
    assert isinstance(value, datetime)
    return value


def _lsn(cluster: PgCluster) -> str:
    return str(cluster.sql("SELECT pg_current_wal_lsn()")[0][0])


def phases_after_recovery(source: Source, *flags: str) -> list[tuple[object, ...]]:
    """Restore "late" with ``flags``, start the copy as configured, wait for promotion.

    A test copy: ``--archive-mode off``, so that its timeline never enters the archive the next
    restores read (they would meet its branch and be refused)."""
    pgdata, done = restore(source.store, "late", "--archive-mode", "off", *flags)
    assert done.returncode == 0, done.stderr
    with started_as_configured(source.cluster.major, pgdata) as copy:
        wait_promoted(copy)
        return copy.sql("SELECT phase, count(*) FROM t GROUP BY phase ORDER BY phase")


def refused(source: Source, backup: str, *flags: str) -> str:
    """Restore ``backup`` with ``flags``: refused (exit 3) with nothing written; its stderr."""
    pgdata, done = restore(source.store, backup, *flags)
    assert done.returncode == 3, done.stderr
    assert not pgdata.exists()
    return done.stderr


A_B = [("a", 10), ("b", 20)]


def test_target_time_with_t_and_z_is_written_with_an_offset_and_reached(source: Source) -> None:
    spelled = source.after_b.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert phases_after_recovery(source, "--recovery-target-time", spelled) == A_B


def test_target_time_in_a_zone_name_is_converted_and_reached(source: Source) -> None:
    local = source.after_b.astimezone(_zone("Asia/Kolkata"))
    spelled = local.strftime("%Y-%m-%d %H:%M:%S.%f asia/kolkata")  # any case, as PostgreSQL
    assert phases_after_recovery(source, "--recovery-target-time", spelled) == A_B


def test_target_xid_with_an_epoch_is_reached(source: Source) -> None:
    epoch_qualified = str(source.xid_b + (1 << 32))  # as pg_current_xact_id() shows after wrap
    assert phases_after_recovery(source, "--recovery-target-xid", epoch_qualified) == A_B


def test_target_lsn_and_name_in_other_spellings_are_reached(source: Source) -> None:
    if source.cluster.major != 15:
        pytest.skip("the spelling of these values does not depend on the major: 15 covers it")
    high, low = source.lsn_after_c.split("/")
    spelled = f"{high.zfill(8)}/{low.zfill(8).lower()}"
    assert phases_after_recovery(source, "--recovery-target-lsn", spelled) == [*A_B, ("c", 30)]
    assert phases_after_recovery(source, "--recovery-target-name", "rp-b") == A_B


def _zone(name: str) -> tzinfo:
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


# --- every spelling restore writes passes the server's own check ----------------------------------

ACCEPTED_TIMES = [
    "2026-11-30T16:29:22Z",
    "2026-11-30 16:29:22+02",
    "2026-11-30 16:29:22+0530",
    "2026-11-30 16:29:22-07:00",
    "2026-11-30 16:29:22.123456 +05:30:15",
    "2026-11-30T16:29:22.5 UTC",
    "2026-07-01 16:29 Europe/Helsinki",
    "2026-11-30 09:01 america/st_johns",
    "2026-11-30 +02",
    "2026-11-30 24:00:00 GMT",
]


def written_value(*flags: str) -> dict[str, str]:
    """The recovery settings restore would write for ``flags``."""
    settings = settings_of(build_parser().parse_args(["restore", *flags]))
    assert isinstance(settings, RestoreSettings)
    target = target_from_args(settings)
    assert target is not None
    return {k: v for k, v in target.settings().items() if v}


def server_accepts(cluster: PgCluster, name: str, value: str) -> subprocess.CompletedProcess[str]:
    """``postgres -C name -c name=value``: the server loads its configuration and checks it."""
    return subprocess.run(
        as_postgres([str(bin_dir(cluster.major) / "postgres"), "-D", str(cluster.datadir),
                     "-C", name, "-c", f"{name}={value}"]),
        capture_output=True, text=True, cwd=cluster.base_dir, check=False,
    )


@pytest.mark.parametrize(
    "flags",
    [["--recovery-target-time", t] for t in ACCEPTED_TIMES]
    + [
        ["--recovery-target-lsn", "00000000/0300ABCD"],
        ["--recovery-target-lsn", "a/b"],
        ["--recovery-target-xid", "18446744073709551615"],
        ["--recovery-target-name", "é" * 31],
        ["--recovery-target-timeline", "Current"],
        ["--recovery-target-timeline", "0002"],
    ],
    ids=lambda flags: flags[-1],
)
def test_every_value_restore_writes_passes_the_servers_check(
    source: Source, flags: list[str]
) -> None:
    for name, value in written_value(*flags).items():
        done = server_accepts(source.cluster, name, value)
        assert done.returncode == 0, f"{name} = '{value}': {done.stderr}"


# --- refused before anything is downloaded --------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--recovery-target-time", "2026-11-30 16:29:22 EST"], "EST"),
        (["--recovery-target-time", "2026-11-30 16:29:22 CET"], "CET"),
        (["--recovery-target-time", "2026-11-30 16:29:22"], "has no time zone"),
        (["--recovery-target-time", "2026-11-30"], "has no time zone"),
        (["--recovery-target-time", "now"], "'now'"),
        (["--recovery-target-time", "garbage"], "'garbage'"),
        (["--recovery-target-time", "2026-11-30 16:29:22+16"], "out of range"),
        (["--recovery-target-time", "2026-03-29 03:30 Europe/Helsinki"], "does not exist"),
        (["--recovery-target-time", "2026-10-25 03:30 Europe/Helsinki"], "happens twice"),
        (["--recovery-target-time", "2026-11-30 16:29:22 Mars/Olympus"], "unknown time zone"),
        (["--recovery-target-lsn", "3000060"], "'3000060'"),
        (["--recovery-target-lsn", "123456789/0"], "'123456789/0'"),
        (["--recovery-target-xid", "0x2A"], "'0x2A'"),
        (["--recovery-target-xid", "4294967296"], "never a transaction's"),
        (["--recovery-target-name", "é" * 32], "64"),
        (["--recovery-target-name", "line\nbreak"], "control characters"),
        (["--recovery-target-timeline", "0"], "'0'"),
    ],
    ids=lambda v: v[-1] if isinstance(v, list) else None,
)
def test_value_postgresql_would_refuse_or_misread_is_refused_before_download(
    source: Source, flags: list[str], named: str
) -> None:
    if source.cluster.major != 15:
        pytest.skip("refused before any server is involved: once is enough")
    stderr = refused(source, "late", *flags)
    assert named in stderr
    assert len(stderr.strip().splitlines()) == 1


# --- targets the backup cannot reach (item 5) -----------------------------------------------------


def test_time_before_the_backups_end_is_refused_naming_an_earlier_backup(source: Source) -> None:
    stderr = refused(source, "late", "--recovery-target-time", source.after_a.isoformat())
    assert "before the end of backup 'late'" in stderr
    assert "backup 'early'" in stderr and "can reach it" in stderr


def test_time_before_every_backup_is_refused_saying_none_can_reach_it(source: Source) -> None:
    stderr = refused(source, "early", "--recovery-target-time", source.before_early.isoformat())
    assert "before the end of backup 'early'" in stderr
    assert "no earlier backup" in stderr


def test_lsn_before_the_backups_end_is_refused_naming_an_earlier_backup(source: Source) -> None:
    stderr = refused(source, "late", "--recovery-target-lsn", source.lsn_after_a)
    assert "before the end of backup 'late'" in stderr and "backup 'early'" in stderr


def test_the_earlier_backup_named_reaches_the_refused_target(source: Source) -> None:
    if source.cluster.major != 15:
        pytest.skip("reachability is judged from manifest.json alone: 15 covers it")
    pgdata, done = restore(source.store, "early", "--archive-mode", "off",
                           "--recovery-target-time", source.after_a.isoformat())
    assert done.returncode == 0, done.stderr
    assert active_settings(pgdata)["recovery_target_time"] != ""
    with started_as_configured(source.cluster.major, pgdata) as copy:
        wait_promoted(copy)
        assert copy.sql("SELECT phase, count(*) FROM t GROUP BY phase") == [("a", 10)]


def test_wal_prefix_without_an_archive_is_refused_before_writing(source: Source) -> None:
    """Item 3: a restore with a target first checks that the WAL archive exists (exit 18)."""
    if source.cluster.major != 15:
        pytest.skip("storage side only")
    pgdata, done = restore(source.store, "late", "--recovery-target", "latest",
                           "--wal-prefix", "wal_archve")
    assert done.returncode == 18, done.stderr
    assert "wal_archve" in done.stderr
    assert not pgdata.exists()

