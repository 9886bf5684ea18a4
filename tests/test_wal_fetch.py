"""``cloud-dump wal-fetch`` as PostgreSQL runs it: one process per file, working directory PGDATA.

The archive is written in wal-push's format by ``devrig.walarchive``, so these tests do not
depend on wal-push. Every case runs on both backends where storage matters.

A call may leave the detached prefetcher running: every test waits for it to finish (or kills
that one process) before its data directory goes away (the ``pgdata`` fixture). It stops after
1 s without a segment taken from the spool here (5 s by default), so that the tests do not wait
on it for long.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest

from coordinator.background import HelperLock
from coordinator.cli.exitcodes import ExitCode
from coordinator.crypto import generate_identity
from coordinator.wal.fetch.spool import Spool, archive_source
from devrig.moto import StorageTarget, s3_target
from devrig.procs import free_port
from devrig.walarchive import (
    SEGMENT,
    SEGMENT_BYTES,
    archive_wal,
    assert_not_written,
    passphrase_archive,
    passphrase_segments,
    segment_bytes,
    segment_name,
    spool_dir,
    wait_for_prefetcher,
    wal_fetch,
)
from storage.base import Storage
from storage.layout import Layout

FETCH_FAILED = ExitCode.WAL_FETCH_FAILED


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


# --- not found and failures -----------------------------------------------------------------


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
    flat = wal_fetch(storage_target, pgdata, SEGMENT)  # no archive in the flat prefix at all
    assert flat.returncode == FETCH_FAILED, flat.stderr
    assert "no WAL archive at" in flat.stderr
    done = wal_fetch(storage_target, pgdata, SEGMENT,
                     "--cluster", "prod-pg17")
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == data


# --- many segments, prefetch and the spool -----------------------------------------------------


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
    assert wait_for_prefetcher(pgdata)
    assert list((spool_dir(pgdata) / "prefetch").iterdir()) == []


def test_prefetcher_runs_detached_and_spools_verified_segments_with_sidecars(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    names = [segment_name(n) for n in range(1, 5)]
    for n, name in enumerate(names):
        archive_wal(storage, Layout(), name, segment_bytes(20 + n))
    done = wal_fetch(storage_target, pgdata, names[0], "--prefetch", "3")
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == segment_bytes(20)
    # The call returned without waiting for its prefetches; the prefetcher finishes on its own.
    assert wait_for_prefetcher(pgdata)
    spool = spool_dir(pgdata) / "prefetch"
    assert sorted(p.name for p in spool.iterdir()) == sorted(
        [*names[1:], *(f"{name}.json" for name in names[1:])]
    )
    for n, name in enumerate(names[1:], start=1):
        sidecar = json.loads((spool / f"{name}.json").read_text())
        assert sidecar["raw_sha256"] == hashlib.sha256(segment_bytes(20 + n)).hexdigest()
        assert sidecar["size"] == SEGMENT_BYTES
        assert sidecar["source"].startswith(storage_target.url)
    # Gone from storage: only the spool can serve them now.
    for name in names[1:]:
        storage.delete(Layout().wal_key(name, "zstd", encrypted=False))
    for n, name in enumerate(names[1:], start=1):
        done = wal_fetch(storage_target, pgdata, name, "--prefetch", "3")
        assert done.returncode == 0, done.stderr
        assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == segment_bytes(20 + n)
        assert not (spool / name).exists()
        assert not (spool / f"{name}.json").exists()


def test_one_prefetcher_keeps_the_window_full_as_calls_take_segments(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    count = 8
    names = [segment_name(n) for n in range(1, count + 1)]
    for n, name in enumerate(names):
        archive_wal(storage, Layout(), name, segment_bytes(70 + n))
    slow_idle = {"CLOUD_DUMP_WAL_PREFETCH_IDLE_EXIT": "20"}
    assert wal_fetch(storage_target, pgdata, names[0], "--prefetch", "2",
                     env=slow_idle).returncode == 0  # fmt: skip
    spool = spool_dir(pgdata) / "prefetch"
    for n, name in enumerate(names[1:], start=1):
        # Beyond the first window of two: spooled only because a segment was taken.
        deadline = time.monotonic() + 30
        while not (spool / f"{name}.json").exists():
            assert time.monotonic() < deadline, f"'{name}' was never prefetched"
            time.sleep(0.01)
        storage.delete(Layout().wal_key(name, "zstd", encrypted=False))
        done = wal_fetch(storage_target, pgdata, name, "--prefetch", "2", env=slow_idle)
        assert done.returncode == 0, done.stderr
        assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == segment_bytes(70 + n)
    # It reached the end of the archive and left; it was the only one.
    assert wait_for_prefetcher(pgdata, timeout_s=10)
    log = (spool_dir(pgdata) / "prefetch.log").read_text()
    assert log.count("prefetching from") == 1, log
    assert f"'{segment_name(count + 1)}' is not in the archive" in log


def test_served_segment_is_moved_not_copied(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    first, second = segment_name(1), segment_name(2)
    archive_wal(storage, Layout(), first, segment_bytes(40))
    archive_wal(storage, Layout(), second, segment_bytes(41))
    assert wal_fetch(storage_target, pgdata, first, "--prefetch", "1").returncode == 0
    assert wait_for_prefetcher(pgdata)
    spooled = spool_dir(pgdata) / "prefetch" / second
    inode = spooled.stat().st_ino
    done = wal_fetch(storage_target, pgdata, second, "--prefetch", "0")
    assert done.returncode == 0, done.stderr
    restored = pgdata / "pg_wal/RECOVERYXLOG"
    assert restored.stat().st_ino == inode, "the spooled file was copied, not renamed"
    assert restored.read_bytes() == segment_bytes(41)
    assert not spooled.exists()


def test_segment_spooled_on_another_file_system_is_copied_into_place(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == pgdata.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's data directory")
    first, second = segment_name(1), segment_name(2)
    archive_wal(storage, Layout(), first, segment_bytes(42))
    archive_wal(storage, Layout(), second, segment_bytes(43))
    spool = Path(tempfile.mkdtemp(dir=shm))
    try:
        flags = ("--spool-dir", str(spool))
        assert wal_fetch(storage_target, pgdata, first, *flags, "--prefetch", "1").returncode == 0
        assert wait_for_prefetcher(pgdata)
        storage.delete(Layout().wal_key(second, "zstd", encrypted=False))
        done = wal_fetch(storage_target, pgdata, second, *flags, "--prefetch", "0")
        assert done.returncode == 0, done.stderr
        assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == segment_bytes(43)
        assert list((spool / "prefetch").iterdir()) == []
        assert sorted(p.name for p in (pgdata / "pg_wal").iterdir()) == ["RECOVERYXLOG"]
    finally:
        wait_for_prefetcher(pgdata)
        shutil.rmtree(spool)


def test_spooled_file_without_sidecar_of_wrong_size_or_from_another_archive_is_not_served(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    names = [segment_name(n) for n in range(1, 5)]
    for n, name in enumerate(names):
        archive_wal(storage, Layout(), name, segment_bytes(30 + n))
    assert wal_fetch(storage_target, pgdata, names[0], "--prefetch", "3").returncode == 0
    assert wait_for_prefetcher(pgdata)
    spool = spool_dir(pgdata) / "prefetch"
    foreign, short, unfinished = names[1:]
    # A spool left by a restore from another archive, a file damaged on disk, and a file whose
    # prefetcher was stopped before it wrote the sidecar.
    sidecar = json.loads((spool / f"{foreign}.json").read_text())
    (spool / f"{foreign}.json").write_text(json.dumps({**sidecar, "source": "file:///other#x/"}))
    (spool / short).write_bytes(b"stale")
    (spool / f"{unfinished}.json").unlink()
    for n, name in enumerate(names[1:], start=1):
        done = wal_fetch(storage_target, pgdata, name, "--prefetch", "0")
        assert done.returncode == 0, done.stderr
        assert "discarding spooled" in done.stderr
        assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == segment_bytes(30 + n)


def test_call_waits_for_a_running_prefetcher_that_plans_its_segment(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    # This test process stands for the prefetcher: it holds the lock and plans the segment, then
    # spools it a little later. The segment is not in storage: only the spool can serve it.
    spool = Spool(spool_dir(pgdata), _source_of(storage_target))
    lock = HelperLock(spool.lock_path)
    assert lock.try_acquire()
    data = segment_bytes(50)
    deliver = threading.Timer(
        0.5, lambda: spool.put(SEGMENT, data, hashlib.sha256(data).hexdigest())
    )
    try:
        spool.write_plan([SEGMENT])
        deliver.start()
        done = wal_fetch(storage_target, pgdata, SEGMENT)
    finally:
        deliver.cancel()
        lock.release()
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == data


def test_hung_prefetcher_does_not_hold_the_call_beyond_its_bound(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    data = segment_bytes(51)
    archive_wal(storage, Layout(), SEGMENT, data)
    # A "prefetcher" (this process) that planned the segment and never delivers it.
    spool = Spool(spool_dir(pgdata), _source_of(storage_target))
    lock = HelperLock(spool.lock_path)
    assert lock.try_acquire()
    try:
        spool.write_plan([SEGMENT])
        started = time.monotonic()
        done = wal_fetch(storage_target, pgdata, SEGMENT,
                         env={"CLOUD_DUMP_WAL_PREFETCH_WAIT": "1"})
        elapsed = time.monotonic() - started
    finally:
        lock.release()
    assert done.returncode == 0, done.stderr
    assert "has not delivered" in done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == data
    assert 1.0 <= elapsed < 30.0


def test_plan_of_a_dead_prefetcher_is_not_waited_for(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    data = segment_bytes(52)
    archive_wal(storage, Layout(), SEGMENT, data)
    # A plan naming the segment, but no process holds the lock (its prefetcher was killed).
    Spool(spool_dir(pgdata), _source_of(storage_target)).write_plan([SEGMENT])
    started = time.monotonic()
    done = wal_fetch(storage_target, pgdata, SEGMENT)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 20.0  # the default bound is 30 s
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == data


def test_prefetch_0_and_history_files_start_no_prefetcher(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    archive_wal(storage, Layout(), segment_name(1), segment_bytes(60))
    archive_wal(storage, Layout(), segment_name(2), segment_bytes(61))
    archive_wal(storage, Layout(), "00000002.history", b"1\t0/3000000\tno reason\n")
    assert wal_fetch(storage_target, pgdata, segment_name(1), "--prefetch", "0").returncode == 0
    assert wal_fetch(storage_target, pgdata, "00000002.history",
                     dest="pg_wal/RECOVERYHISTORY").returncode == 0
    assert not (spool_dir(pgdata) / "prefetch.lock").exists()
    assert not (spool_dir(pgdata) / "prefetch").exists()


def _source_of(target: StorageTarget) -> str:
    """The archive as wal-fetch names it in sidecars, with the settings these tests use."""
    return archive_source(target.url, None, None)
