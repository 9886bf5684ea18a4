"""Real PostgreSQL clusters for the tests: ``PgCluster`` and the ``pg_factory`` / ``pg15`` fixtures.

A cluster lives in its own directory under /tmp (pytest's tmp_path is not reachable by the
``postgres`` OS user), listens on 127.0.0.1 on a free port and on a unix socket in that directory,
and runs as ``postgres`` because initdb refuses root. Authentication: the superuser ``postgres``
over the unix socket (trust), and a ``repl`` role with REPLICATION LOGIN and a random password over
TCP (scram-sha-256), which is what the backup coordinator uses.

We stop only the server we started: ``pg_ctl stop``, then SIGKILL of the postmaster whose PID we
recorded at start. A cluster that cannot start fails the test with the server log tail.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo

from coordinator.wait import wait_until
from devrig import pgbin
from devrig.procs import free_port, log_tail

OS_USER = "postgres"
SUPERUSER = "postgres"
REPLICATION_USER = "repl"
SUPPORTED_MAJORS = (13, 14, 15, 16, 17, 18)
# `make test` runs these majors; the others carry the `matrix` mark (`make test-matrix`).
DEFAULT_MAJORS = (13, 15, 17)


def majors(default: Sequence[int] = DEFAULT_MAJORS) -> list[Any]:
    """Every supported major as a parametrize value, those outside ``default`` marked matrix."""
    return [
        major if major in default else pytest.param(major, marks=pytest.mark.matrix)
        for major in SUPPORTED_MAJORS
    ]
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
# free_port() can race with another process taking the port before the postmaster binds it.
START_ATTEMPTS = 3

SettingValue = str | int | float | bool


class PgClusterError(RuntimeError):
    """The cluster could not be initialised or started; the message carries the log tail."""


def as_postgres(argv: Sequence[str]) -> list[str]:
    """``argv`` run as the ``postgres`` OS user when we are root, unchanged otherwise."""
    if os.geteuid() == 0:
        return ["runuser", "-u", OS_USER, "--", *argv]
    return list(argv)


_SCRATCH: list[Path] = []  # this process's scratch root, once made
# Directories made in it, by the scope whose end removes them.
_TEST_DIRS: dict[str, list[Path]] = {"session": [], "module": [], "function": []}
# The scopes of the fixtures being set up right now, innermost last (pytest_fixture_setup).
_SETTING_UP: list[str] = []
_SCOPE_END = {"session": "session", "package": "session", "module": "module", "class": "module",
              "function": "function"}  # fmt: skip


def scratch_root() -> Path:
    """This test session's directory under /tmp, removed when the session ends.

    pytest's tmp_path is out of the ``postgres`` user's reach (0700, root's), so servers, their
    archives and restored copies live here instead; the root is 0711, so postgres reaches what
    is inside without listing it, and the directories made in it keep /tmp's role of a parent
    that root owns.
    """
    if not _SCRATCH:
        root = Path(tempfile.mkdtemp(prefix="cloud-dump-tests-", dir="/tmp"))
        root.chmod(0o711)
        _SCRATCH.append(root)
        # bench/ and the demo use the rig outside pytest: the process's exit removes it there.
        atexit.register(shutil.rmtree, root, True)
    return _SCRATCH[0]


def make_test_dir(prefix: str, *, lifetime: str | None = None) -> Path:
    """A new directory in the session's scratch root (root's, 0700), removed when the scope
    that made it ends: the test, or the module or session of the fixture being set up (a full
    run left gigabytes of restored copies behind, and CI machines have little disk).
    ``lifetime`` "session" keeps it to the end whoever asks (a server pg_factory keeps)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_root()))
    scope = lifetime or (_SETTING_UP[-1] if _SETTING_UP else "function")
    _TEST_DIRS[_SCOPE_END.get(scope, "session")].append(path)
    return path


def make_postgres_dir(prefix: str, *, lifetime: str | None = None) -> Path:
    """A new directory that the ``postgres`` OS user owns (e.g. an archive target), removed as
    ``make_test_dir``'s are."""
    path = make_test_dir(prefix, lifetime=lifetime)
    if os.geteuid() == 0:
        entry = pwd.getpwnam(OS_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(0o700)
    return path


def _remove_dirs(scope: str) -> None:
    made = _TEST_DIRS[scope]
    while made:
        shutil.rmtree(made.pop(), ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any]) -> Iterator[None]:
    _SETTING_UP.append(fixturedef.scope)
    try:
        yield
    finally:
        _SETTING_UP.pop()


@pytest.fixture(scope="session", autouse=True)
def _scratch_session() -> Iterator[None]:
    """Removes the scratch root once every session fixture (servers included) is torn down:
    requested first, it is finalized last."""
    yield
    _remove_dirs("session")
    for root in _SCRATCH:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _scratch_module() -> Iterator[None]:
    yield
    _remove_dirs("module")


@pytest.fixture(autouse=True)
def _scratch_test() -> Iterator[None]:
    yield
    _remove_dirs("function")


def format_setting(value: SettingValue) -> str:
    """A postgresql.conf value: booleans as on/off, numbers bare, strings single-quoted."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


HBA_LINES = (
    "local all all trust",
    "host all all 127.0.0.1/32 scram-sha-256",
    "host replication all 127.0.0.1/32 scram-sha-256",
)


class PgCluster:
    """One initialised PostgreSQL cluster of ``major``; ``start()`` and ``stop()`` it.

    The constructor creates the directory, runs initdb and writes the configuration.
    ``archive_command`` turns on ``archive_mode``; ``settings`` are appended last and win.
    """

    def __init__(
        self,
        major: int,
        archive_command: str | None = None,
        settings: Mapping[str, SettingValue] | None = None,
    ) -> None:
        self.major = major
        self.bin_dir = pgbin.bin_dir(major)
        # pg_factory keeps its servers to the end of the session, and removes them itself.
        self.base_dir = make_postgres_dir(f"cloud-dump-pg{major}-", lifetime="session")
        self.datadir = self.base_dir / "data"
        self.socket_dir = self.base_dir
        self.log_path = self.base_dir / "server.log"
        self.port = free_port()
        self.repl_user = REPLICATION_USER
        self.repl_password = secrets.token_urlsafe(24)
        self.archive_command = archive_command
        self.extra_settings: dict[str, SettingValue] = dict(settings or {})
        self.postmaster_pid: int | None = None
        self._initdb()
        self._write_config()

    def __repr__(self) -> str:
        # No password here: reprs end up in assertion messages and logs.
        return f"PgCluster(major={self.major}, port={self.port}, datadir={self.datadir})"

    def __enter__(self) -> PgCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # --- lifecycle ---------------------------------------------------------------------------

    def _run_as_postgres(
        self, argv: Sequence[str], log_path: Path
    ) -> subprocess.CompletedProcess[bytes]:
        with log_path.open("ab") as log:
            return subprocess.run(
                as_postgres(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,  # root's cwd may be unreadable to postgres
                check=False,
            )

    def _initdb(self) -> None:
        initdb_log = self.base_dir / "initdb.log"
        done = self._run_as_postgres(
            [
                str(self.bin_dir / "initdb"),
                "-D", str(self.datadir),
                "-U", SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E", "UTF8",
                "--locale=C",
                "--data-checksums",
            ],
            initdb_log,
        )  # fmt: skip
        if done.returncode != 0:
            raise PgClusterError(
                f"initdb for postgres {self.major} failed with status {done.returncode}; "
                f"log {initdb_log}:\n{log_tail(initdb_log)}"
            )

    def _settings(self) -> dict[str, SettingValue]:
        settings: dict[str, SettingValue] = {
            "listen_addresses": "127.0.0.1",
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
            "wal_level": "replica",
            "max_wal_senders": 10,
            # PG 13 still defaults to md5, and the repl role is created with a SCRAM verifier.
            "password_encryption": "scram-sha-256",
        }
        if self.archive_command is not None:
            settings["archive_mode"] = True
            settings["archive_command"] = self.archive_command
        settings.update(self.extra_settings)
        return settings

    def _write_config(self) -> None:
        lines = [f"{name} = {format_setting(value)}" for name, value in self._settings().items()]
        conf = self.datadir / "postgresql.conf"
        # Appended: PostgreSQL takes the last occurrence of a setting.
        with conf.open("a") as f:
            f.write("\n# cloud-dump test rig\n" + "\n".join(lines) + "\n")
        (self.datadir / "pg_hba.conf").write_text("\n".join(HBA_LINES) + "\n")

    def _set_port(self, port: int) -> None:
        self.port = port
        with (self.datadir / "postgresql.conf").open("a") as f:
            f.write(f"port = {port}\n")

    def start(self) -> None:
        """Start the server (again, after ``stop``) and create the replication role if it is
        missing; PgClusterError with the log tail."""
        for attempt in range(1, START_ATTEMPTS + 1):
            if self._pg_ctl_start():
                break
            if attempt == START_ATTEMPTS or not self._lost_port_race():
                self._kill_own_postmaster()
                raise PgClusterError(
                    f"postgres {self.major} did not start on port {self.port}; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            self._set_port(free_port())
        self.postmaster_pid = self._read_postmaster_pid()
        self._create_replication_role()

    def _pg_ctl_start(self) -> bool:
        done = self._run_as_postgres(
            [
                str(self.bin_dir / "pg_ctl"),
                "start", "-w", "-t", str(START_TIMEOUT_S),
                "-D", str(self.datadir),
                "-l", str(self.log_path),
            ],
            self.base_dir / "pg_ctl.log",
        )  # fmt: skip
        return done.returncode == 0

    def _lost_port_race(self) -> bool:
        return "could not bind" in log_tail(self.log_path, lines=20)

    def _read_postmaster_pid(self) -> int | None:
        """The PID on the first line of this cluster's own postmaster.pid, if there is one."""
        try:
            first = (self.datadir / "postmaster.pid").read_text().splitlines()[0]
            return int(first)
        except (OSError, IndexError, ValueError):
            return None

    def _create_replication_role(self) -> None:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.repl_user,))
            if exists.fetchone() is not None:  # started again after a stop
                return
            # Only the SCRAM verifier travels to the server: the password itself can never
            # appear in the server log (e.g. in an error report quoting the statement).
            verifier = conn.pgconn.encrypt_password(
                self.repl_password.encode(), self.repl_user.encode(), b"scram-sha-256"
            ).decode()
            conn.execute(
                pgsql.SQL("CREATE ROLE {} WITH REPLICATION LOGIN PASSWORD {}").format(
                    pgsql.Identifier(self.repl_user), pgsql.Literal(verifier)
                )
            )

    def stop(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Stop the server (``pg_ctl stop -m mode``), or SIGKILL our own postmaster if that
        fails."""
        if self._read_postmaster_pid() is None:
            return
        done = self._run_as_postgres(
            [
                str(self.bin_dir / "pg_ctl"),
                "stop", "-m", mode, "-w", "-t", str(STOP_TIMEOUT_S),
                "-D", str(self.datadir),
            ],
            self.base_dir / "pg_ctl.log",
        )  # fmt: skip
        if done.returncode != 0:
            self._kill_own_postmaster()

    def _kill_own_postmaster(self) -> None:
        """SIGKILL the postmaster of this datadir and its backends, and nothing else.

        pg_ctl starts the postmaster in a new session, so its process group is exactly the server
        (postmaster and backends). We signal the group only when it is led by that PID.
        """
        pid = self._read_postmaster_pid()
        if pid is None or (self.postmaster_pid is not None and pid != self.postmaster_pid):
            return
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, timeout_s=10.0)

    def destroy(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Stop the server (``pg_ctl stop -m mode``) and remove its directory."""
        self.stop(mode)
        shutil.rmtree(self.base_dir, ignore_errors=True)

    # --- connections -------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres") -> str:
        """Conninfo for the superuser over the unix socket."""
        return make_conninfo(
            host=str(self.socket_dir), port=self.port, user=SUPERUSER, dbname=dbname
        )

    def replication_dsn(self) -> str:
        """Conninfo for a physical replication connection as ``repl`` over TCP."""
        return make_conninfo(
            host="127.0.0.1",
            port=self.port,
            user=self.repl_user,
            password=self.repl_password,
            dbname="postgres",
            replication="true",
        )

    def replication_url(self) -> str:
        """The same as a URL, the form the CLI's ``--db-url`` takes."""
        return (
            f"postgres://{quote(self.repl_user, safe='')}:{quote(self.repl_password, safe='')}"
            f"@127.0.0.1:{self.port}/postgres?replication=yes"
        )

    def sql(
        self, query: str, params: Sequence[Any] | None = None, dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser in autocommit; its rows (empty if none)."""
        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            # bytes: psycopg types queries as LiteralString, and tests build theirs at run time.
            cur = conn.execute(query.encode(), params)
            return cur.fetchall() if cur.description is not None else []

    def system_identifier(self) -> int:
        return int(self.sql("SELECT system_identifier FROM pg_control_system()")[0][0])

    def server_version_num(self) -> int:
        return int(self.sql("SHOW server_version_num")[0][0])


def _wait_gone(pid: int, timeout_s: float) -> None:
    """Until ``pid`` is gone, or silently after ``timeout_s`` (it was sent SIGKILL already)."""

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(gone, timeout_s=timeout_s, first_s=0.05)


def start_cluster(
    major: int,
    archive_command: str | None = None,
    settings: Mapping[str, SettingValue] | None = None,
) -> PgCluster:
    """A started cluster, or the current test fails with the reason (never skips)."""
    try:
        cluster = PgCluster(major, archive_command=archive_command, settings=settings)
    except (PgClusterError, pgbin.FetchError) as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        cluster.start()
    except PgClusterError as exc:
        cluster.stop()  # the directory stays, with its logs, for a look after the failure
        pytest.fail(str(exc), pytrace=False)
    return cluster


PgFactory = Callable[..., PgCluster]


@pytest.fixture(scope="session")
def pg_factory() -> Iterator[PgFactory]:
    """``make(major, archive_command=None, settings=None)`` starts a cluster; all are removed
    at the end of the session."""
    started: list[PgCluster] = []

    def make(
        major: int,
        archive_command: str | None = None,
        settings: Mapping[str, SettingValue] | None = None,
    ) -> PgCluster:
        cluster = start_cluster(major, archive_command=archive_command, settings=settings)
        started.append(cluster)
        return cluster

    yield make
    # Immediate: nothing of these clusters is kept, and a fast shutdown runs the archiver's
    # last cycle, whose archive_command (a store or broker already gone by now) PostgreSQL
    # tries 3 times a second apart: ~4.4 s a cluster, minutes at the end of `make test`.
    for cluster in reversed(started):
        cluster.destroy("immediate")


@pytest.fixture(scope="session")
def pg15(pg_factory: PgFactory) -> PgCluster:
    """A PostgreSQL 15 cluster (Debian's build) shared by the session."""
    return pg_factory(15)
