"""wal-push after a refused push: nothing further is pushed ahead of PostgreSQL, so a cluster
whose WAL does not belong in the archive cannot take names away from the one whose it is.

The case from the field: a plain restore of a backup, started with the archive_command it
inherited, writes its own WAL under its source's timeline and names. Its first push is refused
(17); if its later ``.ready`` segments were pushed ahead anyway, the source's own pushes of those
names would be refused once it reaches them, and its archiving would be stuck for good. Through
the installed command, on real PostgreSQL servers, storage, Redis and Celery workers; without a
broker (look-ahead in the call's own batch) and through the detached WAL pusher.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard

from coordinator.cli.exitcodes import ExitCode
from coordinator.wait import wait_until
from devrig.launcher import postgres_cloud_dump
from devrig.moto import StorageTarget, local_target
from devrig.postgres import PgCluster, PgFactory, make_postgres_dir
from devrig.procs import log_tail
from devrig.restored import RestoredCluster, chown_postgres, started
from devrig.roundtrip import backup_cli, restore_cli
from devrig.services import WorkerPool, error_line
from devrig.walfiles import SEG1, SEG2, SEG3, SEG4, SYSID_A, WalDir, make_segment
from storage.base import Storage
from storage.options import StorageOptions
from workers.wal import RAW_SHA256

ARCHIVE_TIMEOUT_S = 60


def archived_names(storage: Storage) -> set[str]:
    return {
        info.key.removeprefix("wal_archive/").split(".")[0]
        for info in storage.list("wal_archive/0")
    }


@pytest.mark.parametrize("route", ["no-broker", "pusher"])
def test_after_a_refused_push_nothing_goes_ahead_until_the_asked_for_file_is_stored(
    route: str, wal_dir: WalDir, tmp_path: Path, start_workers: Callable[..., WorkerPool]
) -> None:
    target = local_target(tmp_path / "store")
    theirs = make_segment(SYSID_A, 200, SEG2)
    other = WalDir(tmp_path / "other")
    other.add(SEG2, theirs)
    assert other.push(SEG2, env=target.env).returncode == 0  # SEG2 belongs to someone else
    env = dict(target.env)
    if route == "pusher":
        env["CLOUD_DUMP_BROKER_URL"] = start_workers(target.env, count=1, queues="wal").broker_url
    storage = target.open()

    # One file at a time ahead: SEG1 is stored, SEG2 goes ahead and is refused, and SEG3, next
    # in line, is not pushed after that.
    for name, seed in ((SEG1, 201), (SEG2, 202), (SEG3, 203)):
        wal_dir.add(name, make_segment(SYSID_A, seed, name), ready=True)
    assert wal_dir.push(SEG1, "--look-ahead", "1", env=env).returncode == 0
    wal_dir.wait_for_pusher()
    assert archived_names(storage) == {SEG1, SEG2}
    assert not wal_dir.marker(SEG2).exists()

    # PostgreSQL asks for SEG2 (refused, again and again), with a wide look-ahead and one more
    # ready file: nothing after SEG2 is pushed, whether a pusher runs or a new one starts.
    wal_dir.add(SEG4, make_segment(SYSID_A, 204, SEG4), ready=True)
    for _ in range(2):
        result = wal_dir.push(SEG2, env=env)
        assert result.returncode == ExitCode.WAL_CONFLICT, result.stderr
        assert "already archived with different content" in error_line(result.stderr)
        wal_dir.wait_for_pusher()
        assert archived_names(storage) == {SEG1, SEG2}

    # The file PostgreSQL asked for is now the archived one: "already archived" confirms it
    # but does not reopen look-ahead (a restored copy re-pushing its source's identical
    # segments must not send its own later ones ahead) ...
    wal_dir.replace_by_rename(SEG2, theirs)
    result = wal_dir.push(SEG2, env=env)
    assert result.returncode == 0, result.stderr
    wal_dir.wait_for_pusher()
    assert archived_names(storage) == {SEG1, SEG2}
    # ... the next file PostgreSQL asks for, newly stored, does: SEG4 goes ahead.
    result = wal_dir.push(SEG3, env=env)
    assert result.returncode == 0, result.stderr
    wal_dir.wait_for_pusher()
    assert archived_names(storage) == {SEG1, SEG2, SEG3, SEG4}
    assert wal_dir.marker(SEG4).exists()


# --- a restored copy archiving into its source's archive ------------------------------------


@pytest.fixture
def postgres_dirs() -> Iterator[Callable[[str], Path]]:
    """``make(prefix)``: a directory the postgres user owns, removed after the test."""
    made: list[Path] = []

    def make(prefix: str) -> Path:
        made.append(make_postgres_dir(f"cloud-dump-conflict-{prefix}-"))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def write_archive_config(directory: Path, target: StorageTarget, broker_url: str | None) -> Path:
    path = directory / "archive.conf"
    settings = {**target.env, **({"CLOUD_DUMP_BROKER_URL": broker_url} if broker_url else {})}
    path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    path.chmod(0o600)
    chown_postgres(path)
    return path


def switch_wal(cluster: PgCluster | RestoredCluster, rounds: int) -> list[str]:
    """Write a little and switch WAL ``rounds`` times; the segments completed."""
    names = []
    for _ in range(rounds):
        cluster.sql("INSERT INTO t SELECT generate_series(1, 1000)")
        names.append(str(cluster.sql("SELECT pg_walfile_name(pg_current_wal_lsn())")[0][0]))
        cluster.sql("SELECT pg_switch_wal()")
    return names


def archiver(cluster: PgCluster | RestoredCluster) -> tuple[int, str | None, int, str | None]:
    row = cluster.sql("SELECT archived_count, last_archived_wal, failed_count, last_failed_wal "
                      "FROM pg_stat_archiver")[0]  # fmt: skip
    last_archived = None if row[1] is None else str(row[1])
    last_failed = None if row[3] is None else str(row[3])
    return int(str(row[0])), last_archived, int(str(row[2])), last_failed


def wait_archived(cluster: PgCluster, name: str) -> None:
    last: list[tuple[int, str | None, int, str | None]] = []

    def archived() -> bool:
        state = archiver(cluster)
        last[:] = [state]
        return state[1] is not None and str(state[1])[:24] >= name

    assert wait_until(archived, timeout_s=ARCHIVE_TIMEOUT_S, first_s=0.1), (
        f"'{name}' not archived: {last[-1]}\n{log_tail(cluster.log_path)}"
    )


def assert_stored_from(storage: Storage, cluster: PgCluster, names: list[str]) -> None:
    """Each of ``names`` is stored with the bytes of ``cluster``'s own file."""
    for name in names:
        local = (cluster.datadir / "pg_wal" / name).read_bytes()
        key = f"wal_archive/{name}.zst"
        assert storage.head(key).metadata == {
            RAW_SHA256: hashlib.sha256(local).hexdigest(),
            "system-identifier": str(cluster.system_identifier()),
        }, name
        assert zstandard.ZstdDecompressor().decompress(storage.get(key)) == local


@pytest.mark.parametrize(
    ("route", "major"), [("no-broker", 15), ("pusher", 17)], ids=["no-broker-pg15", "pusher-pg17"]
)
def test_a_restored_copy_archiving_into_its_source_archive_does_not_block_the_source(
    route: str,
    major: int,
    pg_factory: PgFactory,
    start_workers: Callable[..., WorkerPool],
    postgres_dirs: Callable[[str], Path],
) -> None:
    root = postgres_dirs("store")
    url = f"file://{root}"
    target = StorageTarget("local", url, StorageOptions(), {"CLOUD_DUMP_STORAGE": url})
    broker_url = None
    if route == "pusher":
        broker_url = start_workers(target.env, count=2, queues="wal").broker_url
    else:
        (root / "wal_archive").mkdir()
        chown_postgres(root / "wal_archive")  # the servers' archive_command writes it
    config = write_archive_config(postgres_dirs("conf"), target, broker_url)
    source = pg_factory(major, archive_command=f"{postgres_cloud_dump()} wal-push %p %f "
                                               f"--config {config}")  # fmt: skip
    source.sql("CREATE TABLE t (x int)")
    backup_cli(source, target, "base")
    source_before = switch_wal(source, 2)  # the source is ahead of where the copy will start
    wait_archived(source, source_before[-1])
    pgdata = postgres_dirs("copy") / "data"
    restore_cli(target, "base", pgdata)
    storage = target.open()

    with started(major, pgdata, settings={"archive_mode": "on"}) as copy:
        copy_names = switch_wal(copy, 4)
        assert copy_names[0] == source_before[0], "the copy does not reuse its source's names"
        failed_after = archiver(copy)[2]
        # Its first push is refused; wait for two more refusals, made with every one of the
        # copy's segments ready (so a look-ahead would have taken them).
        last: list[tuple[int, str | None, int, str | None]] = []

        def refused_twice() -> bool:
            state = archiver(copy)
            last[:] = [state]
            return state[2] >= failed_after + 2

        assert wait_until(refused_twice, timeout_s=ARCHIVE_TIMEOUT_S, first_s=0.1), (
            f"the copy's archiver did not retry: {last[-1]}")
        state = last[-1]
        assert state[0] == 0 and state[3] == copy_names[0], state
        ahead = [name for name in copy_names if name > source_before[-1]]
        assert ahead and not archived_names(storage) & set(ahead), (
            "the copy's later segments went into the archive"
        )
    assert_stored_from(storage, source, source_before)

    # The source reaches those names: its pushes succeed and store its own bytes.
    source_after = switch_wal(source, 3)
    assert set(ahead) <= set(source_after)
    wait_archived(source, source_after[-1])
    assert archiver(source)[2:] == (0, None)
    assert_stored_from(storage, source, source_before + source_after)
