"""Real recoveries through ``wal-fetch`` as restore_command, on PostgreSQL 15 and 17.

- A restore whose restore config points at a location with no archive (a directory that is not
  there, a wrong cluster name): the server must not promote with only the WAL inside the backup.
  wal-fetch exits 200, and PostgreSQL's own log line says so ("child process exited with exit
  code 200"), then recovery stops. The same for storage that cannot be reached, which stopped
  recovery before too, but with 126, which PostgreSQL logs as "command not executable".
- The same restore pointed at the archive replays everything archived after the backup, and
  prefetches through the spool in the data directory's ``pg_wal`` (derived from ``%p``).

The source cluster archives with ``cp`` into a plain directory, and its WAL is then stored in
wal-push's format (``devrig.walarchive.archive_wal``): these tests do not depend on wal-push.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from coordinator.wait import wait_until
from devrig.launcher import postgres_cloud_dump
from devrig.moto import StorageTarget, local_target
from devrig.postgres import PgFactory, majors, make_postgres_dir
from devrig.procs import free_port
from devrig.recovery import wait_archived, wait_promoted
from devrig.restored import RestoredCluster, chown_postgres, started
from devrig.roundtrip import backup_cli
from devrig.services import run_cli
from devrig.walarchive import archive_wal, wait_for_prefetcher
from storage.layout import Layout

MAJORS = majors(default=(15, 17))
SEGMENTS_AFTER_BACKUP = 4
ROWS_PER_SEGMENT = 1000
STOPPED = re.compile(
    r'FATAL:  could not restore file "(?P<name>[0-9A-F]{24}|[0-9A-F]{8}\.history)" from '
    r"archive: child process exited with exit code 200"
)


@dataclass(frozen=True)
class Source:
    """A backup named ``base`` and the WAL archived after it, in a local store."""

    major: int
    target: StorageTarget


@pytest.fixture(scope="module")
def launcher() -> Path:
    return postgres_cloud_dump()


@pytest.fixture(scope="module", params=MAJORS)
def source(request: pytest.FixtureRequest, pg_factory: PgFactory) -> Iterator[Source]:
    major = int(request.param)
    copied = make_postgres_dir("cloud-dump-fetch-copied-")
    cluster = pg_factory(major, archive_command=f"test ! -f {copied}/%f && cp %p {copied}/%f")
    store_root = make_postgres_dir("cloud-dump-fetch-store-") / "store"
    target = local_target(store_root)
    backup_cli(cluster, target, "base")
    cluster.sql("CREATE TABLE after_backup (id int)")
    for _ in range(SEGMENTS_AFTER_BACKUP):
        cluster.sql(f"INSERT INTO after_backup SELECT generate_series(1, {ROWS_PER_SEGMENT})")
        wait_archived(cluster)
    cluster.destroy()
    store = target.open()
    for path in sorted(copied.iterdir()):
        archive_wal(store, Layout(), path.name, path.read_bytes())
    store.close()
    chown_postgres(store_root)  # wal-fetch runs as the server's user
    yield Source(major, target)
    shutil.rmtree(copied, ignore_errors=True)
    shutil.rmtree(store_root.parent, ignore_errors=True)


@pytest.fixture
def restored_dir() -> Iterator[Path]:
    """Where a test restores; removed once the prefetchers its recovery started are gone."""
    pgdata = make_postgres_dir("cloud-dump-fetch-restore-") / "data"
    yield pgdata
    wait_for_prefetcher(pgdata)
    shutil.rmtree(pgdata.parent, ignore_errors=True)


def restore(source: Source, launcher: Path, pgdata: Path, *flags: str) -> Path:
    """Restore ``base`` with ``flags``; the restore config restore_command reads."""
    config = pgdata.parent / "restore.conf"
    done = run_cli("restore", "--name", "base", "--pgdata", str(pgdata), "--restore-config",
                   str(config), *flags,
                   env={**source.target.env, "CLOUD_DUMP_EXECUTABLE": str(launcher)})
    assert done.returncode == 0, done.stderr
    return config


def edit_config(config: Path, **settings: str) -> None:
    """Set ``settings`` in the restore config, as an operator editing it would."""
    lines = [line for line in config.read_text().splitlines()
             if line.partition("=")[0] not in settings]
    lines += [f'{key}="{value}"' for key, value in settings.items()]
    config.write_text("\n".join(lines) + "\n")
    chown_postgres(config)


@pytest.mark.parametrize("how", ["absent-directory", "wrong-cluster", "unreachable-storage"])
def test_recovery_stops_on_a_missing_archive_or_a_failure_and_logs_status_200(
    source: Source, launcher: Path, restored_dir: Path, how: str
) -> None:
    if how == "wrong-cluster":
        # Timeline current: no history probe, the first call is the backup's first segment.
        config = restore(source, launcher, restored_dir, "--recovery-target", "latest",
                         "--recovery-target-timeline", "current")
        edit_config(config, CLOUD_DUMP_CLUSTER="prdo")
        error = "no WAL archive at"
    else:
        # recovery_target_timeline latest (restore writes 'current' unless asked): the first
        # call is the probe for 00000002.history.
        config = restore(source, launcher, restored_dir, "--recovery-target", "latest",
                         "--recovery-target-timeline", "latest")
        if how == "absent-directory":
            absent = restored_dir.parent / "no-such-archive"  # where the server's user may look
            edit_config(config, CLOUD_DUMP_STORAGE=f"file://{absent}")
            error = f"storage directory '{absent}' does not exist"
        else:  # a failure that was already fatal, logged as "command not executable" (126)
            error = f"http://127.0.0.1:{free_port()}"
            edit_config(config, CLOUD_DUMP_STORAGE="s3://bucket/prefix",
                        CLOUD_DUMP_S3_ENDPOINT=error, AWS_ACCESS_KEY_ID="k",
                        AWS_SECRET_ACCESS_KEY="s",
                        CLOUD_DUMP_STORAGE_MAX_ATTEMPTS="1", CLOUD_DUMP_WAL_FETCH_RETRIES="1")
    cluster = RestoredCluster(source.major, restored_dir)
    try:
        came_up = _start(cluster)
        promoted = came_up and _promoted_before_stopping(cluster, 60)
        log = cluster.log_path.read_text(errors="replace")
    finally:
        cluster.stop()
    assert not promoted, "the server promoted although it could not read the archive"
    assert not came_up, log
    stopped = STOPPED.search(log)
    assert stopped is not None, log
    first = None if how == "wrong-cluster" else "00000002.history"
    assert first is None or stopped["name"] == first, log
    assert error in log


def test_recovery_replays_the_archive_prefetching_into_pg_wal(
    source: Source, launcher: Path, restored_dir: Path
) -> None:
    config = restore(source, launcher, restored_dir, "--recovery-target", "latest")
    edit_config(config, CLOUD_DUMP_LOG_LEVEL="debug")  # the prefetcher logs what it spools
    with started(source.major, restored_dir) as cluster:
        wait_promoted(cluster)
        rows = cluster.sql("SELECT count(*) FROM after_backup")
        log = cluster.log_path.read_text(errors="replace")
    assert rows == [(SEGMENTS_AFTER_BACKUP * ROWS_PER_SEGMENT,)]
    assert "exit code 200" not in log
    assert wait_for_prefetcher(restored_dir)
    prefetch_log = (restored_dir / "pg_wal/cloud-dump/prefetch.log").read_text()
    assert "prefetching from" in prefetch_log
    assert "spooled '" in prefetch_log, prefetch_log


def _start(cluster: RestoredCluster) -> bool:
    """Start the server; whether it came up (pg_ctl -w returns once it accepts connections)."""
    try:
        cluster.start(timeout_s=60)
    except AssertionError:
        return False
    return True


def _promoted_before_stopping(cluster: RestoredCluster, timeout_s: float) -> bool:
    """Whether the server promoted; False once it stopped (recovery failed) or at the bound."""

    def outcome() -> str | None:
        try:
            if not cluster.sql("SELECT pg_is_in_recovery()")[0][0]:
                return "promoted"
        except psycopg.OperationalError:
            if STOPPED.search(cluster.log_path.read_text(errors="replace")):
                return "stopped"
        return None

    return wait_until(outcome, timeout_s=timeout_s, first_s=0.2) == "promoted"


def test_a_segment_missing_before_later_ones_stops_recovery_instead_of_promoting(
    source: Source, launcher: Path, restored_dir: Path
) -> None:
    """A gap in the archive: recovery to 'latest' must not promote at it without the rows
    archived after it (PostgreSQL would take exit 1 for the end of the archive)."""
    wal_root = Path(source.target.url.removeprefix("file://")) / "wal_archive"
    stored = sorted(p for p in wal_root.iterdir() if len(p.name.partition(".")[0]) == 24)
    gap = stored[-2]  # the last one is archived after it
    aside = restored_dir.parent / gap.name
    config = restore(source, launcher, restored_dir, "--recovery-target", "latest",
                     "--recovery-target-timeline", "current")
    edit_config(config, CLOUD_DUMP_WAL_FETCH_RETRIES="1")  # no wait for a push in flight
    gap.rename(aside)
    cluster = RestoredCluster(source.major, restored_dir)
    try:
        # The server may accept read-only connections once consistent, before the gap.
        promoted = _start(cluster) and _promoted_before_stopping(cluster, 60)
        log = cluster.log_path.read_text(errors="replace")
    finally:
        cluster.stop()
        aside.rename(gap)
    assert not promoted, "the server promoted at a gap in the archive"
    stopped = STOPPED.search(log)
    assert stopped is not None and stopped["name"] == gap.name.partition(".")[0], log
    assert "a gap in the archive" in log, log
