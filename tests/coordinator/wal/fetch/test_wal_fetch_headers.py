"""wal-fetch refuses to hand PostgreSQL a segment whose first page says it is another segment.

PostgreSQL reads such a file's "unexpected pageaddr" as the end of WAL and, in archive
recovery, promotes early with part of the data. wal-push has refused to store one since it
checks headers, but an archive written by an older version, another tool or a hand copy may
hold one: wal-fetch stops recovery (200) instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from devrig.moto import StorageTarget
from devrig.services import error_line
from devrig.walarchive import archive_wal, assert_not_written, segment_name, wal_fetch
from devrig.walfiles import SYSID_A, make_segment
from storage.base import Storage
from storage.layout import Layout

WANTED = segment_name(6)
OTHER = segment_name(5)


@pytest.mark.parametrize("route", ["direct", "prefetch"])
def test_segment_stored_under_another_segments_name_stops_recovery(
    storage_target: StorageTarget, storage: Storage, pgdata: Path, route: str
) -> None:
    archive_wal(storage, Layout(), WANTED, make_segment(SYSID_A, 1, OTHER))
    flags = ["--prefetch", "0"] if route == "direct" else []
    if route == "prefetch":  # the prefetcher reads it first, for the call before
        archive_wal(storage, Layout(), OTHER, make_segment(SYSID_A, 2, OTHER))
        assert wal_fetch(storage_target, pgdata, OTHER).returncode == 0
        (pgdata / "pg_wal/RECOVERYXLOG").unlink()  # replayed: PostgreSQL removes it
    done = wal_fetch(storage_target, pgdata, WANTED, *flags)
    assert done.returncode == ExitCode.WAL_FETCH_FAILED, done.stderr
    line = error_line(done.stderr)
    assert f"holds segment {OTHER}" in line and WANTED in line, line
    assert_not_written(pgdata)


@pytest.mark.parametrize("name", [WANTED, f"{WANTED}.partial"])
def test_segment_under_its_own_name_is_served(
    storage_target: StorageTarget, storage: Storage, pgdata: Path, name: str
) -> None:
    data = make_segment(SYSID_A, 3, name)
    archive_wal(storage, Layout(), name, data)
    done = wal_fetch(storage_target, pgdata, name, "--prefetch", "0", "--allow-partial")
    assert done.returncode == 0, done.stderr
    assert (pgdata / "pg_wal/RECOVERYXLOG").read_bytes() == data
