"""wal-fetch never answers "end of the archive" at a gap: a segment missing while later WAL of
its timeline is archived stops recovery (200) instead of promoting without that later WAL.

PostgreSQL reads exit 1 as the end of the archive and, with a target such as ``latest``,
promotes there: a segment lost from the archive (deleted by hand, a failed copy, a lifecycle
rule) would silently cut the restore short although the WAL after it is stored. Only the end
of a timeline in the archive is answered 1; a standby, which keeps asking and can stream from
its primary, is answered 1 with a warning. Real recoveries are in ``test_wal_fetch_recovery.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.cli.exitcodes import ExitCode
from devrig.moto import StorageTarget
from devrig.services import error_line
from devrig.walarchive import archive_wal, assert_not_written, wal_fetch
from devrig.walfiles import SYSID_A, make_segment
from storage.base import Storage
from storage.layout import Layout


def _name(timeline: int, log: int, seg: int) -> str:
    return f"{timeline:08X}{log:08X}{seg:08X}"


def _archive(storage: Storage, *names: str) -> None:
    for seed, name in enumerate(names):
        archive_wal(storage, Layout(), name, make_segment(SYSID_A, seed, name))


@pytest.mark.parametrize("route", ["direct", "prefetch"])
@pytest.mark.parametrize(
    ("stored", "missing"),
    [
        pytest.param([(1, 0, 1), (1, 0, 2), (1, 0, 4)], (1, 0, 3), id="later-in-the-same-log"),
        pytest.param([(1, 0, 0xFE), (1, 1, 0)], (1, 0, 0xFF), id="later-in-the-next-log"),
        pytest.param([(2, 0, 1), (2, 0, 3), (2, 0, 9)], (2, 0, 2), id="on-a-later-timeline"),
    ],
)
def test_a_missing_segment_before_stored_ones_of_its_timeline_stops_recovery(
    storage_target: StorageTarget, storage: Storage, pgdata: Path, route: str,
    stored: list[tuple[int, int, int]], missing: tuple[int, int, int],
) -> None:
    names = [_name(*s) for s in stored]
    _archive(storage, *names)
    wanted = _name(*missing)
    if route == "prefetch":  # the call before starts a prefetcher, which cannot find it either
        before = max(n for n in names if n < wanted)
        assert wal_fetch(storage_target, pgdata, before).returncode == 0
        (pgdata / "pg_wal/RECOVERYXLOG").unlink()  # replayed: PostgreSQL removes it
    flags = ["--prefetch", "0"] if route == "direct" else []
    done = wal_fetch(storage_target, pgdata, wanted, *flags)
    assert done.returncode == ExitCode.WAL_FETCH_FAILED, done.stderr
    line = error_line(done.stderr)
    later = min(n for n in names if n > wanted)
    assert f"'{wanted}' is missing from the archive" in line, line
    assert later in line and "gap" in line, line
    assert_not_written(pgdata)


@pytest.mark.parametrize(
    ("stored", "missing"),
    [
        pytest.param([(1, 0, 1), (1, 0, 2)], (1, 0, 3), id="end-of-the-timeline"),
        # Timeline 2 goes on; timeline 1 ended at its segment 2 (a promoted standby's archive).
        pytest.param([(1, 0, 1), (1, 0, 2), (2, 0, 3), (2, 0, 4)], (1, 0, 3), id="other-timeline"),
        # Beyond the next log: not looked for (two LISTs at most on this path).
        pytest.param([(1, 0, 1), (1, 2, 0)], (1, 0, 2), id="two-logs-further"),
    ],
)
def test_the_end_of_a_timeline_is_still_answered_1(
    storage_target: StorageTarget, storage: Storage, pgdata: Path,
    stored: list[tuple[int, int, int]], missing: tuple[int, int, int],
) -> None:
    _archive(storage, *(_name(*s) for s in stored))
    done = wal_fetch(storage_target, pgdata, _name(*missing), "--prefetch", "0")
    assert done.returncode == 1, done.stderr
    assert_not_written(pgdata)


def test_a_standby_is_told_not_archived_with_a_warning(
    storage_target: StorageTarget, storage: Storage, pgdata: Path
) -> None:
    _archive(storage, _name(1, 0, 1), _name(1, 0, 3))
    (pgdata / "standby.signal").touch()
    done = wal_fetch(storage_target, pgdata, _name(1, 0, 2), "--prefetch", "0")
    assert done.returncode == 1, done.stderr
    assert "gap in the archive" in done.stderr and "standby" in done.stderr, done.stderr
    assert_not_written(pgdata)
