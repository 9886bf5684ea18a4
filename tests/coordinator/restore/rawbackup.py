"""Backups staged without the backup side, shared by the restore tests (``raw_backup`` fixture
in this package's conftest.py).

``pg_basebackup -Ft -X fetch`` of a running PostgreSQL 15 cluster with a tablespace gives base.tar,
<oid>.tar and backup_manifest; the standard CLIs (zstd, gzip, lz4, age) compress and encrypt them;
``stage_backup`` stores each object under the key ``Layout`` gives and writes the ``manifest.json``
describing them last.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from devrig.postgres import PgCluster, PgFactory, as_postgres, make_postgres_dir
from storage.base import Storage, sha256_hex
from storage.layout import Layout
from storage.manifest import ArchiveRecord, BackupManifest, EncryptionInfo, PartRecord

PG_BIN = Path("/usr/lib/postgresql/15/bin")
ROWS = 5_000
LAYOUT = Layout()
_COMPRESS_CMD = {"zstd": ["zstd", "-q", "-c"], "gzip": ["gzip", "-c"], "lz4": ["lz4", "-q", "-c"]}


@dataclass(frozen=True)
class RawBackup:
    """pg_basebackup's tar-format output and what the tests check after a restore."""

    directory: Path
    tablespace_oid: int
    tablespace_location: str
    pg_version_num: int
    system_identifier: str


def make_raw_backup(pg_factory: PgFactory) -> RawBackup:
    """``pg_basebackup -Ft -X fetch`` of a PostgreSQL 15 cluster holding ``ROWS`` rows in its
    default tablespace and ``ROWS`` in a tablespace of its own."""
    cluster: PgCluster = pg_factory(15)
    location = make_postgres_dir("cloud-dump-ts-")
    cluster.sql(f"CREATE TABLESPACE ts1 LOCATION '{location}'")
    cluster.sql("CREATE TABLE base_rows (i int)")
    cluster.sql(f"INSERT INTO base_rows SELECT generate_series(1, {ROWS})")
    cluster.sql("CREATE TABLE ts_rows (t text) TABLESPACE ts1")
    cluster.sql(f"INSERT INTO ts_rows SELECT 'row ' || g FROM generate_series(1, {ROWS}) g")
    oid = int(cluster.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'")[0][0])
    out = make_postgres_dir("cloud-dump-bb-") / "backup"
    argv = [
        str(PG_BIN / "pg_basebackup"),
        *("-d", cluster.replication_dsn(), "-D", str(out), "-Ft", "-X", "fetch", "-c", "fast"),
        "--manifest-checksums=CRC32C",
    ]
    done = subprocess.run(
        as_postgres(argv),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return RawBackup(
        out, oid, str(location), cluster.server_version_num(), str(cluster.system_identifier())
    )


def _stored_bytes(source: Path, compression: str, recipient: str | None, work: Path) -> bytes:
    data = source.read_bytes()
    if compression != "none":
        data = subprocess.run(
            [*_COMPRESS_CMD[compression], str(source)], capture_output=True, check=True
        ).stdout
    if recipient is not None:
        plain = work / (source.name + ".plain")
        plain.write_bytes(data)
        data = subprocess.run(
            ["age", "-r", recipient, str(plain)], capture_output=True, check=True
        ).stdout
    return data


def stage_backup(
    storage: Storage,
    raw: RawBackup,
    name: str,
    *,
    compression: str = "zstd",
    recipient: str | None = None,
    encryption: EncryptionInfo | None = None,
    tablespace_location: str | None = None,
    edit_base_tar: bytes | None = None,
) -> BackupManifest:
    """Store ``raw`` as backup ``name`` and return the manifest.json written (last)."""
    encrypted = recipient is not None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        archives = []
        for archive_name, oid in (("base", None), (str(raw.tablespace_oid), raw.tablespace_oid)):
            source = raw.directory / f"{archive_name}.tar"
            if archive_name == "base" and edit_base_tar is not None:
                source = work / "base.tar"
                source.write_bytes(edit_base_tar)
            data = _stored_bytes(source, compression, recipient, work)
            key = LAYOUT.archive_key(name, archive_name, compression, encrypted=encrypted)
            storage.put(key, data)
            archives.append(
                ArchiveRecord(
                    name=archive_name,
                    key=key,
                    tablespace_oid=oid,
                    tablespace_location=(tablespace_location or raw.tablespace_location)
                    if oid
                    else None,
                    compression=compression,  # type: ignore[arg-type]
                    compressed_by="none" if compression == "none" else "client",
                    encrypted=encrypted,
                    stored_size=len(data),
                    sha256=sha256_hex(data),
                    parts=[PartRecord(number=1, size=len(data), sha256=sha256_hex(data))],
                )
            )
        pg_manifest = _stored_bytes(raw.directory / "backup_manifest", "none", recipient, work)
    pg_manifest_key = LAYOUT.backup_manifest_key(name, encrypted=encrypted)
    storage.put(pg_manifest_key, pg_manifest)
    now = datetime.now(UTC)
    manifest = BackupManifest(
        name=name,
        tool_version="test",
        pg_version="15",
        pg_version_num=raw.pg_version_num,
        system_identifier=raw.system_identifier,
        timeline=1,
        start_lsn="0/0",
        end_lsn="0/0",
        start_wal_file="000000010000000000000001",
        end_wal_file="000000010000000000000001",
        start_time=now,
        end_time=now,
        compression=compression,  # type: ignore[arg-type]
        encryption=encryption,
        archives=archives,
        backup_manifest_key=pg_manifest_key,
        backup_manifest_size=len(pg_manifest),
        backup_manifest_sha256=sha256_hex(pg_manifest),
    )
    storage.put(LAYOUT.manifest_key(name), manifest.to_json())
    return manifest
