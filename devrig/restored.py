"""Starting a cluster from a restored data directory, as an operator would after a restore.

The restored directory carries the source's postgresql.conf (its port, its socket directory),
so the server is started with a free port and its own socket directory on the command line.
Tests run as root: the restored files are handed to the postgres user first.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg

from devrig.pgbin import bin_dir
from devrig.postgres import as_postgres, make_postgres_dir
from devrig.procs import free_port, log_tail


def chown_postgres(*paths: Path) -> None:
    for path in paths:
        subprocess.run(["chown", "-R", "postgres:postgres", str(path)], check=True)


class RestoredCluster:
    def __init__(self, major: int, datadir: Path, *extra_dirs: Path) -> None:
        self.major = major
        self.datadir = datadir
        self.port = free_port()
        self.socket_dir = make_postgres_dir("cloud-dump-restored-sock-")
        self.log_path = self.socket_dir / "server.log"
        chown_postgres(datadir, *extra_dirs)

    def start(self, timeout_s: int = 120, settings: dict[str, str] | None = None) -> None:
        """Start; ``settings`` (e.g. archive_command, listen_addresses) override the defaults:
        no TCP listener and no archiving, so a copy never writes into its source's archive."""
        wanted = {"listen_addresses": "", "archive_mode": "off", **(settings or {})}
        options = f"-p {self.port} -k {self.socket_dir} " + " ".join(
            f"-c {key}={shlex.quote(value)}" for key, value in wanted.items()
        )
        done = subprocess.run(
            as_postgres([str(bin_dir(self.major) / "pg_ctl"), "start", "-w", "-t", str(timeout_s),
                         "-D", str(self.datadir), "-l", str(self.log_path), "-o", options]),
            capture_output=True, text=True, cwd=self.socket_dir, check=False,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"restored cluster did not start: {done.stdout}{done.stderr}\n"
                f"{log_tail(self.log_path)}"
            )

    def sql(self, query: str, dbname: str = "postgres") -> list[tuple[object, ...]]:
        dsn = f"host={self.socket_dir} port={self.port} user=postgres dbname={dbname}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            cursor = conn.execute(query.encode())
            return list(cursor.fetchall()) if cursor.description is not None else []

    def stop(self) -> None:
        subprocess.run(
            as_postgres([str(bin_dir(self.major) / "pg_ctl"), "stop", "-m", "immediate", "-w",
                         "-D", str(self.datadir)]),
            capture_output=True, cwd=self.socket_dir, check=False,
        )
        shutil.rmtree(self.socket_dir, ignore_errors=True)


@contextlib.contextmanager
def started(major: int, datadir: Path, *extra_dirs: Path,
            settings: dict[str, str] | None = None) -> Iterator[RestoredCluster]:
    cluster = RestoredCluster(major, datadir, *extra_dirs)
    cluster.start(settings=settings)
    try:
        yield cluster
    finally:
        cluster.stop()
