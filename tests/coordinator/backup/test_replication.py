"""The replication reader against real servers: both framings, server compression and its
fallback, the manifest pg_verifybackup accepts, and the errors an operator can act on.

Majors 13 (legacy framing), 15 (Debian: zstd, lz4, gzip) and 17 (npm build: gzip only) run by
default; 14, 16 and 18 carry the ``matrix`` marker.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from psycopg.conninfo import make_conninfo

from coordinator.backup.replication import (
    BaseBackupOptions,
    BaseBackupResult,
    ReplicationConnection,
    int_to_lsn,
    lsn_to_int,
    wal_file_name,
)
from devrig import pgbin
from devrig.postgres import PgCluster, PgFactory, majors
from devrig.procs import free_port
from storage.errors import ConfigError, DatabaseError, DatabaseUnreachable
from tests.coordinator.backup.replication_helpers import (
    GZIP_MAGIC,
    LZ4_MAGIC,
    SECOND_DATABASE,
    ZSTD_MAGIC,
    FileSink,
    extract,
    prepare_cluster,
    tar_members,
)

MAJORS = majors()
MIB = 1024 * 1024
PG15_BIN = Path("/usr/lib/postgresql/15/bin")
MAGIC = {"zstd": ZSTD_MAGIC, "gzip": GZIP_MAGIC, "lz4": LZ4_MAGIC}


@dataclass
class PreparedCluster:
    cluster: PgCluster
    tablespace_oid: int


@dataclass
class Backup:
    prepared: PreparedCluster
    result: BaseBackupResult
    sink: FileSink
    wal_segment_size: int

    @property
    def cluster(self) -> PgCluster:
        return self.prepared.cluster

    def members(self, name: str) -> list[str]:
        archive = next(a for a in self.result.archives if a.name == name)
        return tar_members(self.sink.paths[name], archive.compression)


def run_backup(
    cluster: PgCluster, directory: Path, compression: str = "zstd"
) -> tuple[BaseBackupResult, FileSink]:
    directory.mkdir(parents=True, exist_ok=True)
    sink = FileSink(directory)
    with ReplicationConnection.connect(cluster.replication_url()) as conn:
        result = conn.base_backup(
            BaseBackupOptions(label="test's backup", server_compression=compression), sink
        )
    return result, sink


@pytest.fixture(scope="module", params=MAJORS, ids=lambda major: f"pg{major}")
def prepared(request: pytest.FixtureRequest, pg_factory: PgFactory) -> PreparedCluster:
    cluster = pg_factory(request.param)
    return PreparedCluster(cluster, prepare_cluster(cluster))


@pytest.fixture(scope="module")
def backup(prepared: PreparedCluster, tmp_path_factory: pytest.TempPathFactory) -> Backup:
    """One default backup (zstd asked for) per major, shared by the tests that read it."""
    with ReplicationConnection.connect(prepared.cluster.replication_dsn()) as conn:
        segment_size = conn.identify_system().wal_segment_size
    directory = tmp_path_factory.mktemp(f"backup-pg{prepared.cluster.major}")
    result, sink = run_backup(prepared.cluster, directory)
    return Backup(prepared, result, sink, segment_size)


@pytest.fixture(scope="module")
def pg15_prepared(pg_factory: PgFactory) -> PreparedCluster:
    cluster = pg_factory(15)
    return PreparedCluster(cluster, prepare_cluster(cluster))


@pytest.fixture(scope="module")
def pg17_prepared(pg_factory: PgFactory) -> PreparedCluster:
    cluster = pg_factory(17)
    return PreparedCluster(cluster, prepare_cluster(cluster))


# --- every major -------------------------------------------------------------------------------


def test_identify_system_reports_the_superusers_system_identifier(
    prepared: PreparedCluster,
) -> None:
    cluster = prepared.cluster
    with ReplicationConnection.connect(cluster.replication_url()) as conn:
        info = conn.identify_system()

    assert info.system_identifier == str(cluster.system_identifier())
    assert info.timeline == 1
    assert info.server_version_num == cluster.server_version_num()
    assert info.server_version.split(".")[0] == str(cluster.major)
    assert info.wal_segment_size == 16 * MIB
    lsn_to_int(info.xlogpos)


def test_archives_are_tablespaces_first_then_base_then_the_manifest(backup: Backup) -> None:
    oid = str(backup.prepared.tablespace_oid)

    assert [a.name for a in backup.result.archives] == [oid, "base"]
    assert backup.sink.events == [f"begin {oid}", "end", "begin base", "end", "manifest"]
    extra = backup.result.archives[0]
    assert extra.tablespace_oid == backup.prepared.tablespace_oid
    location = extra.location
    assert location is not None and Path(location).name.startswith("cloud-dump-ts"), location
    assert backup.result.archives[1].tablespace_oid is None
    assert backup.result.archives[1].location is None
    assert all(a.size_estimate_bytes for a in backup.result.archives)


def test_backup_says_whether_the_server_compressed(backup: Backup) -> None:
    # zstd was asked for: only Debian's 15 has it; 13/14 cannot compress, npm builds lack zstd.
    major = backup.cluster.major
    expected = "zstd" if major >= 15 and pgbin.system_bin_dir(major) else "none"

    assert backup.result.server_compression == expected
    assert {a.compression for a in backup.result.archives} == {expected}


def test_base_archive_is_a_tar_with_control_file_label_and_start_wal(backup: Backup) -> None:
    members = set(backup.members("base"))
    start_segment = wal_file_name(
        backup.result.start_timeline, backup.result.start_lsn, backup.wal_segment_size
    )
    database_oids = backup.cluster.sql(
        "SELECT oid FROM pg_database WHERE datname IN ('postgres', %s)", (SECOND_DATABASE,)
    )

    assert {"PG_VERSION", "global/pg_control", "backup_label", "tablespace_map"} <= members
    assert f"pg_wal/{start_segment}" in members
    for (oid,) in database_oids:
        assert f"base/{oid}/PG_VERSION" in members


def test_tablespace_archive_is_a_tar_of_the_version_directory(backup: Backup) -> None:
    members = backup.members(str(backup.prepared.tablespace_oid))

    assert any(m.startswith(f"PG_{backup.cluster.major}_") for m in members)
    assert len(members) > 1


def test_manifest_lists_files_and_wal_range(backup: Backup) -> None:
    assert backup.sink.manifest_bytes is not None
    manifest = json.loads(backup.sink.manifest_bytes)

    paths = {entry["Path"] for entry in manifest["Files"]}
    assert "global/pg_control" in paths
    assert {entry["Checksum-Algorithm"] for entry in manifest["Files"]} == {"CRC32C"}
    (wal_range,) = manifest["WAL-Ranges"]
    assert wal_range["Start-LSN"] == backup.result.start_lsn


def test_lsns_and_timelines_bracket_the_backup(backup: Backup) -> None:
    result = backup.result

    assert lsn_to_int(result.start_lsn) <= lsn_to_int(result.end_lsn)
    assert result.start_timeline == result.end_timeline == 1


def test_progress_grows_and_has_a_total(backup: Backup) -> None:
    done = [d for d, _ in backup.sink.progress_calls]
    totals = {t for _, t in backup.sink.progress_calls}

    assert done and done == sorted(done) and done[-1] > 0
    expected_total = sum(a.size_estimate_bytes or 0 for a in backup.result.archives)
    assert totals == {expected_total}


# --- server-side compression ---------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["zstd", "lz4", "gzip"])
def test_pg15_compresses_on_the_server(
    pg15_prepared: PreparedCluster, tmp_path: Path, compression: str
) -> None:
    result, sink = run_backup(pg15_prepared.cluster, tmp_path, compression)

    assert result.server_compression == compression
    assert {a.compression for a in result.archives} == {compression}
    for path in sink.paths.values():
        assert path.read_bytes().startswith(MAGIC[compression])
    assert "global/pg_control" in tar_members(sink.paths["base"], compression)


def test_pg15_without_compression_streams_raw_tar(
    pg15_prepared: PreparedCluster, tmp_path: Path
) -> None:
    result, sink = run_backup(pg15_prepared.cluster, tmp_path, "none")

    assert result.server_compression == "none"
    assert "PG_VERSION" in tar_members(sink.paths["base"], "none")
    assert sink.paths["base"].read_bytes()[-1024:] == bytes(1024)


def test_pg15_backup_passes_pg_verifybackup(pg15_prepared: PreparedCluster, tmp_path: Path) -> None:
    _, sink = run_backup(pg15_prepared.cluster, tmp_path / "archives", "zstd")
    restored = tmp_path / "restored"
    oid = str(pg15_prepared.tablespace_oid)
    extract(sink.paths["base"], "zstd", restored)
    # The tablespace goes where tablespace_map points; pg_verifybackup follows the path.
    extract(sink.paths[oid], "zstd", restored / "pg_tblspc" / oid)
    assert sink.manifest_bytes is not None
    (restored / "backup_manifest").write_bytes(sink.manifest_bytes)

    done = subprocess.run(
        [str(PG15_BIN / "pg_verifybackup"), str(restored)], capture_output=True, text=True
    )

    assert done.returncode == 0, done.stderr
    assert "successfully verified" in done.stdout


def test_pg17_npm_build_refuses_zstd_and_the_backup_falls_back_to_none(
    pg17_prepared: PreparedCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="coordinator.backup.replication"):
        result, sink = run_backup(pg17_prepared.cluster, tmp_path, "zstd")

    assert result.server_compression == "none"
    assert {a.compression for a in result.archives} == {"none"}
    assert "PG_VERSION" in tar_members(sink.paths["base"], "none")
    assert "refused compression zstd" in caplog.text


def test_pg17_npm_build_compresses_with_gzip_on_the_server(
    pg17_prepared: PreparedCluster, tmp_path: Path
) -> None:
    result, sink = run_backup(pg17_prepared.cluster, tmp_path, "gzip")

    assert result.server_compression == "gzip"
    for path in sink.paths.values():
        assert path.read_bytes()[:2] == GZIP_MAGIC
    assert "global/pg_control" in tar_members(sink.paths["base"], "gzip")


# --- errors ------------------------------------------------------------------------------------


def test_wrong_password_is_unreachable_naming_the_server_not_the_password(
    pg15_prepared: PreparedCluster,
) -> None:
    cluster = pg15_prepared.cluster
    wrong = "Wrong-Password-42"
    dsn = make_conninfo(cluster.replication_dsn(), password=wrong)

    with pytest.raises(DatabaseUnreachable) as caught:
        ReplicationConnection.connect(dsn)

    message = str(caught.value)
    assert f"127.0.0.1:{cluster.port}" in message
    assert "password authentication failed" in message
    assert wrong not in message and cluster.repl_password not in message
    assert "\n" not in message


def test_nothing_listening_is_unreachable() -> None:
    port = free_port()

    with pytest.raises(DatabaseUnreachable, match=f"127.0.0.1:{port}: connection refused"):
        ReplicationConnection.connect(f"postgres://repl:secret@127.0.0.1:{port}/postgres")


def test_malformed_conninfo_is_a_config_error_without_its_text() -> None:
    with pytest.raises(ConfigError) as caught:
        ReplicationConnection.connect("host=127.0.0.1 hunter2-secret")

    assert "hunter2" not in str(caught.value)


def test_logical_replication_url_is_refused() -> None:
    with pytest.raises(ConfigError, match="replication=true"):
        ReplicationConnection.connect("postgres://u@127.0.0.1:1/db?replication=database")


def test_no_walsender_slot_is_unreachable_and_says_to_raise_max_wal_senders(
    pg_factory: PgFactory,
) -> None:
    cluster = pg_factory(15, settings={"max_wal_senders": 0})

    # The server checks walsender slots while accepting the connection, before BASE_BACKUP.
    with pytest.raises(DatabaseUnreachable, match="raise max_wal_senders") as caught:
        ReplicationConnection.connect(cluster.replication_url())

    assert "(currently 0)" in str(caught.value)


class TerminatingSink(FileSink):
    """Has the superuser terminate the walsender at the first data it receives."""

    cluster: PgCluster

    def write(self, data: memoryview) -> None:
        if not self.events[-1].startswith("terminated"):
            self.cluster.sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE backend_type = 'walsender'"
            )
            self.events.append("terminated")
        super().write(data)


def test_server_gone_mid_stream_is_a_database_error(
    pg15_prepared: PreparedCluster, tmp_path: Path
) -> None:
    sink = TerminatingSink(tmp_path)
    sink.cluster = pg15_prepared.cluster
    conn = ReplicationConnection.connect(pg15_prepared.cluster.replication_url())

    with pytest.raises(DatabaseError, match=r"base backup on 127\.0\.0\.1:\d+ failed: ") as caught:
        conn.base_backup(BaseBackupOptions(label="cut", server_compression="none"), sink)

    assert not isinstance(caught.value, DatabaseUnreachable)
    with pytest.raises(DatabaseError, match="is closed"):
        conn.identify_system()
    # Which one we read depends on whether the FATAL message beat the closed socket.
    reasons = ("terminating connection due to administrator", "server closed the connection")
    assert any(reason in str(caught.value) for reason in reasons)
    assert "\n" not in str(caught.value)


class RecyclingSink(FileSink):
    """At the first data it receives, has the server move past the backup's first WAL segment
    and checkpoint, three times: without something holding that WAL, the checkpoints remove
    or recycle it before BASE_BACKUP reads it at its end (another backup's checkpoint, or a
    busy server's, does the same)."""

    cluster: PgCluster

    def write(self, data: memoryview) -> None:
        if "recycled" not in self.events:
            self.events.append("recycled")
            self.cluster.sql("CREATE TABLE IF NOT EXISTS churn (x int)")
            for _ in range(3):
                self.cluster.sql("INSERT INTO churn SELECT generate_series(1, 1000)")
                self.cluster.sql("SELECT pg_switch_wal()")
                self.cluster.sql("CHECKPOINT")
        super().write(data)


@pytest.fixture(scope="module", params=MAJORS, ids=lambda major: f"pg{major}")
def major(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def test_checkpoints_during_a_backup_do_not_remove_the_wal_it_includes(
    major: int, pg_factory: PgFactory, tmp_path: Path
) -> None:
    """The backup holds its WAL with a temporary replication slot while it runs."""
    cluster = pg_factory(major, settings={"wal_keep_size": 0, "min_wal_size": "32MB"})
    sink = RecyclingSink(tmp_path)
    sink.cluster = cluster

    with ReplicationConnection.connect(cluster.replication_url()) as conn:
        result = conn.base_backup(BaseBackupOptions(label="held", server_compression="none"), sink)

    assert "recycled" in sink.events
    first_wal = f"pg_wal/{wal_file_name(result.start_timeline, result.start_lsn, 16 * MIB)}"
    assert first_wal in tar_members(sink.paths["base"], "none")
    # The slot went with the connection: nothing left holding WAL on the server.
    assert cluster.sql("SELECT count(*) FROM pg_replication_slots")[0][0] == 0


def test_a_backup_without_a_free_slot_goes_on_and_says_so(
    pg_factory: PgFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = pg_factory(15, settings={"max_replication_slots": 0})

    with caplog.at_level(logging.WARNING), ReplicationConnection.connect(
        cluster.replication_url()
    ) as conn:
        result = conn.base_backup(BaseBackupOptions(label="unheld", server_compression="none"),
                                  FileSink(tmp_path))  # fmt: skip

    assert result.archives
    assert "made no temporary replication slot" in caplog.text
    assert "max_replication_slots" in caplog.text


# --- LSNs and WAL file names -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timeline", "lsn", "segment_size", "expected"),
    [
        (1, "0/3000060", 16 * MIB, "000000010000000000000003"),
        (1, "0/2FFFFFF", 16 * MIB, "000000010000000000000002"),
        (1, "1/0", 16 * MIB, "000000010000000100000000"),
        (2, "0/FFFFFFFF", 16 * MIB, "0000000200000000000000FF"),
        (0x1A, "AB/CD000000", 16 * MIB, "0000001A000000AB000000CD"),
        (1, "0/C000000", 64 * MIB, "000000010000000000000003"),
        (1, "5/40000000", 1024 * MIB, "000000010000000500000001"),
    ],
)
def test_wal_file_name_is_the_segment_holding_the_lsn(
    timeline: int, lsn: str, segment_size: int, expected: str
) -> None:
    assert wal_file_name(timeline, lsn, segment_size) == expected


@pytest.mark.parametrize("lsn", ["0/0", "0/3000060", "1/0", "FFFFFFFF/FFFFFFFF", "AB/CD"])
def test_lsn_round_trips_through_its_integer(lsn: str) -> None:
    assert int_to_lsn(lsn_to_int(lsn)) == lsn


def test_lsn_to_int_orders_across_the_high_word() -> None:
    assert lsn_to_int("0/FFFFFFFF") + 1 == lsn_to_int("1/0") == 1 << 32


@pytest.mark.parametrize("lsn", ["", "0", "0/", "/1", "G/0", "0/123456789", "1/2/3"])
def test_malformed_lsn_is_a_config_error(lsn: str) -> None:
    with pytest.raises(ConfigError, match="invalid lsn"):
        lsn_to_int(lsn)


def test_wal_file_name_rejects_a_segment_size_that_is_not_a_power_of_two() -> None:
    with pytest.raises(ConfigError):
        wal_file_name(1, "0/0", 3 * MIB)


def test_options_reject_a_level_the_algorithm_does_not_have() -> None:
    with pytest.raises(ConfigError, match="level 10"):
        BaseBackupOptions(label="x", server_compression="gzip", compression_level=10)
