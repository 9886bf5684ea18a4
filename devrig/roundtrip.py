"""Back up and restore through the CLI, then compare the restored cluster's rows."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from devrig import sample
from devrig.moto import StorageTarget
from devrig.postgres import PgCluster, make_postgres_dir
from devrig.restored import started
from devrig.services import VENV_BIN, RedisServer, run_cli


def backup_cli(cluster: PgCluster, target: StorageTarget, name: str, *extra: str,
               broker: RedisServer | None = None) -> None:
    args = ["backup", "--name", name, "--db-url", cluster.replication_url(),
            "--part-size-mib", "5", "--no-progress", *extra]
    if broker is not None:
        args += ["--broker", broker.url]
    result = run_cli(*args, env=target.env)
    assert result.returncode == 0, result.stderr


def start_backup(cluster: PgCluster, target: StorageTarget, broker_url: str, name: str,
                 *extra: str) -> subprocess.Popen[str]:
    """A backup through the workers of ``broker_url``, in 5 MiB parts, left running."""
    argv = [str(VENV_BIN / "cloud-dump"), "backup", "--name", name, "--db-url",
            cluster.replication_url(), "--broker", broker_url, "--part-size-mib", "5",
            "--compression", "none", "--no-progress", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **target.env})


def restore_cli(target: StorageTarget, name: str, pgdata: Path, *extra: str) -> None:
    result = run_cli("restore", "--name", name, "--pgdata", str(pgdata), *extra, env=target.env)
    assert result.returncode == 0, result.stderr


def restore_and_compare(cluster: PgCluster, target: StorageTarget, name: str,
                        tablespace: Path, expected: dict[str, str], *extra: str) -> None:
    pgdata = make_postgres_dir("cloud-dump-restore-") / "data"
    new_tablespace = make_postgres_dir("cloud-dump-restore-ts-")
    restore_cli(target, name, pgdata, "--tablespace-mapping", f"{tablespace}={new_tablespace}",
                *extra)
    assert not (pgdata / "recovery.signal").exists()
    with started(cluster.major, pgdata, new_tablespace) as restored:
        assert sample.digest(restored.sql) == expected
        location = restored.sql("SELECT pg_tablespace_location(oid) FROM pg_tablespace "
                                "WHERE spcname = 'ts'")
        assert location == [(str(new_tablespace),)]
