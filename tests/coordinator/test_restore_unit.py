"""restore_backup end to end on real backups: restored clusters start and hold their rows.

The backup side is built elsewhere, so these tests stage backups themselves: ``pg_basebackup
-Ft -X fetch`` of a running PostgreSQL 15 cluster with a tablespace gives base.tar, <oid>.tar and
backup_manifest; the standard CLIs (zstd, gzip, lz4, age) compress and encrypt them; each object is
stored under the key ``Layout`` gives, and a ``manifest.json`` describing them is written last.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import crc32c
import psycopg
import pytest

from coordinator.crypto import generate_identity, wrap_identity
from coordinator.restore.extract import load_backup_manifest
from coordinator.restore.pgcontrol import checkpoint_lsn, find_crc_offset, invalidate_checkpoint
from coordinator.restore.pgmanifest import replace_entries
from coordinator.restore.run import restore_backup
from devrig.postgres import PgCluster, PgFactory, as_postgres, make_postgres_dir
from devrig.procs import free_port
from storage.base import Storage, sha256_hex
from storage.errors import (
    BackupNotFound,
    ConfigError,
    DecryptionFailed,
    IntegrityError,
    TargetNotEmpty,
)
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


@dataclass(frozen=True)
class Keys:
    secret: str
    public: str
    identity_file: Path


@pytest.fixture(scope="session")
def raw_backup(pg_factory: PgFactory) -> RawBackup:
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


@pytest.fixture(scope="session")
def age_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    secret, public = generate_identity()
    path = tmp_path_factory.mktemp("keys") / "identity.txt"
    path.write_text(secret + "\n")
    return Keys(secret, public, path)


@pytest.fixture
def restore_dir() -> Iterator[Path]:
    """A parent the postgres OS user can reach, for PGDATA and tablespace targets."""
    path = make_postgres_dir("cloud-dump-restore-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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


@contextlib.contextmanager
def started(pgdata: Path, *extra_dirs: Path) -> Iterator[str]:
    """Start a restored PGDATA as postgres on a free port; yields a DSN; stops that server."""
    subprocess.run(
        ["chown", "-R", "postgres:postgres", str(pgdata), *map(str, extra_dirs)], check=True
    )
    port = free_port()
    log = pgdata.parent / "restored.log"
    subprocess.run(["chown", "postgres", str(pgdata.parent)], check=True)
    options = f"-p {port} -k {pgdata.parent} -c archive_mode=off"
    start = subprocess.run(
        as_postgres([str(PG_BIN / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(pgdata),
                     "-l", str(log), "-o", options]),
        capture_output=True, text=True, check=False, cwd=pgdata.parent,
    )  # fmt: skip
    assert start.returncode == 0, log.read_text() if log.exists() else start.stderr
    try:
        yield f"host={pgdata.parent} port={port} user=postgres dbname=postgres"
    finally:
        subprocess.run(
            as_postgres([str(PG_BIN / "pg_ctl"), "stop", "-m", "fast", "-w", "-D", str(pgdata)]),
            capture_output=True, check=False, cwd=pgdata.parent,
        )  # fmt: skip


def assert_rows_present(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM base_rows").fetchone() == (ROWS,)
        assert conn.execute("SELECT count(*) FROM ts_rows").fetchone() == (ROWS,)


def assert_nothing_left(*paths: Path) -> None:
    for path in paths:
        assert not path.exists() or not any(path.iterdir()), f"'{path}' was left behind"


# --- full restores ----------------------------------------------------------------------------


def test_restore_zstd_backup_with_tablespace_mapping_starts_and_holds_rows(
    storage: Storage, raw_backup: RawBackup, restore_dir: Path
) -> None:
    stage_backup(storage, raw_backup, "b1")
    pgdata, ts = restore_dir / "data", restore_dir / "ts-new"
    summary = restore_backup(
        storage, LAYOUT, "b1", pgdata,
        tablespace_mapping={raw_backup.tablespace_location: str(ts)}, parallel=2,
    )  # fmt: skip
    assert summary.files_verified > 900
    assert summary.bytes_written > 16 * 1024 * 1024  # the WAL segment alone
    assert (pgdata / "backup_manifest").exists()
    assert not (pgdata / "recovery.signal").exists()
    assert (pgdata / "pg_tblspc" / str(raw_backup.tablespace_oid)).readlink() == ts
    assert (pgdata / "tablespace_map").read_text() == f"{raw_backup.tablespace_oid} {ts}\n"
    assert (pgdata.stat().st_mode & 0o777) == 0o700
    with started(pgdata, ts) as dsn:
        assert_rows_present(dsn)


@pytest.mark.parametrize("compression", ["gzip", "lz4", "none"])
def test_restore_each_compression_verifies(
    storage: Storage, raw_backup: RawBackup, restore_dir: Path, compression: str
) -> None:
    stage_backup(storage, raw_backup, "b1", compression=compression,
                 tablespace_location=str(restore_dir / "ts"))  # fmt: skip
    summary = restore_backup(storage, LAYOUT, "b1", restore_dir / "data")
    assert summary.files_verified > 900
    assert (restore_dir / "ts" / "PG_15_202209061").is_dir()
    assert (restore_dir / "data" / "global" / "pg_control").exists()


def test_restore_age_recipients_into_recorded_location_starts(
    storage: Storage, raw_backup: RawBackup, restore_dir: Path, age_keys: Keys
) -> None:
    ts = restore_dir / "ts-recorded"
    stage_backup(
        storage, raw_backup, "enc", recipient=age_keys.public, tablespace_location=str(ts),
        encryption=EncryptionInfo(mode="recipients", recipients=[age_keys.public]),
    )  # fmt: skip
    pgdata = restore_dir / "data"
    restore_backup(storage, LAYOUT, "enc", pgdata, identity_paths=[age_keys.identity_file])
    with started(pgdata, ts) as dsn:
        assert_rows_present(dsn)


# --- refusals before anything is written --------------------------------------------------------


def test_restore_missing_backup_is_backup_not_found(storage: Storage, restore_dir: Path) -> None:
    with pytest.raises(BackupNotFound, match="backup 'nope' not found in "):
        restore_backup(storage, LAYOUT, "nope", restore_dir / "data")


def test_restore_refuses_non_empty_pgdata_and_writes_nothing(
    storage: Storage, raw_backup: RawBackup, restore_dir: Path
) -> None:
    stage_backup(storage, raw_backup, "b1", tablespace_location=str(restore_dir / "ts"))
    pgdata = restore_dir / "data"
    pgdata.mkdir()
    (pgdata / "precious").write_text("user data")
    with pytest.raises(TargetNotEmpty, match=f"'{pgdata}' is not empty"):
        restore_backup(storage, LAYOUT, "b1", pgdata)
    assert [p.name for p in pgdata.iterdir()] == ["precious"]
    assert (pgdata / "precious").read_text() == "user data"
    assert not (restore_dir / "ts").exists()


def test_restore_refuses_non_empty_tablespace_target(
    storage: Storage, raw_backup: RawBackup, restore_dir: Path
) -> None:
    # The recorded location is the source cluster's live tablespace: never overwritten.
    stage_backup(storage, raw_backup, "b1")
    with pytest.raises(TargetNotEmpty, match=raw_backup.tablespace_location):
        restore_backup(storage, LAYOUT, "b1", restore_dir / "data")
    assert not (restore_dir / "data").exists()


def test_restore_encrypted_without_key_is_config_error(
    storage: Storage, raw_backup: RawBackup, restore_dir: Path, age_keys: Keys
) -> None:
    stage_backup(
        storage, raw_backup, "enc", recipient=age_keys.public,
        encryption=EncryptionInfo(mode="recipients", recipients=[age_keys.public]),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="identity"):
        restore_backup(storage, LAYOUT, "enc", restore_dir / "data", passphrase="x")
    assert not (restore_dir / "data").exists()


def test_restore_wrong_age_key_is_decryption_failed_with_no_pgdata(
    storage: Storage, raw_backup: RawBackup, restore_dir: Path, age_keys: Keys
) -> None:
    stage_backup(
        storage, raw_backup, "enc", recipient=age_keys.public,
        tablespace_location=str(restore_dir / "ts"),
        encryption=EncryptionInfo(mode="recipients", recipients=[age_keys.public]),
    )  # fmt: skip
    other = restore_dir / "other.txt"
    other.write_text(generate_identity()[0] + "\n")
    with pytest.raises(DecryptionFailed, match="wrong key"):
        restore_backup(storage, LAYOUT, "enc", restore_dir / "data", identity_paths=[other])
    assert not (restore_dir / "data").exists()
    assert not (restore_dir / "ts").exists()


def test_restore_passphrase_backup_and_wrong_passphrase(
    storage: Storage, raw_backup: RawBackup, restore_dir: Path
) -> None:
    secret, public = generate_identity()
    wrapped_key = LAYOUT.backup_prefix("pp") + "backup_key.age"
    storage.put(wrapped_key, wrap_identity(secret, "correct horse"))
    stage_backup(
        storage, raw_backup, "pp", recipient=public, tablespace_location=str(restore_dir / "ts"),
        encryption=EncryptionInfo(mode="passphrase", wrapped_identity_key=wrapped_key),
    )  # fmt: skip
    pgdata = restore_dir / "data"
    with pytest.raises(DecryptionFailed, match="wrong passphrase"):
        restore_backup(storage, LAYOUT, "pp", pgdata, passphrase="battery staple")
    assert not pgdata.exists()
    summary = restore_backup(storage, LAYOUT, "pp", pgdata, passphrase="correct horse")
    assert summary.files_verified > 900


# --- failures after writing started: nothing usable is left -----------------------------------


def test_restore_corrupted_stored_object_is_integrity_error_and_leaves_nothing(
    storage: Storage, raw_backup: RawBackup, restore_dir: Path
) -> None:
    manifest = stage_backup(storage, raw_backup, "b1", tablespace_location=str(restore_dir / "ts"))
    key = manifest.archives[0].key
    data = bytearray(storage.get(key))
    data[len(data) // 2] ^= 0x01
    storage.delete(key)
    storage.put(key, bytes(data))
    pgdata = restore_dir / "data"
    pgdata.mkdir()  # an existing empty PGDATA stays, empty
    with pytest.raises(IntegrityError):
        restore_backup(storage, LAYOUT, "b1", pgdata)
    assert_nothing_left(pgdata, restore_dir / "ts")
    assert pgdata.is_dir()


def test_restore_missing_archive_object_is_integrity_error(
    storage: Storage, raw_backup: RawBackup, restore_dir: Path
) -> None:
    manifest = stage_backup(storage, raw_backup, "b1", tablespace_location=str(restore_dir / "ts"))
    storage.delete(manifest.archives[1].key)
    with pytest.raises(
        IntegrityError, match=f"backup 'b1' is missing object '{manifest.archives[1].key}'"
    ):
        restore_backup(storage, LAYOUT, "b1", restore_dir / "data")
    assert not (restore_dir / "data").exists()
    assert not (restore_dir / "ts").exists()


def _base_tar_with(raw: RawBackup, *, flip_in: str | None = None, drop: str | None = None) -> bytes:
    """base.tar re-written: one byte of ``flip_in``'s data flipped, or member ``drop`` left out."""
    import io
    import tarfile

    original = (raw.directory / "base.tar").read_bytes()
    if flip_in is not None:
        with tarfile.open(fileobj=io.BytesIO(original)) as tar:
            offset = tar.getmember(flip_in).offset_data
        edited = bytearray(original)
        edited[offset] ^= 0x01
        return bytes(edited)
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(original)) as src,
        tarfile.open(fileobj=out, mode="w") as dst,
    ):
        for member in src:
            if member.name != drop:
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    return out.getvalue()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"flip_in": "global/1262"}, "file 'global/1262' does not match its CRC32C checksum"),
        ({"drop": "PG_VERSION"}, "file 'PG_VERSION' listed in backup_manifest was not restored"),
    ],
    ids=["flipped-byte", "missing-file"],
)
def test_restore_manifest_verification_catches_damaged_archive_content(
    storage: Storage, raw_backup: RawBackup, restore_dir: Path, edit: dict[str, str], message: str
) -> None:
    stage_backup(
        storage, raw_backup, "b1", compression="none", tablespace_location=str(restore_dir / "ts"),
        edit_base_tar=_base_tar_with(raw_backup, **edit),
    )  # fmt: skip
    with pytest.raises(IntegrityError, match=message):
        restore_backup(storage, LAYOUT, "b1", restore_dir / "data")
    assert not (restore_dir / "data").exists()
    assert not (restore_dir / "ts").exists()


# --- pg_control and backup_manifest as restore leaves them ------------------------------------


def _base_member(raw: RawBackup, name: str) -> bytes:
    import tarfile

    with tarfile.open(raw.directory / "base.tar") as tar:
        member = tar.extractfile(name)
        assert member is not None
        return member.read()


def test_pg_control_checkpoint_is_invalidated_only_when_its_crc_verifies(
    raw_backup: RawBackup,
) -> None:
    control = _base_member(raw_backup, "global/pg_control")
    crc_at = find_crc_offset(control)
    assert crc_at is not None
    changed = invalidate_checkpoint(control)
    assert changed is not None
    assert checkpoint_lsn(changed) == 0xDEAD
    assert find_crc_offset(changed) == crc_at  # a valid pg_control still
    assert changed[:32] == control[:32] and changed[40:crc_at] == control[40:crc_at]

    damaged = bytearray(control)
    damaged[100] ^= 0x01
    assert invalidate_checkpoint(bytes(damaged)) is None
    # A version this code does not know, with a CRC that matches: left alone too.
    unknown = bytearray(control)
    unknown[8:12] = (1900).to_bytes(4, "little")
    unknown[crc_at : crc_at + 4] = crc32c.crc32c(bytes(unknown[:crc_at])).to_bytes(4, "little")
    assert invalidate_checkpoint(bytes(unknown)) is None


def test_backup_manifest_with_entries_replaced_still_verifies_its_own_checksum(
    raw_backup: RawBackup,
) -> None:
    manifest = (raw_backup.directory / "backup_manifest").read_bytes()
    new_map = b"16385 /somewhere/else\n"
    out = replace_entries(manifest, {"tablespace_map": new_map, "global/pg_control": b"x" * 8192})
    before = {e.path: e for e in load_backup_manifest(manifest)}
    after = {e.path: e for e in load_backup_manifest(out)}  # checks Manifest-Checksum
    assert after["tablespace_map"].size == len(new_map)
    assert after["tablespace_map"].checksum == crc32c.crc32c(new_map).to_bytes(4, "little").hex()
    assert after["global/pg_control"].checksum != before["global/pg_control"].checksum
    changed = {p for p in before if before[p] != after[p]}
    assert changed == {"tablespace_map", "global/pg_control"}
    with pytest.raises(IntegrityError, match="does not list 'nowhere'"):
        replace_entries(manifest, {"nowhere": b""})
