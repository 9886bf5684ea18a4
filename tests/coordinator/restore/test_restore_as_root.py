"""``restore`` run as root (the tests run as root): everything it writes goes to the owner of the
directory PGDATA goes into, or to ``--owner``, before the copy becomes startable; the server then
starts as that user and its ``restore_command`` reads the restore config file.
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
from coordinator.restore.restoreconfig import default_restore_config
from devrig.launcher import postgres_cloud_dump
from devrig.moto import StorageTarget
from devrig.postgres import PgCluster, PgFactory, as_postgres, make_postgres_dir
from devrig.recovery import archive_store, wait_archived, wait_promoted
from devrig.restored import chown_postgres, started
from devrig.roundtrip import backup_cli
from devrig.services import VENV_BIN, run_cli

POSTGRES = pwd.getpwnam("postgres")


@dataclass(frozen=True)
class Archived:
    cluster: PgCluster
    target: StorageTarget
    launcher: Path
    tablespace: Path


@pytest.fixture(scope="module")
def archived(pg_factory: PgFactory) -> Archived:
    """A PG 15 cluster archiving through ``cloud-dump wal-push``, backed up as "b", then given
    rows that only the archived WAL holds."""
    launcher = postgres_cloud_dump()
    target = archive_store()
    config = make_postgres_dir("cloud-dump-root-conf-") / "archive.conf"
    config.write_text(f'CLOUD_DUMP_STORAGE="{target.url}"\n')
    chown_postgres(config)
    cluster = pg_factory(15, archive_command=f"{launcher} wal-push %p %f --config {config}")
    tablespace = make_postgres_dir("cloud-dump-root-ts-")
    cluster.sql(f"CREATE TABLESPACE ts LOCATION '{tablespace}'")
    cluster.sql("CREATE TABLE rows_ts TABLESPACE ts AS SELECT generate_series(1, 100) AS g")
    backup_cli(cluster, target, "b")
    cluster.sql("INSERT INTO rows_ts SELECT generate_series(101, 150)")
    wait_archived(cluster)
    return Archived(cluster, target, launcher, tablespace)


@pytest.fixture
def root_owned_dir() -> Iterator[Path]:
    """A directory of root that others may traverse (0755), as /srv or /var/lib often are."""
    path = Path(tempfile.mkdtemp(prefix="cloud-dump-rootdir-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def owners_under(*roots: Path) -> set[tuple[int, int]]:
    """(uid, gid) of every entry under each root, the roots included, links not followed."""
    found = set()
    for root in roots:
        for path in [root, *root.rglob("*")]:
            st = path.lstat()
            found.add((st.st_uid, st.st_gid))
    return found


def restore(
    archived: Archived, pgdata: Path, tablespace: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return run_cli("restore", "--name", "b", "--pgdata", str(pgdata),
                   "--tablespace-mapping", f"{archived.tablespace}={tablespace}", *extra,
                   env={**archived.target.env, "CLOUD_DUMP_EXECUTABLE": str(archived.launcher)})


def test_root_restore_gives_everything_to_the_parents_owner_and_recovery_reads_its_config(
    archived: Archived,
) -> None:
    parent = make_postgres_dir("cloud-dump-root-")
    pgdata = parent / "new" / "data"  # "new" is created by the restore too
    ts_parent = make_postgres_dir("cloud-dump-root-tsnew-")
    tablespace = ts_parent / "ts"
    done = restore(archived, pgdata, tablespace, "--recovery-target", "latest")
    assert done.returncode == 0, done.stderr

    config = default_restore_config(pgdata)
    assert config.exists()
    assert owners_under(parent / "new", tablespace) == {(POSTGRES.pw_uid, POSTGRES.pw_gid)}
    assert (config.stat().st_mode & 0o777) == 0o600
    with started(15, pgdata, tablespace) as copy:  # its chown has nothing left to change
        wait_promoted(copy)
        assert copy.sql("SELECT count(*) FROM rows_ts") == [(150,)]


def test_root_restore_with_owner_into_a_root_directory_and_the_copy_starts(
    archived: Archived, root_owned_dir: Path
) -> None:
    pgdata, tablespace = root_owned_dir / "data", root_owned_dir / "ts"
    done = restore(archived, pgdata, tablespace, "--owner", "postgres:postgres")
    assert done.returncode == 0, done.stderr
    assert owners_under(pgdata, tablespace) == {(POSTGRES.pw_uid, POSTGRES.pw_gid)}
    with started(15, pgdata, tablespace) as copy:
        assert copy.sql("SELECT count(*) FROM rows_ts") == [(100,)]


def test_root_restore_into_a_root_directory_without_owner_warns_the_copy_cannot_start(
    archived: Archived, root_owned_dir: Path
) -> None:
    pgdata = root_owned_dir / "data"
    done = restore(archived, pgdata, root_owned_dir / "ts")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if ": warning: " in line]
    assert any("cannot run as root" in w and "--owner" in w for w in warnings), done.stderr
    assert owners_under(pgdata) == {(0, 0)}


@pytest.mark.parametrize(("owner", "named"), [
    ("no-such-user-cd9", "no user 'no-such-user-cd9'"),
    ("postgres:no-such-group-cd9", "no group 'no-such-group-cd9'"),
])  # fmt: skip
def test_restore_with_an_unknown_owner_is_refused_before_anything_is_written(
    archived: Archived, root_owned_dir: Path, owner: str, named: str
) -> None:
    done = restore(archived, root_owned_dir / "data", root_owned_dir / "ts", "--owner", owner)
    assert done.returncode == ExitCode.CONFIG, done.stderr
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and named in errors[0], done.stderr
    assert list(root_owned_dir.iterdir()) == []


def test_restore_not_run_as_root_refuses_to_give_files_to_another_user(
    archived: Archived,
) -> None:
    parent = make_postgres_dir("cloud-dump-notroot-")
    done = subprocess.run(
        as_postgres([str(VENV_BIN / "cloud-dump"), "restore", "--name", "b",
                     "--pgdata", str(parent / "data"), "--owner", "root"]),
        capture_output=True, text=True, cwd="/", check=False, timeout=120,
        env={**os.environ, **archived.target.env},
    )  # fmt: skip
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert "only root can give restored files to another user" in done.stderr
    assert list(parent.iterdir()) == []


def test_a_target_its_user_cannot_write_is_refused_naming_it_before_any_download(
    archived: Archived, root_owned_dir: Path
) -> None:
    """Restored as postgres into an empty directory of root (0755): exit 16 naming that
    directory, before a byte is fetched (it used to fail at the first subdirectory it made)."""
    tablespace = make_postgres_dir("cloud-dump-notroot-ts-") / "ts"
    done = subprocess.run(
        as_postgres([str(VENV_BIN / "cloud-dump"), "restore", "--name", "b",
                     "--pgdata", str(root_owned_dir),
                     "--tablespace-mapping", f"{archived.tablespace}={tablespace}"]),
        capture_output=True, text=True, cwd="/", check=False, timeout=120,
        env={**os.environ, **archived.target.env},
    )  # fmt: skip
    assert done.returncode == ExitCode.LOCAL_IO, done.stderr
    error = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and f"'{root_owned_dir}'" in error[0], done.stderr
    assert "permission denied" in error[0].lower(), done.stderr
    assert list(root_owned_dir.iterdir()) == []
