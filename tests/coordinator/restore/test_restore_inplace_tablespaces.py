"""In-place tablespaces (``allow_in_place_tablespaces``, ``LOCATION ''``): backed up and restored
inside PGDATA on PostgreSQL 16+, refused by ``backup`` where BASE_BACKUP sends nothing of them
(13-15), and no tablespace location is ever resolved against restore's working directory.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from coordinator.restore.run import restore_backup
from devrig.moto import StorageTarget, local_target
from devrig.postgres import PgCluster, PgFactory, make_postgres_dir
from devrig.restored import started
from devrig.roundtrip import backup_cli
from devrig.services import VENV_BIN, error_line, run_cli
from storage.errors import IntegrityError
from tests.coordinator.restore.rawbackup import LAYOUT, RawBackup, stage_backup

IN_PLACE_ROWS = 1_500
SENDS_IN_PLACE = [16, 17, pytest.param(18, marks=pytest.mark.matrix)]
LOSES_IN_PLACE = [15, pytest.param(13, marks=pytest.mark.matrix),
                  pytest.param(14, marks=pytest.mark.matrix)]  # fmt: skip


def in_place_cluster(pg_factory: PgFactory, major: int) -> tuple[PgCluster, int]:
    """A cluster with a table in an in-place tablespace; the tablespace's oid."""
    cluster = pg_factory(major, settings={"allow_in_place_tablespaces": True})
    cluster.sql("CREATE TABLESPACE inplace LOCATION ''")
    cluster.sql("CREATE TABLE in_place TABLESPACE inplace AS "
                f"SELECT g AS id, md5(g::text) AS v FROM generate_series(1, {IN_PLACE_ROWS}) g")
    oid = int(cluster.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'inplace'")[0][0])
    return cluster, oid


def restore_from(cwd: Path, target: StorageTarget, *args: str) -> subprocess.CompletedProcess[str]:
    """``cloud-dump restore`` run from ``cwd``, as an operator in some directory would."""
    return subprocess.run(
        [str(VENV_BIN / "cloud-dump"), "restore", *args],
        capture_output=True, text=True, cwd=cwd, timeout=300, check=False,
        env={**os.environ, **target.env},
    )  # fmt: skip


@pytest.mark.parametrize("major", SENDS_IN_PLACE)
def test_in_place_tablespace_comes_back_as_a_directory_inside_pgdata(
    major: int, pg_factory: PgFactory, tmp_path: Path
) -> None:
    cluster, oid = in_place_cluster(pg_factory, major)
    # An ordinary tablespace beside it, remapped: both kinds in one restore.
    location = make_postgres_dir("cloud-dump-ts-")
    cluster.sql(f"CREATE TABLESPACE outside LOCATION '{location}'")
    cluster.sql("CREATE TABLE outside_rows TABLESPACE outside AS SELECT generate_series(1, 10) g")
    outside_oid = cluster.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'outside'")[0][0]
    expected = cluster.sql("SELECT count(*), md5(string_agg(v, '' ORDER BY id)) FROM in_place")
    target = local_target(tmp_path / "store")
    backup_cli(cluster, target, "b")

    scratch = make_postgres_dir("cloud-dump-cwd-")
    parent = make_postgres_dir("cloud-dump-inplace-")
    pgdata, new_location = parent / "data", make_postgres_dir("cloud-dump-ts-new-")
    done = restore_from(scratch, target, "--name", "b", "--pgdata", str(pgdata),
                        "--tablespace-mapping", f"{location}={new_location}")
    assert done.returncode == 0, done.stderr

    assert list(scratch.iterdir()) == [], "restore wrote into its working directory"
    assert [p.name for p in parent.iterdir()] == ["data"]
    in_place = pgdata / "pg_tblspc" / str(oid)
    assert in_place.is_dir() and not in_place.is_symlink()
    assert (pgdata / "pg_tblspc" / str(outside_oid)).readlink() == new_location
    map_oids = [line.split()[0] for line in (pgdata / "tablespace_map").read_text().splitlines()]
    assert map_oids == [str(outside_oid)]
    with started(major, pgdata, new_location) as restored:
        assert restored.sql(
            "SELECT count(*), md5(string_agg(v, '' ORDER BY id)) FROM in_place") == expected
        assert restored.sql(f"SELECT pg_tablespace_location({oid})") == [(f"pg_tblspc/{oid}",)]
        assert restored.sql("SELECT count(*) FROM outside_rows") == [(10,)]


@pytest.mark.parametrize("major", LOSES_IN_PLACE)
def test_backup_refuses_in_place_tablespace_where_postgres_sends_none_of_it(
    major: int, pg_factory: PgFactory, tmp_path: Path
) -> None:
    cluster, oid = in_place_cluster(pg_factory, major)
    target = local_target(tmp_path / "store")
    done = run_cli("backup", "--name", "b", "--db-url", cluster.replication_url(),
                   "--no-progress", env=target.env)
    assert done.returncode == ExitCode.DATABASE_ERROR, done.stderr
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and f"'inplace' (pg_tblspc/{oid})" in errors[0], done.stderr
    assert not (tmp_path / "store" / "b" / "manifest.json").exists()

    # A role admitted for replication only cannot be asked: refused, saying how to allow the
    # check, unless the operator vouches that there are none.
    hba = cluster.datadir / "pg_hba.conf"
    hba.write_text("local all all trust\nhost replication all 127.0.0.1/32 scram-sha-256\n")
    cluster.sql("SELECT pg_reload_conf()")
    done = run_cli("backup", "--name", "b2", "--db-url", cluster.replication_url(),
                   "--no-progress", env=target.env)
    assert done.returncode == ExitCode.DATABASE_ERROR, done.stderr
    line = error_line(done.stderr)
    assert "could not check" in line and "--allow-unchecked-tablespaces" in line
    assert "ordinary connection to database 'postgres'" in line
    assert not (tmp_path / "store" / "b2" / "manifest.json").exists()
    done = run_cli("backup", "--name", "b2", "--db-url", cluster.replication_url(),
                   "--no-progress", "--allow-unchecked-tablespaces", env=target.env)
    assert done.returncode == 0, done.stderr
    assert "could not check" in done.stderr and "backing up anyway" in done.stderr


@pytest.mark.parametrize(
    "location", ["ts1", "../ts1", "./pg_tblspc/99999", "pg_tblspc/{oid}/../../ts1"]
)
def test_restore_refuses_other_relative_tablespace_locations_and_writes_nothing_in_cwd(
    raw_backup: RawBackup,
    location: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = local_target(tmp_path / "store").open()
    stage_backup(storage, raw_backup, "rel",
                 tablespace_location=location.format(oid=raw_backup.tablespace_oid))
    scratch = tmp_path / "cwd"
    scratch.mkdir()
    monkeypatch.chdir(scratch)
    with pytest.raises(IntegrityError, match="relative location"):
        restore_backup(storage, LAYOUT, "rel", tmp_path / "data")
    assert list(scratch.iterdir()) == []
    assert not (tmp_path / "data").exists()
