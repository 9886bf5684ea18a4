"""The seed's TestBackup_* and TestRestore_* cases, against real servers, on both backends.

These run the coordinator without a broker (the same worker functions, in-process); the round
trips through Celery workers are in coordinator/backup/test_backup_restore.py. Names follow the
seed's tests.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from coordinator.crypto import generate_identity
from devrig import sample
from devrig.moto import StorageTarget
from devrig.postgres import PgCluster, PgFactory, make_postgres_dir
from devrig.services import run_cli
from devrig.tty import run_with_prompt_answer
from storage.manifest import BackupManifest

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@pytest.fixture(scope="session")
def source(pg_factory: PgFactory) -> tuple[PgCluster, Path]:
    """A PostgreSQL 15 cluster with the sample data, shared by these tests."""
    cluster = pg_factory(15)
    return cluster, sample.populate(cluster, rows=500)


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[Path, Path]:
    secret, public = generate_identity()
    (tmp_path / "key.txt").write_text(f"# test identity\n{secret}\n")
    (tmp_path / "key.pub").write_text(public + "\n")
    return tmp_path / "key.txt", tmp_path / "key.pub"


@pytest.fixture
def passphrase_file(tmp_path: Path) -> Path:
    path = tmp_path / "passphrase"
    path.write_text("correct horse battery staple\n")
    return path


def backup(source: tuple[PgCluster, Path], target: StorageTarget, name: str,
           *extra: str) -> None:
    result = run_cli("backup", "--name", name, "--db-url", source[0].replication_url(),
                     "--no-progress", *extra, env=target.env)
    assert result.returncode == 0, result.stderr


def restore(target: StorageTarget, name: str, *extra: str,
            cluster: str | None = None) -> tuple[Path, str]:
    """Restore into a new directory, remapping the tablespace; (pgdata, stderr if it failed)."""
    pgdata = make_postgres_dir("cloud-dump-seed-") / "data"
    new_ts = make_postgres_dir("cloud-dump-seed-ts-")
    mapping = [f"--tablespace-mapping={a.tablespace_location}={new_ts}"
               for a in read_manifest(target, name, cluster).archives if a.tablespace_location]
    layout = ["--cluster", cluster] if cluster else []
    result = run_cli("restore", "--name", name, "--pgdata", str(pgdata), *layout, *mapping,
                     *extra, env=target.env)
    return pgdata, result.stderr if result.returncode else ""


def read_manifest(target: StorageTarget, name: str, cluster: str | None = None) -> BackupManifest:
    key = f"{cluster}/backup/{name}/manifest.json" if cluster else f"{name}/manifest.json"
    return BackupManifest.from_json(target.open().get(key), key)


def stored_keys(target: StorageTarget) -> list[str]:
    return [info.key for info in target.open().list("")]


def tar_listing(stream: bytes, *decoders: list[str]) -> list[str]:
    """Pipe ``stream`` through standard tools, ending in ``tar -t``; the member names."""
    data = stream
    for argv in decoders:
        data = subprocess.run(argv, input=data, capture_output=True, check=True).stdout
    listing = subprocess.run(["tar", "-t"], input=data, capture_output=True, check=True)
    return listing.stdout.decode().splitlines()


def test_backup_creates_manifest(source: tuple[PgCluster, Path],
                                 storage_target: StorageTarget) -> None:
    backup(source, storage_target, "b1")
    manifest = read_manifest(storage_target, "b1")
    cluster = source[0]
    assert manifest.name == "b1"
    assert manifest.pg_version_num == cluster.server_version_num()
    assert manifest.system_identifier == str(cluster.system_identifier())
    assert int(manifest.start_lsn.split("/")[0], 16) <= int(manifest.end_lsn.split("/")[0], 16)
    assert manifest.start_wal_file <= manifest.end_wal_file
    assert {a.name for a in manifest.archives} == {"base", *(
        str(r[0]) for r in cluster.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts'"))}


def test_backup_manifest_round_trip(source: tuple[PgCluster, Path],
                                    storage_target: StorageTarget) -> None:
    backup(source, storage_target, "b1")
    raw = storage_target.open().get("b1/manifest.json")
    manifest = BackupManifest.from_json(raw, "b1/manifest.json")
    assert BackupManifest.from_json(manifest.to_json(), "again") == manifest
    assert json.loads(raw)["format_version"] == 1


def test_backup_base_tar_contains_pgdata_and_reads_with_standard_tools(
    source: tuple[PgCluster, Path], storage_target: StorageTarget
) -> None:
    backup(source, storage_target, "b1")
    stored = storage_target.open().get("b1/base.tar.zst")
    assert stored.startswith(ZSTD_MAGIC)
    names = tar_listing(stored, ["zstd", "-dc"])
    assert "PG_VERSION" in names
    assert any(n.startswith("global/") for n in names)
    assert any(n.startswith("base/") for n in names)
    assert any(n.startswith("pg_wal/0000") for n in names)


@pytest.mark.parametrize(("compression", "suffix", "decoder"), [
    ("gzip", ".gz", ["gzip", "-dc"]),
    ("none", "", ["cat"]),
])
def test_backup_other_compressions_read_with_standard_tools(
    source: tuple[PgCluster, Path], storage_target: StorageTarget,
    compression: str, suffix: str, decoder: list[str],
) -> None:
    backup(source, storage_target, "b1", "--compression", compression)
    names = tar_listing(storage_target.open().get(f"b1/base.tar{suffix}"), decoder)
    assert "PG_VERSION" in names


def test_backup_encrypted_keypair_reads_with_age_cli(
    source: tuple[PgCluster, Path], storage_target: StorageTarget, keypair: tuple[Path, Path]
) -> None:
    secret, public = keypair
    backup(source, storage_target, "b1", "--encrypt", "--recipient-key", str(public))
    stored = storage_target.open().get("b1/base.tar.zst.age")
    assert stored.startswith(b"age-encryption.org/v1")
    assert not stored.startswith(ZSTD_MAGIC)
    names = tar_listing(stored, ["age", "-d", "-i", str(secret)], ["zstd", "-dc"])
    assert "PG_VERSION" in names
    assert read_manifest(storage_target, "b1").encryption is not None
    assert "b1/backup_manifest.age" in stored_keys(storage_target)


def test_backup_encrypted_passphrase_stores_a_wrapped_key(
    source: tuple[PgCluster, Path], storage_target: StorageTarget, passphrase_file: Path
) -> None:
    backup(source, storage_target, "b1", "--encrypt", "--passphrase-file", str(passphrase_file))
    manifest = read_manifest(storage_target, "b1")
    assert manifest.encryption is not None and manifest.encryption.mode == "passphrase"
    keys = stored_keys(storage_target)
    assert "b1/base.tar.zst.age" in keys and "b1/backup_key.age" in keys
    stored = storage_target.open().get("b1/base.tar.zst.age")
    assert not stored.startswith(ZSTD_MAGIC)
    # The passphrase is nowhere in what was stored.
    secret = passphrase_file.read_text().strip().encode()
    for key in keys:
        assert secret not in storage_target.open().get(key)


def test_passphrase_backup_reads_with_standard_tools(
    source: tuple[PgCluster, Path], storage_target: StorageTarget, passphrase_file: Path,
    tmp_path: Path,
) -> None:
    """The README's commands: unwrap the key with `age -d` and the passphrase, then read."""
    backup(source, storage_target, "b1", "--passphrase-file", str(passphrase_file))
    wrapped = tmp_path / "backup_key.age"
    wrapped.write_bytes(storage_target.open().get("b1/backup_key.age"))
    status = run_with_prompt_answer(
        ["age", "-d", "-o", str(tmp_path / "key.txt"), str(wrapped)],
        b"passphrase", passphrase_file.read_text().strip(),
    )
    assert status == 0
    stored = storage_target.open().get("b1/base.tar.zst.age")
    names = tar_listing(stored, ["age", "-d", "-i", str(tmp_path / "key.txt")], ["zstd", "-dc"])
    assert "PG_VERSION" in names


def test_backup_no_collision(source: tuple[PgCluster, Path],
                             storage_target: StorageTarget) -> None:
    backup(source, storage_target, "b1")
    backup(source, storage_target, "b2")
    keys = stored_keys(storage_target)
    first = {k.removeprefix("b1/") for k in keys if k.startswith("b1/")}
    second = {k.removeprefix("b2/") for k in keys if k.startswith("b2/")}
    assert first == second  # the same files, each under its own name
    assert {k.split("/")[0] for k in keys} == {"b1", "b2"}


def test_backup_cluster_layout(source: tuple[PgCluster, Path],
                               storage_target: StorageTarget) -> None:
    backup(source, storage_target, "daily", "--cluster", "prod")
    keys = stored_keys(storage_target)
    assert "prod/backup/daily/manifest.json" in keys
    assert "prod/backup/daily/base.tar.zst" in keys
    assert all(k.startswith("prod/backup/daily/") for k in keys)
    listing = run_cli("list", "--cluster", "prod", env=storage_target.env)
    assert "Cluster: prod  (WAL archive: prod/wal_archive/)" in listing.stdout
    assert "daily" in listing.stdout


def test_restore_basic_and_plain_no_recovery_signal(
    source: tuple[PgCluster, Path], storage_target: StorageTarget
) -> None:
    backup(source, storage_target, "b1")
    pgdata, error = restore(storage_target, "b1")
    assert not error
    assert (pgdata / "PG_VERSION").read_text().strip() == "15"
    assert (pgdata / "global" / "pg_control").is_file()
    assert (pgdata / "base").is_dir()
    assert not (pgdata / "recovery.signal").exists()


def test_restore_keypair_encrypted(source: tuple[PgCluster, Path],
                                   storage_target: StorageTarget,
                                   keypair: tuple[Path, Path]) -> None:
    secret, public = keypair
    backup(source, storage_target, "b1", "--recipient-key", str(public))
    pgdata, error = restore(storage_target, "b1", "--identity-key", str(secret))
    assert not error
    assert (pgdata / "PG_VERSION").is_file()
    assert not (pgdata / "recovery.signal").exists()


def test_restore_passphrase_encrypted(source: tuple[PgCluster, Path],
                                      storage_target: StorageTarget,
                                      passphrase_file: Path) -> None:
    backup(source, storage_target, "b1", "--passphrase-file", str(passphrase_file))
    pgdata, error = restore(storage_target, "b1", "--passphrase-file", str(passphrase_file))
    assert not error
    assert (pgdata / "PG_VERSION").is_file()


def test_restore_cluster_layout(source: tuple[PgCluster, Path],
                                storage_target: StorageTarget) -> None:
    backup(source, storage_target, "daily", "--cluster", "prod")
    pgdata, error = restore(storage_target, "daily", cluster="prod")
    assert not error
    assert (pgdata / "PG_VERSION").is_file()
    assert not (pgdata / "recovery.signal").exists()
