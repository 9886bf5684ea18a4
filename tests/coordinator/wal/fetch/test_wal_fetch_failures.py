"""wal-fetch answers 1 only for a file the archive does not have, and fails (above 125, so
that PostgreSQL stops) on a wrong passphrase, content not matching its checksum, storage out
of reach or an invalid name; ``.partial`` and ``.backup`` files are not segments. Nothing is
written but the file asked for.

The archive is written in wal-push's format by ``devrig.walarchive``, so these tests do not
depend on wal-push. Every case runs on both backends where storage matters.
"""

from __future__ import annotations

import time
from pathlib import Path

from coordinator.cli.exitcodes import ExitCode
from coordinator.crypto import generate_identity
from devrig.moto import StorageTarget, s3_target
from devrig.procs import free_port
from devrig.walarchive import (
    SEGMENT,
    archive_wal,
    assert_not_written,
    passphrase_archive,
    segment_bytes,
    wal_fetch,
)
from storage.base import Storage
from storage.layout import Layout

FETCH_FAILED = ExitCode.WAL_FETCH_FAILED


def test_fetch_missing_segment_exits_1_and_writes_nothing(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    archive_wal(storage, Layout(), SEGMENT, segment_bytes(6))
    done = wal_fetch(storage_target, pgdata, "000000010000000000000099")
    assert done.returncode == 1, done.stderr
    assert_not_written(pgdata)


def test_fetch_missing_history_file_answers_1_at_once(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    # Asked at every recovery start and promotion: must not sit through retries.
    archive_wal(storage, Layout(), SEGMENT, segment_bytes(6))
    started = time.monotonic()
    done = wal_fetch(storage_target, pgdata, "00000002.history", dest="pg_wal/RECOVERYHISTORY")
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 3.0
    assert_not_written(pgdata)


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


def test_fetch_of_a_damaged_encrypted_segment_names_it_as_damaged_not_the_key(
    storage_target: StorageTarget, storage: Storage, pgdata: Path, tmp_path: Path
) -> None:
    identity, recipient = generate_identity()
    (tmp_path / "wal.key").write_text(identity + "\n")
    key = archive_wal(storage, Layout(), SEGMENT, segment_bytes(9), recipients=[recipient])
    damaged = bytearray(storage.get(key))
    damaged[len(damaged) // 2] ^= 0x01
    metadata = storage.head(key).metadata
    storage.delete(key)
    storage.put(key, bytes(damaged), metadata=metadata)
    done = wal_fetch(storage_target, pgdata, SEGMENT,
                     env={"CLOUD_DUMP_IDENTITY_KEY": str(tmp_path / "wal.key")})
    assert done.returncode == FETCH_FAILED
    assert f"archived WAL '{key}' is damaged: a chunk of its age payload fails" in done.stderr
    assert "decrypt" not in done.stderr
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
