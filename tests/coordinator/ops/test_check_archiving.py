"""``cloud-dump check --db-url``: a forced WAL switch, and the wait for its segment in the archive,
against real servers archiving through ``cloud-dump wal-push`` (or failing to)."""

from __future__ import annotations

from pathlib import Path

import pytest

from devrig.moto import StorageTarget
from devrig.postgres import PgCluster, PgFactory
from devrig.procs import free_port
from devrig.recovery import archive_command, archive_store, wait_archived
from devrig.services import error_line, run_cli


@pytest.fixture(scope="module")
def archive() -> StorageTarget:
    return archive_store()


@pytest.fixture(scope="module")
def archiving(pg_factory: PgFactory, archive: StorageTarget) -> PgCluster:
    """A primary whose archive_command is ``cloud-dump wal-push`` into ``archive``."""
    return pg_factory(15, archive_command=archive_command(archive))


def check(cluster: PgCluster, target: StorageTarget, *extra: str) -> tuple[int, str, str]:
    result = run_cli("check", "--storage", target.url, "--db-url", cluster.replication_url(),
                     "--timeout", "60", *extra)
    return result.returncode, result.stdout, result.stderr


def test_a_role_that_may_not_switch_wal_is_told_how_to_allow_it(
    archiving: PgCluster, archive: StorageTarget,
) -> None:
    archiving.sql(f"REVOKE EXECUTE ON FUNCTION pg_switch_wal() FROM {archiving.repl_user}")
    code, _, stderr = check(archiving, archive)
    assert code == 3, stderr
    line = error_line(stderr)
    assert f"GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {archiving.repl_user}" in line
    assert archiving.repl_password not in stderr


def test_passes_when_the_switched_segment_reaches_the_archive(
    archiving: PgCluster, archive: StorageTarget,
) -> None:
    archiving.sql(f"GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {archiving.repl_user}")
    before = archiving.sql("SELECT archived_count FROM pg_stat_archiver")[0][0]
    code, stdout, stderr = check(archiving, archive)
    assert code == 0, stderr
    segment = stdout.split("WAL archiving: ok (")[1].split()[0]
    # The segment check waited for is one the server archived, and is in the store.
    assert archiving.sql("SELECT archived_count FROM pg_stat_archiver")[0][0] > before
    stored = [p.name for p in (Path(archive.url.removeprefix("file://")) / "wal_archive").iterdir()]
    assert any(name.startswith(segment) for name in stored), stored
    # Again at once: the switch finds a fresh segment each time, never one archived before.
    code, again, stderr = check(archiving, archive)
    assert code == 0, stderr
    assert again.split("WAL archiving: ok (")[1].split()[0] > segment


def test_an_archive_command_storing_elsewhere_is_named(
    archiving: PgCluster, archive: StorageTarget,
) -> None:
    archiving.sql(f"GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {archiving.repl_user}")
    elsewhere = archive_store()
    result = run_cli("check", "--storage", elsewhere.url, "--db-url", archiving.replication_url(),
                     "--timeout", "5")
    assert result.returncode == 19, result.stderr
    line = error_line(result.stderr)
    assert elsewhere.url in line
    assert "stores somewhere else" in line


def test_an_archive_holding_another_systems_segment_is_not_taken_for_this_ones(
    pg_factory: PgFactory, archiving: PgCluster, archive: StorageTarget,
) -> None:
    other = pg_factory(15, archive_command=archive_command(archive_store()))
    other.sql(f"GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {other.repl_user}")
    upcoming = str(other.sql("SELECT pg_walfile_name(pg_current_wal_lsn())")[0][0])
    # The shared archive holds that name already, from the other system.
    while (archiving.sql("SELECT last_archived_wal FROM pg_stat_archiver")[0][0] or "") < upcoming:
        wait_archived(archiving)
    code, _, stderr = check(other, archive)
    assert code == 19, stderr
    line = error_line(stderr)
    assert f"of system {archiving.system_identifier()}" in line
    assert f"({other.system_identifier()})" in line


def test_a_failing_archive_command_is_reported_before_the_timeout(
    pg_factory: PgFactory,
) -> None:
    failing = pg_factory(15, archive_command="false")
    failing.sql(f"GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {failing.repl_user}")
    # A timeout the run never gets near: the failure PostgreSQL reports ends the wait.
    code, _, stderr = check(failing, archive_store(), "--timeout", "600")
    assert code == 19, stderr
    assert "archive_command failed for 0000000100000000000000" in error_line(stderr)


def test_archive_mode_off_is_refused_without_switching(
    pg15: PgCluster, archive: StorageTarget,
) -> None:
    # The segment, not the LSN: an idle server still writes a record now and then (the
    # background writer's running-transactions record every 15 s); a switch starts a segment.
    segment = "SELECT pg_walfile_name(pg_current_wal_lsn())"
    before = pg15.sql(segment)[0][0]
    code, _, stderr = check(pg15, archive)
    assert code == 3, stderr
    assert "archive_mode is off" in error_line(stderr)
    assert pg15.sql(segment)[0][0] == before


def test_an_unreachable_server_is_exit_9_without_its_password(archive: StorageTarget) -> None:
    url = f"postgres://repl:s3cret-pw@127.0.0.1:{free_port()}/postgres?replication=yes"
    result = run_cli("check", "--storage", archive.url, "--db-url", url)
    assert result.returncode == 9, result.stderr
    assert "cannot connect to postgres at 127.0.0.1" in error_line(result.stderr)
    assert "s3cret-pw" not in result.stderr + result.stdout


@pytest.mark.parametrize("port", ["54x2", "70000", "0"])
def test_a_malformed_port_is_a_configuration_error(archive: StorageTarget, port: str) -> None:
    url = f"postgres://repl:s3cret-pw@127.0.0.1:{port}/postgres"
    for command in (["check", "--storage", archive.url], ["backup", "--name", "b"]):
        result = run_cli(*command, "--db-url", url, env=archive.env)
        assert result.returncode == 3, result.stderr
        assert f"invalid port '{port}'" in error_line(result.stderr)
        assert "s3cret-pw" not in result.stderr


def test_db_url_needs_a_storage_to_look_in(archiving: PgCluster) -> None:
    result = run_cli("check", "--db-url", archiving.replication_url(),
                     env={"CLOUD_DUMP_STORAGE": ""})
    assert result.returncode == 3, result.stderr
    assert "--db-url needs --storage" in error_line(result.stderr)
