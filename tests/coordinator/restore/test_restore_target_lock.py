"""Two restores into the same directory: each target directory (PGDATA, each tablespace
directory) is held by one restore from before the check that it is empty until the restore ends;
another restore refuses (exit 13) naming the directory, having written and removed nothing.
A directory an interrupted restore left is refused with what to do about it.

One PostgreSQL 15 cluster with a tablespace is backed up once; every test restores it through
the CLI. A held directory is held with the very lock a running restore takes (``flock`` on the
directory itself), and the concurrent pair is two real ``cloud-dump restore`` processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from devrig import sample
from devrig.moto import StorageTarget, local_target
from devrig.postgres import PgFactory, make_postgres_dir, make_test_dir
from devrig.restored import started
from devrig.services import VENV_BIN, error_line, run_cli

IN_USE = "is in use: another restore is writing into it"
INTERRUPTED = "looks like an interrupted restore"


@dataclass(frozen=True)
class Backed:
    target: StorageTarget
    tablespace: Path  # the source cluster's tablespace location
    expected: dict[str, str]


@pytest.fixture(scope="module")
def backed(pg_factory: PgFactory) -> Backed:
    cluster = pg_factory(15)
    tablespace = sample.populate(cluster, rows=200)
    target = local_target(make_test_dir("cloud-dump-lock-store-") / "store")
    done = run_cli("backup", "--name", "b", "--db-url", cluster.replication_url(),
                   "--no-progress", env=target.env)
    assert done.returncode == 0, done.stderr
    return Backed(target, tablespace, sample.digest(cluster.sql))


def restore_argv(backed: Backed, pgdata: Path, tablespace: Path) -> list[str]:
    return [str(VENV_BIN / "cloud-dump"), "restore", "--name", "b", "--pgdata", str(pgdata),
            "--tablespace-mapping", f"{backed.tablespace}={tablespace}"]


def restore(backed: Backed, pgdata: Path, tablespace: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*restore_argv(backed, pgdata, tablespace)[1:], env=backed.target.env)


@contextlib.contextmanager
def held(directory: Path) -> Iterator[None]:
    """``directory`` held as a running restore holds it."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def snapshot(directory: Path) -> tuple[list[str], int, int, int]:
    """What a refused restore must leave as it was: the entries, inode, mode and mtime."""
    st = directory.stat()
    return names(directory), st.st_ino, st.st_mode, st.st_mtime_ns


def only_error(stderr: str) -> str:
    """The one line the run printed, which must be its error."""
    line = error_line(stderr)
    assert stderr.strip().splitlines() == [line], stderr
    return line


# --- a directory another restore holds ---------------------------------------------------------


def test_restore_into_a_pgdata_another_restore_holds_refuses_and_touches_nothing(
    backed: Backed,
) -> None:
    parent = make_postgres_dir("cloud-dump-lock-")
    pgdata, tablespace = parent / "data", parent / "ts"
    pgdata.mkdir(mode=0o700)
    before = snapshot(pgdata)
    with held(pgdata):
        done = restore(backed, pgdata, tablespace)
        assert done.returncode == ExitCode.TARGET_NOT_EMPTY, done.stderr
        assert f"restore target '{pgdata}' {IN_USE}" in only_error(done.stderr)
        assert snapshot(pgdata) == before
        assert names(parent) == ["data"]  # the tablespace directory never made


def test_restore_into_a_tablespace_directory_another_restore_holds_refuses_and_undoes_its_pgdata(
    backed: Backed,
) -> None:
    parent = make_postgres_dir("cloud-dump-lock-")
    pgdata, tablespace = parent / "data", parent / "ts"
    tablespace.mkdir(mode=0o700)
    before = snapshot(tablespace)
    with held(tablespace):
        done = restore(backed, pgdata, tablespace)
        assert done.returncode == ExitCode.TARGET_NOT_EMPTY, done.stderr
        assert f"restore target '{tablespace}' {IN_USE}" in only_error(done.stderr)
        assert snapshot(tablespace) == before
        assert names(parent) == ["ts"]  # the PGDATA it made for itself, removed


def test_a_held_pgdata_with_files_is_said_to_be_in_use_not_an_interrupted_restore(
    backed: Backed,
) -> None:
    """What a restore into it sees while the other one is writing: not advice to empty it."""
    pgdata = make_postgres_dir("cloud-dump-lock-") / "data"
    pgdata.mkdir(mode=0o700)
    (pgdata / "PG_VERSION").write_text("15\n")
    before = snapshot(pgdata)
    with held(pgdata):
        done = restore(backed, pgdata, make_postgres_dir("cloud-dump-lock-ts-") / "ts")
        assert done.returncode == ExitCode.TARGET_NOT_EMPTY, done.stderr
        line = only_error(done.stderr)
        assert f"restore target '{pgdata}' {IN_USE}" in line and INTERRUPTED not in line
        assert snapshot(pgdata) == before


# --- two restores at once ----------------------------------------------------------------------


# Several rounds: without the lock about one round in four mixed the two restores.
@pytest.mark.parametrize("attempt", range(6))
def test_two_restores_into_one_new_pgdata_at_once_leave_one_complete_copy(
    backed: Backed, attempt: int
) -> None:
    parent = make_postgres_dir("cloud-dump-lock-")
    pgdata, tablespace = parent / "data", parent / "ts"
    argv = restore_argv(backed, pgdata, tablespace)
    env = {**os.environ, **backed.target.env}
    runs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env) for _ in range(2)]
    outputs = [run.communicate(timeout=180) for run in runs]
    codes = [run.returncode for run in runs]
    assert sorted(codes) == [0, ExitCode.TARGET_NOT_EMPTY], outputs
    loser = only_error(outputs[codes.index(ExitCode.TARGET_NOT_EMPTY)][1])
    # Refused while the winner held a target, or (had it finished first) as not empty.
    assert IN_USE in loser or "is not empty" in loser, loser
    assert INTERRUPTED not in loser, loser

    for name in ("PG_VERSION", "global/pg_control", "backup_label", "postgresql.conf"):
        assert (pgdata / name).is_file(), name
    assert not list(pgdata.rglob("*.cloud-dump-partial"))
    with started(15, pgdata, tablespace) as copy:
        assert sample.digest(copy.sql) == backed.expected


def test_a_complete_restore_is_refused_as_not_empty_without_the_interrupted_hint(
    backed: Backed,
) -> None:
    parent = make_postgres_dir("cloud-dump-lock-")
    pgdata, tablespace = parent / "data", parent / "ts"
    assert restore(backed, pgdata, tablespace).returncode == 0
    again = restore(backed, pgdata, make_postgres_dir("cloud-dump-lock-ts-") / "ts")
    assert again.returncode == ExitCode.TARGET_NOT_EMPTY, again.stderr
    line = only_error(again.stderr)
    assert f"restore target '{pgdata}' is not empty" in line and INTERRUPTED not in line


# --- what an interrupted restore leaves --------------------------------------------------------


def test_an_interrupted_restore_leftover_is_refused_with_what_to_do(backed: Backed) -> None:
    pgdata = make_postgres_dir("cloud-dump-lock-") / "data"
    pgdata.mkdir(mode=0o700)
    (pgdata / "PG_VERSION").write_text("15\n")
    (pgdata / "backup_label").write_text("START WAL LOCATION: 0/2000028\n")
    before = snapshot(pgdata)
    done = restore(backed, pgdata, make_postgres_dir("cloud-dump-lock-ts-") / "ts")
    assert done.returncode == ExitCode.TARGET_NOT_EMPTY, done.stderr
    line = only_error(done.stderr)
    assert f"restore target '{pgdata}' is not empty: it {INTERRUPTED}" in line
    assert "empty or remove it before restoring again" in line
    assert snapshot(pgdata) == before
