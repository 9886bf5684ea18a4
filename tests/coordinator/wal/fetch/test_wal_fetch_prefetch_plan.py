"""A wal-fetch call and the prefetcher's plan: it waits for a running prefetcher that plans
its segment, but not beyond its bound for a hung one nor at all for a dead one's plan; no
prefetcher is started for ``--prefetch 0`` or a history file.

The archive is written in wal-push's format by ``devrig.walarchive``, so these tests do not
depend on wal-push. Every case runs on both backends where storage matters.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from coordinator.background import HelperLock
from coordinator.wal.fetch.spool import Spool, archive_source
from devrig.moto import StorageTarget
from devrig.walarchive import (
    SEGMENT,
    archive_wal,
    segment_bytes,
    segment_name,
    spool_dir,
    wal_fetch,
)
from storage.base import Storage
from storage.layout import Layout


def test_call_waits_for_a_running_prefetcher_that_plans_its_segment(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    # This test process stands for the prefetcher: it holds the lock and plans the segment, then
    # spools it a little later. The segment is not in storage: only the spool can serve it.
    spool = Spool(spool_dir(pgdata), _source_of(storage_target))
    lock = HelperLock(spool.lock_path)
    assert lock.try_acquire()
    data = segment_bytes(50)
    deliver = threading.Timer(0.5, lambda: spool.put(SEGMENT, _writing(data)))
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


def _writing(data: bytes) -> Callable[[IO[bytes]], tuple[int, str]]:
    """A ``Spool.put`` writer of ``data``, as ``WalArchive.copy`` writes a verified file."""

    def write(f: IO[bytes]) -> tuple[int, str]:
        f.write(data)
        return len(data), hashlib.sha256(data).hexdigest()

    return write
