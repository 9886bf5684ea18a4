"""The PostgreSQL test rig: binaries per major, clusters that accept replication logins, archiving.

Majors 13, 15 and 17 run by default; 14, 16 and 18 carry the ``matrix`` marker.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import pq

from coordinator.wait import wait_until
from devrig import pgbin
from devrig.postgres import PgCluster, PgFactory, majors, make_postgres_dir, start_cluster

MAJORS = majors()
WAL_SEGMENT_BYTES = 16 * 1024 * 1024


@pytest.fixture(scope="module", params=MAJORS, ids=lambda major: f"pg{major}")
def cluster(request: pytest.FixtureRequest, pg_factory: PgFactory) -> PgCluster:
    if request.param == 15:
        # The session's shared cluster: one fewer initdb.
        shared: PgCluster = request.getfixturevalue("pg15")
        return shared
    return pg_factory(request.param)


def identify_system(conninfo: str) -> tuple[str, int]:
    """(systemid, timeline) from IDENTIFY_SYSTEM on a physical replication connection.

    The walsender refuses the extended query protocol ("extended query protocol not supported
    in a replication connection"). Checked with psycopg 3.3: ``execute()`` WITH parameters uses
    it and fails that way; without parameters it sends a simple query and would work here, but
    the replication code talks to ``pgconn`` directly, as this does, to own the protocol.
    """
    with psycopg.connect(conninfo, autocommit=True) as conn:
        result = conn.pgconn.exec_(b"IDENTIFY_SYSTEM")
        assert result.status == pq.ExecStatus.TUPLES_OK, result.error_field(
            pq.DiagnosticField.MESSAGE_PRIMARY
        )
        systemid, timeline = result.get_value(0, 0), result.get_value(0, 1)
        assert systemid is not None and timeline is not None
        return systemid.decode(), int(timeline)


def test_replication_login_sees_the_superusers_system_identifier(cluster: PgCluster) -> None:
    systemid, timeline = identify_system(cluster.replication_dsn())

    assert int(systemid) == cluster.system_identifier()
    assert timeline == 1


def test_replication_url_form_connects(cluster: PgCluster) -> None:
    systemid, _ = identify_system(cluster.replication_url())

    assert int(systemid) == cluster.system_identifier()


def test_cluster_runs_the_requested_major(cluster: PgCluster) -> None:
    with psycopg.connect(cluster.replication_dsn(), autocommit=True) as conn:
        assert conn.info.server_version // 10000 == cluster.major
    assert cluster.server_version_num() // 10000 == cluster.major


def test_replication_login_with_wrong_password_is_refused(cluster: PgCluster) -> None:
    wrong = cluster.replication_dsn().replace(cluster.repl_password, "not-the-password")

    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, autocommit=True)


def test_replication_connection_refuses_extended_query_protocol(pg15: PgCluster) -> None:
    with (
        psycopg.connect(pg15.replication_dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.ProtocolViolation, match="extended query protocol"),
    ):
        conn.execute("SELECT %s", (1,))


@pytest.fixture
def archive_dir() -> Iterator[Path]:
    path = make_postgres_dir("cloud-dump-archive-")
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def test_archive_command_archives_a_switched_segment(archive_dir: Path) -> None:
    command = f"test ! -f {archive_dir}/%f && cp %p {archive_dir}/%f"
    with start_cluster(15, archive_command=command) as cluster:
        cluster.sql("CREATE TABLE t AS SELECT generate_series(1, 1000) AS n")
        segment = cluster.sql("SELECT pg_walfile_name(pg_switch_wal())")[0][0]

        wait_until_archived(cluster, segment, timeout_s=30.0)

        assert (archive_dir / segment).stat().st_size == WAL_SEGMENT_BYTES


def wait_until_archived(cluster: PgCluster, segment: str, timeout_s: float) -> None:
    """Wait for the server to report ``segment`` archived.

    The file alone is not proof: it appears as soon as ``cp`` opens it, before it is complete.
    """
    query = "SELECT last_archived_wal >= %s FROM pg_stat_archiver"
    if not wait_until(lambda: cluster.sql(query, (segment,))[0][0], timeout_s=timeout_s,
                      first_s=0.1):
        pytest.fail(f"{segment} was not archived within {timeout_s:.0f} s")


def test_bin_dir_prefers_debian_packages() -> None:
    assert pgbin.bin_dir(15) == Path("/usr/lib/postgresql/15/bin")


def test_cache_entry_of_another_version_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUD_DUMP_PG_CACHE", str(tmp_path))
    (tmp_path / "17" / "native" / "bin").mkdir(parents=True)
    (tmp_path / "17" / pgbin.MARKER_NAME).write_text("17.0.0-old\n")

    assert pgbin.cached_bin_dir(17) is None


def test_symlinks_from_the_package_listing_are_relative(tmp_path: Path) -> None:
    lib = tmp_path / "native" / "lib"
    lib.mkdir(parents=True)
    (lib / "libpq.so.5.17").write_bytes(b"elf")
    listing = [{"source": "native/lib/libpq.so.5.17", "target": "native/lib/libpq.so.5"}]
    (tmp_path / "native" / "pg-symlinks.json").write_text(json.dumps(listing))

    pgbin.link_symlinks(tmp_path)

    assert (lib / "libpq.so.5").readlink() == Path("libpq.so.5.17")
    assert (lib / "libpq.so.5").read_bytes() == b"elf"


def test_symlink_listing_pointing_outside_the_package_is_refused(tmp_path: Path) -> None:
    (tmp_path / "native").mkdir()
    listing = [{"source": "../../etc/passwd", "target": "native/passwd"}]
    (tmp_path / "native" / "pg-symlinks.json").write_text(json.dumps(listing))

    with pytest.raises(pgbin.FetchError, match="outside the package"):
        pgbin.link_symlinks(tmp_path)
