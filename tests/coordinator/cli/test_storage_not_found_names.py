"""Messages about a backup that is not where it was looked for name the place looked in.

"backup 'b1' not found in file:///srv/store" sends an operator who typed ``--cluster pg15mian``
looking in the right store for the wrong reason. ``restore``'s "not found", ``list``'s empty
table, ``backup``'s "already exists" and wal-fetch's "not in the archive" name the full
location: the storage URL with the cluster's prefix, and the cluster (or the flat layout).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from devrig.moto import StorageTarget, local_target
from devrig.postgres import PgCluster
from devrig.services import error_line, run_cli
from devrig.walarchive import SEGMENT, archive_wal, segment_name, wal_fetch
from devrig.walfiles import SYSID_A, make_segment
from storage.layout import Layout

CLUSTER = "pg15main"


@pytest.fixture(scope="module")
def store(pg15: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageTarget]:
    """A store holding backup 'b1' of cluster 'pg15main'."""
    target = local_target(tmp_path_factory.mktemp("named") / "store")
    done = run_cli("backup", "--name", "b1", "--cluster", CLUSTER, "--db-url",
                   pg15.replication_url(), "--no-progress", env=target.env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    yield target


@pytest.mark.parametrize(
    ("flags", "where"),
    [
        (["--cluster", "pg15mian"], "'{url}/pg15mian/backup/' (cluster 'pg15mian')"),
        ([], "'{url}/' (flat layout: no cluster)"),
        (["--cluster", CLUSTER, "--recovery-target", "latest"],
         f"'{{url}}/{CLUSTER}/backup/' (cluster '{CLUSTER}')"),
    ],
    ids=["mistyped-cluster", "cluster-forgotten", "other-name-in-the-cluster"],
)
def test_restore_of_a_backup_not_there_names_the_full_location_looked_in(
    store: StorageTarget, tmp_path: Path, flags: list[str], where: str
) -> None:
    name = "b2" if "--recovery-target" in flags else "b1"
    done = run_cli("restore", "--name", name, "--pgdata", str(tmp_path / "copy"), *flags,
                   env=store.env)  # fmt: skip
    assert done.returncode == ExitCode.BACKUP_NOT_FOUND, done.stderr
    line = error_line(done.stderr)
    assert f"backup '{name}' not found in {where.format(url=store.url)}" in line, line
    assert f"no '{name}/manifest.json' there" in line
    assert not (tmp_path / "copy").exists()


def test_list_of_a_location_without_backups_names_it(store: StorageTarget) -> None:
    done = run_cli("list", "--cluster", "pg15mian", env=store.env)
    assert done.returncode == 0, done.stderr
    assert f"(no backups in '{store.url}/pg15mian/backup/' (cluster 'pg15mian'))" in done.stdout
    done = run_cli("list", "--cluster", CLUSTER, env=store.env)
    assert done.returncode == 0, done.stderr
    assert "b1 " in done.stdout and "no backups" not in done.stdout


def test_backup_under_a_taken_name_names_the_location(
    store: StorageTarget, pg15: PgCluster
) -> None:
    done = run_cli("backup", "--name", "b1", "--cluster", CLUSTER, "--db-url",
                   pg15.replication_url(), "--no-progress", env=store.env)  # fmt: skip
    assert done.returncode == ExitCode.BACKUP_EXISTS, done.stderr
    line = error_line(done.stderr)
    assert f"backup 'b1' already exists in '{store.url}/{CLUSTER}/backup/' (cluster " \
           f"'{CLUSTER}')" in line, line


def test_wal_fetch_of_a_file_not_archived_names_the_archive(
    store: StorageTarget, pgdata: Path
) -> None:
    archive_wal(store.open(), Layout(cluster=CLUSTER), SEGMENT,
                make_segment(SYSID_A, 670, SEGMENT))
    missing = segment_name(0x42)
    done = wal_fetch(store, pgdata, missing, "--cluster", CLUSTER, "--prefetch", "0")
    assert done.returncode == 1, done.stderr
    assert f"'{missing}' is not in the archive at '{store.url}/{CLUSTER}/wal_archive/'" \
        in done.stderr
