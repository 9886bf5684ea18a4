"""``restore`` run as root into a PGDATA that exists already (an empty directory prepared for the
server, often inside a directory of root's such as /var/lib/postgresql/15): everything restored
goes to the owner of that PGDATA, not to the owner of its parent; ``--owner`` overrides; the
"owner is root" warning is said only once the restore goes ahead, never before a refusal.
The tests run as root, on a PostgreSQL 15 cluster with a tablespace.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from devrig.moto import StorageTarget, local_target
from devrig.postgres import PgCluster, PgFactory, make_postgres_dir
from devrig.restored import started
from devrig.roundtrip import backup_cli
from devrig.services import error_line, run_cli

POSTGRES = pwd.getpwnam("postgres")
NOBODY = pwd.getpwnam("nobody")


@dataclass(frozen=True)
class Backed:
    cluster: PgCluster
    target: StorageTarget
    tablespace: Path


@pytest.fixture(scope="module")
def backed(pg_factory: PgFactory) -> Iterator[Backed]:
    """Backup "b" of a PG 15 cluster with 100 rows in a tablespace, in a local store."""
    store = Path(tempfile.mkdtemp(prefix="cloud-dump-owner-store-", dir="/tmp"))
    target = local_target(store)
    cluster = pg_factory(15)
    tablespace = make_postgres_dir("cloud-dump-owner-ts-")
    cluster.sql(f"CREATE TABLESPACE ts_owner LOCATION '{tablespace}'")
    cluster.sql("CREATE TABLE rows_ts TABLESPACE ts_owner AS SELECT generate_series(1, 100) g")
    backup_cli(cluster, target, "b")
    yield Backed(cluster, target, tablespace)
    shutil.rmtree(store, ignore_errors=True)


@pytest.fixture
def root_dir() -> Iterator[Path]:
    """A directory of root that others may traverse (0755), as /var/lib/postgresql/15 is."""
    path = Path(tempfile.mkdtemp(prefix="cloud-dump-owner-root-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def empty_dir(path: Path, uid: int, gid: int) -> Path:
    path.mkdir()
    os.chown(path, uid, gid)
    return path


def owners_under(*roots: Path) -> set[tuple[int, int]]:
    """(uid, gid) of every entry under each root, the roots included, links not followed."""
    found = set()
    for root in roots:
        for path in [root, *root.rglob("*")]:
            st = path.lstat()
            found.add((st.st_uid, st.st_gid))
    return found


def restore(backed: Backed, pgdata: Path, tablespace: Path, *extra: str
            ) -> subprocess.CompletedProcess[str]:
    return run_cli("restore", "--name", "b", "--pgdata", str(pgdata), "--tablespace-mapping",
                   f"{backed.tablespace}={tablespace}", *extra, env=backed.target.env)


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": warning: " in line]


def test_existing_pgdata_of_postgres_under_a_root_directory_gets_everything_and_starts(
    backed: Backed, root_dir: Path
) -> None:
    pgdata = empty_dir(root_dir / "main", POSTGRES.pw_uid, POSTGRES.pw_gid)
    tablespace = root_dir / "ts"  # created by the restore, in root's directory
    done = restore(backed, pgdata, tablespace)
    assert done.returncode == 0, done.stderr
    assert warnings_in(done.stderr) == [], done.stderr
    assert owners_under(pgdata, tablespace) == {(POSTGRES.pw_uid, POSTGRES.pw_gid)}
    assert root_dir.stat().st_uid == 0  # the parent is left as it was
    with started(15, pgdata, tablespace) as copy:  # its chown has nothing left to change
        assert copy.sql("SELECT count(*) FROM rows_ts") == [(100,)]


def test_existing_pgdata_of_root_keeps_root_with_a_warning_whatever_its_parent(
    backed: Backed,
) -> None:
    parent = make_postgres_dir("cloud-dump-owner-pgparent-")  # postgres's
    try:
        pgdata = empty_dir(parent / "main", 0, 0)
        done = restore(backed, pgdata, parent / "ts")
        assert done.returncode == 0, done.stderr
        warnings = warnings_in(done.stderr)
        assert len(warnings) == 1 and f"restoring as root into '{pgdata}'" in warnings[0]
        assert "--owner" in warnings[0] and "cannot run as root" in warnings[0]
        assert owners_under(pgdata) == {(0, 0)}
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_owner_flag_wins_over_the_existing_pgdatas_owner(
    backed: Backed, root_dir: Path
) -> None:
    pgdata = empty_dir(root_dir / "main", POSTGRES.pw_uid, POSTGRES.pw_gid)
    done = restore(backed, pgdata, root_dir / "ts", "--owner", "nobody")
    assert done.returncode == 0, done.stderr
    assert owners_under(pgdata, root_dir / "ts") == {(NOBODY.pw_uid, NOBODY.pw_gid)}


@pytest.mark.parametrize("owner", [[], ["--owner", "root"]], ids=["parent-of-root", "owner-root"])
def test_a_refused_restore_says_only_its_error_not_the_owner_warning(
    backed: Backed, root_dir: Path, owner: list[str]
) -> None:
    pgdata = empty_dir(root_dir / "main", 0, 0)
    (pgdata / "PG_VERSION").write_text("15\n")
    done = restore(backed, pgdata, root_dir / "ts", *owner)
    assert done.returncode == ExitCode.TARGET_NOT_EMPTY, done.stderr
    assert f"restore target '{pgdata}' is not empty" in error_line(done.stderr)
    assert done.stderr.strip().splitlines() == [error_line(done.stderr)]
    assert sorted(p.name for p in root_dir.iterdir()) == ["main"]
