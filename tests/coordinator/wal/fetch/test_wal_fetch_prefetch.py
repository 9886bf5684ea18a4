"""wal-fetch's prefetch: a detached prefetcher spools the next segments, verified, with
sidecars; later calls take them from the spool (moved into place, or copied across file
systems), and a spooled file that cannot be proven to be the one asked for is not served.

The archive is written in wal-push's format by ``devrig.walarchive``, so these tests do not
depend on wal-push. Every case runs on both backends where storage matters.

A call may leave the detached prefetcher running: every test waits for it to finish (or kills
that one process) before its data directory goes away (the ``pgdata`` fixture). It stops after
1 s without a segment taken from the spool here (5 s by default), so that the tests do not wait
on it for long.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from coordinator.wait import wait_until
from coordinator.wal.fetch.served import boot_id, parse_sidecar
from devrig.moto import StorageTarget
from devrig.walarchive import (
    SEGMENT_BYTES,
    archive_wal,
    segment_bytes,
    segment_name,
    spool_dir,
    wait_for_prefetcher,
    wal_fetch,
)
from storage.base import Storage
from storage.layout import Layout


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
        [*names[1:], *(f"{name}.sidecar" for name in names[1:])]
    )
    for n, name in enumerate(names[1:], start=1):
        sidecar = parse_sidecar((spool / f"{name}.sidecar").read_bytes())
        assert sidecar is not None
        assert sidecar["raw_sha256"] == hashlib.sha256(segment_bytes(20 + n)).hexdigest()
        assert sidecar["size"] == str(SEGMENT_BYTES)
        assert sidecar["source"].startswith(storage_target.url)
        assert sidecar["boot_id"] == boot_id()
    # Gone from storage: only the spool can serve them now.
    for name in names[1:]:
        storage.delete(Layout().wal_key(name, "zstd", encrypted=False))
    for n, name in enumerate(names[1:], start=1):
        done = wal_fetch(storage_target, pgdata, name, "--prefetch", "3")
        assert done.returncode == 0, done.stderr
        assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == segment_bytes(20 + n)
        assert not (spool / name).exists()
        assert not (spool / f"{name}.sidecar").exists()


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
        assert wait_until((spool / f"{name}.sidecar").exists, timeout_s=30, first_s=0.01), (
            f"'{name}' was never prefetched")
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


def test_spooled_file_written_before_the_machine_restarted_is_not_served(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    names = [segment_name(n) for n in range(1, 3)]
    for n, name in enumerate(names):
        archive_wal(storage, Layout(), name, segment_bytes(40 + n))
    assert wal_fetch(storage_target, pgdata, names[0], "--prefetch", "1").returncode == 0
    assert wait_for_prefetcher(pgdata)
    spool = spool_dir(pgdata) / "prefetch"
    sidecar = spool / f"{names[1]}.sidecar"
    current = boot_id()
    assert current is not None and current in sidecar.read_text()
    # Spooled files are not fsynced: after a crash of the machine, one may hold zeros where its
    # sidecar, written in the boot before, promises the segment.
    sidecar.write_text(sidecar.read_text().replace(current, "00000000-0000-0000-0000-000000000000"))
    (spool / names[1]).write_bytes(bytes(SEGMENT_BYTES))

    done = wal_fetch(storage_target, pgdata, names[1], "--prefetch", "1")

    assert done.returncode == 0, done.stderr
    assert "written before the machine restarted" in done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == segment_bytes(41)


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
    sidecar = (spool / f"{foreign}.sidecar").read_text()
    source = sidecar.split("source=")[1].split("\n")[0]
    (spool / f"{foreign}.sidecar").write_text(sidecar.replace(source, "file:///other#x/"))
    (spool / short).write_bytes(b"stale")
    (spool / f"{unfinished}.sidecar").unlink()
    for n, name in enumerate(names[1:], start=1):
        done = wal_fetch(storage_target, pgdata, name, "--prefetch", "0")
        assert done.returncode == 0, done.stderr
        assert "discarding spooled" in done.stderr
        assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == segment_bytes(30 + n)
