"""``cloud-dump wal-fetch`` as PostgreSQL runs it (one process per file, working directory
PGDATA): every stored format served byte for byte (compressed, encrypted to a passphrase or
a key pair, history files, the cluster layout).

The archive is written in wal-push's format by ``devrig.walarchive``, so these tests do not
depend on wal-push. Every case runs on both backends where storage matters.

A call may leave the detached prefetcher running: every test waits for it to finish (or kills
that one process) before its data directory goes away (the ``pgdata`` fixture). It stops after
1 s without a segment taken from the spool here (5 s by default), so that the tests do not wait
on it for long.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from coordinator.crypto import generate_identity
from devrig.moto import StorageTarget
from devrig.walarchive import (
    SEGMENT,
    archive_wal,
    passphrase_segments,
    segment_bytes,
    segment_name,
    wait_for_prefetcher,
    wal_fetch,
)
from storage.base import Storage
from storage.layout import Layout

FETCH_FAILED = ExitCode.WAL_FETCH_FAILED


def test_fetch_uncompressed_segment_writes_exact_bytes(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    data = segment_bytes(1)
    archive_wal(storage, Layout(), SEGMENT, data, compression="none")
    done = wal_fetch(storage_target, pgdata, SEGMENT, "--prefetch", "0")
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == data
    # Nothing else in pg_wal: no temp file left behind.
    assert sorted(p.name for p in (pgdata / "pg_wal").iterdir()) == ["RECOVERYXLOG"]


@pytest.mark.parametrize("compression", ["zstd", "gzip", "lz4"])
def test_fetch_compressed_segment(
    storage_target: StorageTarget, storage: Storage, pgdata: Path, compression: str
) -> None:
    if storage_target.kind == "s3" and compression != "zstd":
        pytest.skip("decompression does not depend on the backend: zstd covers s3")
    data = segment_bytes(2)
    archive_wal(storage, Layout(), SEGMENT, data, compression=compression)
    done = wal_fetch(storage_target, pgdata, SEGMENT, dest=f"pg_wal/{SEGMENT}")
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal" / SEGMENT).read_bytes() == data


def test_fetch_passphrase_encrypted_unwraps_once_and_caches_identity(
    storage_target: StorageTarget, storage: Storage, pgdata: Path, tmp_path: Path
) -> None:
    first, second = segment_bytes(3), segment_bytes(4)
    segments = {SEGMENT: first, "000000010000000000000004": second}
    passphrase_file = passphrase_segments(storage, Layout(), segments, tmp_path)

    done = wal_fetch(storage_target, pgdata, SEGMENT, "--prefetch", "0",
                     env={"CLOUD_DUMP_PASSPHRASE_FILE": str(passphrase_file)})
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == first
    cached = pgdata / "pg_wal/cloud-dump/identity.key"
    assert stat.S_IMODE(cached.stat().st_mode) == 0o600

    # The cached identity serves later calls: with the passphrase gone, a call that tried to
    # unwrap the archive key again (scrypt) would fail for want of it.
    passphrase_file.unlink()
    done = wal_fetch(storage_target, pgdata, "000000010000000000000004",
                     "--prefetch", "0")
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == second


def test_prefetcher_decrypts_passphrase_encrypted_segments(
    storage_target: StorageTarget, storage: Storage, pgdata: Path, tmp_path: Path
) -> None:
    layout = Layout()
    first, second = segment_name(1), segment_name(2)
    segments = {first: segment_bytes(12), second: segment_bytes(13)}
    passphrase_file = passphrase_segments(storage, layout, segments, tmp_path)
    env = {"CLOUD_DUMP_PASSPHRASE_FILE": str(passphrase_file)}
    assert wal_fetch(storage_target, pgdata, first, "--prefetch", "1", env=env).returncode == 0
    assert wait_for_prefetcher(pgdata)
    storage.delete(layout.wal_key(second, "zstd", encrypted=True))
    done = wal_fetch(storage_target, pgdata, second, "--prefetch", "1", env=env)
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == segment_bytes(13)


def test_fetch_key_pair_encrypted(
    storage_target: StorageTarget, storage: Storage, pgdata: Path, tmp_path: Path
) -> None:
    identity, recipient = generate_identity()
    key_file = tmp_path / "wal.key"
    key_file.write_text(identity + "\n")
    data = segment_bytes(5)
    archive_wal(storage, Layout(), SEGMENT, data, recipients=[recipient])
    done = wal_fetch(storage_target, pgdata, SEGMENT,
                     "--identity-key", str(key_file))
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == data


def test_fetch_history_file(storage_target: StorageTarget, storage: Storage,
                            pgdata: Path) -> None:
    history = b"1\t0/3000000\tno recovery target specified\n"
    archive_wal(storage, Layout(), "00000002.history", history)
    done = wal_fetch(storage_target, pgdata, "00000002.history", dest="pg_wal/RECOVERYHISTORY")
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYHISTORY").read_bytes() == history


def test_fetch_uses_cluster_wal_prefix(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    data = segment_bytes(11)
    archive_wal(storage, Layout(cluster="prod-pg17"), SEGMENT, data)
    flat = wal_fetch(storage_target, pgdata, SEGMENT)  # no archive in the flat prefix at all
    assert flat.returncode == FETCH_FAILED, flat.stderr
    assert "no WAL archive at" in flat.stderr
    done = wal_fetch(storage_target, pgdata, SEGMENT,
                     "--cluster", "prod-pg17")
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == data
