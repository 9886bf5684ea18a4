"""Helpers for restores that recover: an archive both root and the postgres user reach, clusters
archiving into it with ``cloud-dump wal-push``, restores through the CLI, and restored clusters
started as an operator would (their own configuration, nothing overridden but port and socket).
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from coordinator.restore.restoreconfig import default_restore_config
from coordinator.wait import wait_until
from devrig.launcher import postgres_cloud_dump
from devrig.moto import StorageTarget
from devrig.pgbin import bin_dir
from devrig.postgres import PgCluster, PgFactory, as_postgres, make_postgres_dir
from devrig.procs import log_tail
from devrig.restored import RestoredCluster, chown_postgres
from devrig.services import run_cli
from storage.options import StorageOptions
from storage.walnames import format_lsn, parse_lsn

PROMOTION_TIMEOUT_S = 120


def archive_store() -> StorageTarget:
    """A local store whose WAL prefix the postgres user (wal-push) can write."""
    root = make_postgres_dir("cloud-dump-rec-store-")
    (root / "wal_archive").mkdir()
    chown_postgres(root / "wal_archive")
    url = f"file://{root}"
    return StorageTarget("local", url, StorageOptions(), {"CLOUD_DUMP_STORAGE": url})


def archive_command(target: StorageTarget, *extra: str) -> str:
    """``cloud-dump wal-push`` with its settings in a 0600 file of postgres, as in the README."""
    config = make_postgres_dir("cloud-dump-rec-conf-") / "archive.conf"
    config.write_text("".join(f'{k}="{v}"\n' for k, v in target.env.items()))
    config.chmod(0o600)
    chown_postgres(config)
    words = [str(postgres_cloud_dump()), "wal-push", "%p", "%f", "--config", str(config), *extra]
    return " ".join(shlex.quote(w) if w not in ("%p", "%f") else w for w in words)


def archiving_cluster(pg_factory: PgFactory, major: int, target: StorageTarget) -> PgCluster:
    return pg_factory(major, archive_command=archive_command(target))


def wait_archived(cluster: PgCluster | RestoredCluster) -> None:
    """Switch WAL and wait until the segment holding everything so far is archived."""
    # The last byte of WAL written: pg_switch_wal() returns the end of the segment it completed,
    # or, with nothing written since the last switch, the start of the current one. (At a
    # segment's start, pg_walfile_name(pg_current_wal_lsn()) names the empty segment on 17.)
    end = parse_lsn(str(cluster.sql("SELECT pg_switch_wal()")[0][0]))
    wanted = cluster.sql(f"SELECT pg_walfile_name('{format_lsn(end - 1)}')")[0][0]
    failed: list[object] = [None]

    def archived() -> bool:
        last_archived, failed[0] = cluster.sql(
            "SELECT last_archived_wal, last_failed_wal FROM pg_stat_archiver")[0]
        return last_archived is not None and str(last_archived)[:24] >= str(wanted)

    if not wait_until(archived, timeout_s=60, first_s=0.2):
        raise AssertionError(f"segment {wanted} not archived (last failed: {failed[0]})")


def wait_promoted(cluster: RestoredCluster) -> None:
    if not wait_until(lambda: not cluster.sql("SELECT pg_is_in_recovery()")[0][0],
                      timeout_s=PROMOTION_TIMEOUT_S, first_s=0.2):
        raise AssertionError(f"never promoted:\n{log_tail(cluster.log_path)}")


def restore(target: StorageTarget, name: str, *flags: str, pgdata: Path | None = None
            ) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """``cloud-dump restore`` into ``pgdata`` (default: a new directory); the default restore
    config handed to postgres."""
    pgdata = pgdata or make_postgres_dir("cloud-dump-rec-restore-") / "data"
    done = run_cli("restore", "--name", name, "--pgdata", str(pgdata), *flags,
                   env={**target.env, "CLOUD_DUMP_EXECUTABLE": str(postgres_cloud_dump())})
    config = default_restore_config(pgdata)
    if config.exists():
        chown_postgres(config)
    return pgdata, done


def active_settings(pgdata: Path) -> dict[str, str]:
    """The ``name = 'value'`` lines of postgresql.auto.conf that are not comments, last one
    winning, unquoted as ALTER SYSTEM quotes them."""
    values = {}
    for line in (pgdata / "postgresql.auto.conf").read_text().splitlines():
        name, sep, value = line.partition(" = ")
        if sep and not line.lstrip().startswith("#"):
            values[name.strip()] = value.strip()[1:-1].replace("''", "'").replace("\\\\", "\\")
    return values


class ConfiguredCluster(RestoredCluster):
    """A restored cluster started with its own configuration: only port and socket are set, so
    archive_mode, archive_command and recovery settings are what the data directory says."""

    def start(self, timeout_s: int = 120, settings: dict[str, str] | None = None) -> None:
        options = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=''" + "".join(
            f" -c {key}={shlex.quote(value)}" for key, value in (settings or {}).items()
        )
        done = subprocess.run(
            as_postgres([str(bin_dir(self.major) / "pg_ctl"), "start", "-w", "-t", str(timeout_s),
                         "-D", str(self.datadir), "-l", str(self.log_path), "-o", options]),
            capture_output=True, text=True, cwd=self.socket_dir, check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"cluster did not start: {done.stdout}{done.stderr}\n"
                                 f"{log_tail(self.log_path)}")


@contextmanager
def started_as_configured(major: int, datadir: Path, settings: dict[str, str] | None = None
                          ) -> Iterator[ConfiguredCluster]:
    cluster = ConfiguredCluster(major, datadir)
    cluster.start(settings=settings)
    try:
        yield cluster
    finally:
        cluster.stop()
