"""``cloud-dump wal-fetch`` as PostgreSQL runs it: one process per file, working directory PGDATA.

The archive is written here in wal-push's format (key, compression and age suffixes, raw-sha256
metadata, archive info for passphrase mode), so these tests do not depend on wal-push. Every case
runs on both backends where storage matters.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import lz4.frame
import pytest
import zstandard

from coordinator.crypto import encrypt_bytes, generate_identity, wrap_identity
from storage import Storage
from storage.layout import Layout
from tests.rig.moto import StorageTarget, s3_target
from tests.rig.procs import free_port
from tests.rig.services import VENV_BIN

SEGMENT_BYTES = 16 * 1024 * 1024
SEGMENT = "000000010000000000000003"
PASSPHRASE = "correct horse battery staple"
FETCH_FAILED = 126


def segment_bytes(seed: int, size: int = SEGMENT_BYTES) -> bytes:
    """Deterministic WAL-like content: compressible, but different for every seed."""
    block = hashlib.sha256(str(seed).encode()).digest() * 128  # 4 KiB of varying bytes
    return (block + bytes(12 * 1024)) * (size // (16 * 1024))


def compress(data: bytes, compression: str) -> bytes:
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(data)
    if compression == "gzip":
        return gzip.compress(data, compresslevel=1)
    if compression == "lz4":
        return bytes(lz4.frame.compress(data))
    return data


def archive_wal(
    store: Storage,
    layout: Layout,
    name: str,
    data: bytes,
    *,
    compression: str = "zstd",
    recipients: Sequence[str] = (),
    raw_sha256: str | None = None,
) -> str:
    """Store ``data`` as wal-push does; returns the key."""
    payload = compress(data, compression)
    if recipients:
        payload = encrypt_bytes(payload, recipients)
    key = layout.wal_key(name, compression, encrypted=bool(recipients))
    metadata = {"raw-sha256": raw_sha256 or hashlib.sha256(data).hexdigest(),
                "system-identifier": "7300000000000000001"}
    store.put(key, payload, metadata=metadata)
    return key


@functools.cache
def wrapped_identity() -> tuple[bytes, str]:
    """One passphrase-wrapped identity for the whole module: scrypt costs seconds a call."""
    identity, recipient = generate_identity()
    return wrap_identity(identity, PASSPHRASE), recipient


def passphrase_archive(store: Storage, layout: Layout) -> str:
    """Archive info for passphrase mode; returns the public key WAL is encrypted to."""
    wrapped, recipient = wrapped_identity()
    wrapped_key = layout.wal_root + "cloud-dump-archive-key.age"
    store.put(wrapped_key, wrapped)
    info = {"format": 1, "system_identifier": "7300000000000000001",
            "encryption": {"mode": "passphrase", "recipient": recipient,
                           "wrapped_identity_key": wrapped_key}}
    store.put(layout.wal_root + "cloud-dump-archive.json", json.dumps(info).encode())
    return recipient


@pytest.fixture
def pgdata(tmp_path: Path) -> Path:
    """Stands for the data directory restore_command runs in."""
    path = tmp_path / "pgdata"
    (path / "pg_wal").mkdir(parents=True)
    return path


def wal_fetch(
    target: StorageTarget,
    pgdata: Path,
    name: str,
    *extra: str,
    dest: str = "pg_wal/RECOVERYXLOG",
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run wal-fetch as restore_command does: %p relative to PGDATA, the working directory."""
    return subprocess.run(
        [str(VENV_BIN / "cloud-dump"), "wal-fetch", name, dest, *extra],
        capture_output=True, text=True, timeout=120, cwd=pgdata, check=False,
        env={**os.environ, "CLOUD_DUMP_WAL_FETCH_RETRIES": "1", **target.env, **(env or {})},
    )


def assert_not_written(pgdata: Path) -> None:
    leftovers = [p.name for p in (pgdata / "pg_wal").iterdir() if p.is_file()]
    assert leftovers == [], "wal-fetch left files in pg_wal"


# --- formats --------------------------------------------------------------------------------


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
    layout = Layout()
    recipient = passphrase_archive(storage, layout)
    first, second = segment_bytes(3), segment_bytes(4)
    archive_wal(storage, layout, SEGMENT, first, recipients=[recipient])
    archive_wal(storage, layout, "000000010000000000000004", second, recipients=[recipient])
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text(PASSPHRASE + "\n")

    done = wal_fetch(storage_target, pgdata, SEGMENT, "--prefetch", "0",
                     env={"CLOUD_DUMP_PASSPHRASE_FILE": str(passphrase_file)})
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == first
    cached = pgdata / "pg_wal/cloud-dump/identity.key"
    assert stat.S_IMODE(cached.stat().st_mode) == 0o600

    # The cached identity serves later calls: no passphrase needed, no scrypt paid.
    passphrase_file.unlink()
    started = time.monotonic()
    done = wal_fetch(storage_target, pgdata, "000000010000000000000004",
                     "--prefetch", "0")
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == second
    assert time.monotonic() - started < 1.5, "the identity was unwrapped again"


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


# --- not found and failures -----------------------------------------------------------------


def test_fetch_missing_segment_exits_1_and_writes_nothing(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    archive_wal(storage, Layout(), SEGMENT, segment_bytes(6))
    done = wal_fetch(storage_target, pgdata, "000000010000000000000099")
    assert done.returncode == 1, done.stderr
    assert_not_written(pgdata)


def test_fetch_missing_history_file_answers_1_at_once(
    storage_target: StorageTarget, pgdata: Path
) -> None:
    # Asked at every recovery start and promotion: must not sit through retries.
    started = time.monotonic()
    done = wal_fetch(storage_target, pgdata, "00000002.history", dest="pg_wal/RECOVERYHISTORY")
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 3.0
    assert_not_written(pgdata)


def test_fetch_history_file(storage_target: StorageTarget, storage: Storage,
                            pgdata: Path) -> None:
    history = b"1\t0/3000000\tno recovery target specified\n"
    archive_wal(storage, Layout(), "00000002.history", history)
    done = wal_fetch(storage_target, pgdata, "00000002.history", dest="pg_wal/RECOVERYHISTORY")
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYHISTORY").read_bytes() == history


def test_fetch_with_wrong_passphrase_fails_and_writes_nothing(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    recipient = passphrase_archive(storage, Layout())
    archive_wal(storage, Layout(), SEGMENT, segment_bytes(7), recipients=[recipient])
    done = wal_fetch(storage_target, pgdata, SEGMENT, env={"CLOUD_DUMP_PASSPHRASE": "wrong"})
    assert done.returncode == FETCH_FAILED
    assert "wrong passphrase" in done.stderr
    assert_not_written(pgdata)
    assert not (pgdata / "pg_wal/cloud-dump/identity.key").exists()


def test_fetch_of_content_not_matching_raw_sha256_fails_and_writes_nothing(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    archive_wal(storage, Layout(), SEGMENT, segment_bytes(8), raw_sha256="0" * 64)
    done = wal_fetch(storage_target, pgdata, SEGMENT)
    assert done.returncode == FETCH_FAILED
    assert "does not match its recorded sha256" in done.stderr
    assert_not_written(pgdata)


def test_fetch_from_unreachable_storage_exits_above_125(
    pgdata: Path, aws_env: dict[str, str]
) -> None:
    # Nothing listens there: after the retries PostgreSQL must stop, not promote.
    dead = s3_target(f"http://127.0.0.1:{free_port()}", "no-bucket", aws_env)
    started = time.monotonic()
    done = wal_fetch(dead, pgdata, SEGMENT, env={"CLOUD_DUMP_WAL_FETCH_RETRIES": "2",
                                                  "CLOUD_DUMP_STORAGE_MAX_ATTEMPTS": "1"})
    assert done.returncode == FETCH_FAILED, done.stderr
    assert "retrying" in done.stderr
    assert time.monotonic() - started >= 2.0
    assert_not_written(pgdata)


def test_fetch_rejects_invalid_name_above_125(storage_target: StorageTarget,
                                              pgdata: Path) -> None:
    done = wal_fetch(storage_target, pgdata, "../../etc/passwd")
    assert done.returncode == FETCH_FAILED
    assert_not_written(pgdata)


def test_partial_segment_served_only_with_allow_partial(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    name = SEGMENT + ".partial"
    data = segment_bytes(9)
    archive_wal(storage, Layout(), name, data)
    assert wal_fetch(storage_target, pgdata, name, dest=f"pg_wal/{name}").returncode == 1
    assert_not_written(pgdata)
    done = wal_fetch(storage_target, pgdata, name, "--allow-partial", dest=f"pg_wal/{name}")
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal" / name).read_bytes() == data


def test_segment_request_ignores_partial_and_backup_files_of_that_name(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    archive_wal(storage, Layout(), SEGMENT + ".partial", segment_bytes(10))
    archive_wal(storage, Layout(), SEGMENT + ".00000028.backup", b"START WAL LOCATION")
    assert wal_fetch(storage_target, pgdata, SEGMENT).returncode == 1
    assert_not_written(pgdata)


def test_fetch_uses_cluster_wal_prefix(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    data = segment_bytes(11)
    archive_wal(storage, Layout(cluster="prod-pg17"), SEGMENT, data)
    assert wal_fetch(storage_target, pgdata, SEGMENT).returncode == 1  # not in the flat prefix
    done = wal_fetch(storage_target, pgdata, SEGMENT,
                     "--cluster", "prod-pg17")
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == data


# --- many segments, prefetch and the spool -----------------------------------------------------


def segment_name(number: int) -> str:
    return f"0000000100000000{number:08X}"


def test_many_segments_fetched_back_byte_for_byte_with_prefetch(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    count = 16
    contents = {segment_name(n): segment_bytes(100 + n) for n in range(1, count + 1)}
    for name, data in contents.items():
        archive_wal(storage, Layout(), name, data)
    started = time.monotonic()
    for name, data in contents.items():
        done = wal_fetch(storage_target, pgdata, name, "--prefetch", "8")
        assert done.returncode == 0, done.stderr
        assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == data, name
    elapsed = time.monotonic() - started
    print(f"wal-fetch {storage_target.kind}: {count} segments in {elapsed:.2f} s "
          f"({count / elapsed:.1f} segments/s, one process per segment, prefetch 8)")
    # The end of the archive: 1, and the spool holds nothing that was served.
    assert wal_fetch(storage_target, pgdata, segment_name(count + 1)).returncode == 1
    assert list((pgdata / "pg_wal/cloud-dump/prefetch").iterdir()) == []


def test_prefetched_segment_is_served_from_the_spool(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    first, second = segment_name(1), segment_name(2)
    archive_wal(storage, Layout(), first, segment_bytes(20))
    archive_wal(storage, Layout(), second, segment_bytes(21))
    assert wal_fetch(storage_target, pgdata, first, "--prefetch", "2").returncode == 0
    assert (pgdata / "pg_wal/cloud-dump/prefetch" / second).is_file()
    # Gone from storage: only the spool can serve it now.
    storage.delete(Layout().wal_key(second, "zstd", encrypted=False))
    done = wal_fetch(storage_target, pgdata, second, "--prefetch", "2")
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == segment_bytes(21)
    assert not (pgdata / "pg_wal/cloud-dump/prefetch" / second).exists()


def test_spooled_file_from_another_archive_or_damaged_is_not_served(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    first, second, third = segment_name(1), segment_name(2), segment_name(3)
    for n, name in enumerate((first, second, third)):
        archive_wal(storage, Layout(), name, segment_bytes(30 + n))
    assert wal_fetch(storage_target, pgdata, first, "--prefetch", "2").returncode == 0
    spool = pgdata / "pg_wal/cloud-dump/prefetch"
    # A spool left by a restore from another archive, and a file damaged on disk.
    sidecar = json.loads((spool / f"{second}.json").read_text())
    (spool / f"{second}.json").write_text(json.dumps({**sidecar, "source": "file:///other#x/"}))
    (spool / second).write_bytes(b"stale")
    (spool / third).write_bytes(segment_bytes(99))
    for name, seed in ((second, 31), (third, 32)):
        done = wal_fetch(storage_target, pgdata, name, "--prefetch", "0")
        assert done.returncode == 0, done.stderr
        assert "discarding spooled" in done.stderr
        assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == segment_bytes(seed)
