"""restore_backup end to end on real backups: restored clusters start and hold their rows.

The backup side is built elsewhere, so these tests stage backups themselves (``rawbackup``:
the ``raw_backup`` fixture of this package's conftest.py and ``stage_backup``).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import crc32c
import psycopg
import pytest

from coordinator.crypto import generate_identity, wrap_identity
from coordinator.restore.extract import load_backup_manifest
from coordinator.restore.pgcontrol import checkpoint_lsn, find_crc_offset, invalidate_checkpoint
from coordinator.restore.pgmanifest import replace_entries
from coordinator.restore.run import restore_backup
from devrig.moto import StorageTarget
from devrig.postgres import as_postgres, make_postgres_dir
from devrig.procs import free_port
from storage.base import Storage
from storage.errors import (
    BackupNotFound,
    ConfigError,
    DecryptionFailed,
    IntegrityError,
    TargetNotEmpty,
)
from storage.manifest import EncryptionInfo
from tests.coordinator.restore.rawbackup import LAYOUT, PG_BIN, ROWS, RawBackup, stage_backup


@dataclass(frozen=True)
class Keys:
    secret: str
    public: str
    identity_file: Path


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


def _flipped_in_age(data: bytes, where: str) -> bytes:
    """``data`` (an age file) with one byte changed: in the middle (a payload chunk), in the
    recipient stanza's body (to another base64 digit: the wrapped file key changes), or in the
    header's MAC."""
    changed = bytearray(data)
    if where == "payload":
        changed[len(data) // 2] ^= 0x01
    elif where == "stanza":
        at = data.index(b"\n", data.index(b"-> X25519 ")) + 3
        changed[at] = ord("B") if data[at] == ord("A") else ord("A")
    else:
        at = data.index(b"\n--- ") + 10
        changed[at] = ord("B") if data[at] == ord("A") else ord("A")
    return bytes(changed)


@pytest.mark.parametrize("where", ["payload", "stanza", "mac"])
def test_restore_damaged_encrypted_archive_is_integrity_error_naming_it(
    storage: Storage, storage_target: StorageTarget, raw_backup: RawBackup, restore_dir: Path,
    age_keys: Keys, where: str,
) -> None:
    """A byte changed in a stored ``.age`` archive is damage (exit 15) naming the object, as
    for an unencrypted one, not a wrong key (14) nor a local disk error (16)."""
    if storage_target.kind == "s3" and where != "payload":
        pytest.skip("the header's bytes are read the same way from either store")
    manifest = stage_backup(
        storage, raw_backup, "enc", recipient=age_keys.public,
        tablespace_location=str(restore_dir / "ts"),
        encryption=EncryptionInfo(mode="recipients", recipients=[age_keys.public]),
    )  # fmt: skip
    key = manifest.archives[0].key
    damaged = _flipped_in_age(storage.get(key), where)
    storage.delete(key)
    storage.put(key, damaged)
    pgdata = restore_dir / "data"
    with pytest.raises(IntegrityError, match=f"archive '{key}' is damaged: "):
        restore_backup(storage, LAYOUT, "enc", pgdata, identity_paths=[age_keys.identity_file])
    assert_nothing_left(pgdata, restore_dir / "ts")


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
