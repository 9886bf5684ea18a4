"""``coordinator.walrecords`` on real WAL: every record PostgreSQL 15's own ``pg_waldump`` lists
is found at the same LSN, with the same commit and abort times, across page and segment
boundaries, with compressed full-page images (holes included) and records split over segments.
"""

from __future__ import annotations

import re
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from coordinator.walrecords import segment_is_whole, walk_records
from devrig.pgbin import bin_dir
from devrig.postgres import PgCluster, PgFactory
from storage.walnames import Segment, format_lsn, parse_lsn

SEGMENT_BYTES = 16 * 1024 * 1024
_LINE = re.compile(r"rmgr: (\w+)\s.*?lsn: ([0-9A-F]+/[0-9A-F]+),.*desc: (\w+)( \S+ \S+)?")


def _wal_of(cluster: PgCluster) -> tuple[list[Path], int]:
    """The cluster's completed segments after its first, and the LSN they start at."""
    cluster.sql("SELECT pg_switch_wal()")
    current = str(cluster.sql("SELECT pg_walfile_name(pg_current_wal_lsn())")[0][0])
    names = sorted(p.name for p in (cluster.datadir / "pg_wal").iterdir()
                   if re.fullmatch(r"[0-9A-F]{24}", p.name) and p.name < current)  # fmt: skip
    paths = [cluster.datadir / "pg_wal" / name for name in names[1:]]
    return paths, Segment.parse(names[1]).start_lsn()


def _waldump(paths: list[Path]) -> list[tuple[int, str, str, datetime | None]]:
    """(lsn, rmgr, description's first word, commit/abort time) of each record pg_waldump
    lists in ``paths`` (consecutive segments)."""
    done = subprocess.run(
        [str(bin_dir(15) / "pg_waldump"), "-p", str(paths[0].parent), paths[0].name,
         paths[-1].name], capture_output=True, text=True, check=False)  # fmt: skip
    rows = []
    for line in done.stdout.splitlines():
        match = _LINE.search(line)
        assert match is not None, line
        when = None
        if match[1] == "Transaction" and match[3] in ("COMMIT", "ABORT") and match[4]:
            when = datetime.fromisoformat(match[4].strip().replace(" UTC", "") + "+00:00")
        rows.append((parse_lsn(match[2]), match[1], match[3], when))
    return rows


@pytest.fixture(scope="module")
def wal(pg_factory: PgFactory) -> tuple[list[Path], int]:
    """Two and more segments of varied WAL: wide rows (records split over pages and segments),
    updates after a checkpoint with compressed full-page images, commits and aborts (kept in
    pg_wal by wal_keep_size)."""
    cluster = pg_factory(15, settings={"wal_compression": "pglz", "wal_keep_size": "1GB"})
    cluster.sql("CREATE TABLE wide (id int, pad text) WITH (fillfactor = 50)")
    cluster.sql("SELECT pg_switch_wal()")
    cluster.sql("ALTER TABLE wide ALTER pad SET STORAGE PLAIN")
    for batch in range(4):
        cluster.sql(f"INSERT INTO wide SELECT g, repeat(md5(g::text), 60) "
                    f"FROM generate_series({batch * 5000}, {batch * 5000 + 4999}) g")  # fmt: skip
        cluster.sql("CHECKPOINT")
        cluster.sql("UPDATE wide SET id = id + 1 WHERE id % 97 = 0")
        cluster.sql("BEGIN; INSERT INTO wide VALUES (-1, 'x'); ROLLBACK")
    return _wal_of(cluster)


def test_records_match_pg_waldump_across_pages_and_segments(
    wal: tuple[list[Path], int],
) -> None:
    paths, start = wal
    assert len(paths) >= 2, "the fixture should write more than a segment of WAL"
    data = b"".join(p.read_bytes() for p in paths)
    ours = list(walk_records(data, start, SEGMENT_BYTES))
    theirs = _waldump(paths)
    # pg_waldump starts at the first record beginning in the first segment, as we do.
    assert [format_lsn(r.lsn) for r in ours] == [format_lsn(row[0]) for row in theirs]
    timed = [(r.lsn, r.xact_time) for r in ours if r.xact_time is not None]
    expected = [(row[0], row[3]) for row in theirs if row[3] is not None]
    assert timed == expected
    assert any(row[2] == "ABORT" for row in theirs) and any(row[2] == "COMMIT" for row in theirs)
    # Some record crosses from one segment into the next.
    boundary = start + SEGMENT_BYTES
    assert any(r.lsn < boundary < r.end_lsn for r in ours)


def test_a_walk_stops_at_the_first_record_not_wholly_given(wal: tuple[list[Path], int]) -> None:
    paths, start = wal
    data = paths[0].read_bytes()
    whole = list(walk_records(data, start, SEGMENT_BYTES))
    cut = data[: len(data) // 2]  # a record is cut: everything before it, nothing after
    half = list(walk_records(cut + bytes(len(data) - len(cut)), start, SEGMENT_BYTES))
    assert half == whole[: len(half)] and 0 < len(half) < len(whole)
    assert half[-1].end_lsn <= start + len(cut)




def test_whole_segments_are_told_from_cut_and_recycled_ones(
    wal: tuple[list[Path], int], pg_factory: PgFactory
) -> None:
    """wal-fetch lets PostgreSQL read a segment from pg_wal only when it is whole: written to
    its end, or ended by a switch (whose later pages PostgreSQL zeroes, headers included)."""
    paths, _ = wal
    segments = [(p.read_bytes(), Segment.parse(p.name).start_lsn()) for p in paths]
    assert all(segment_is_whole(data, lsn) for data, lsn in segments)
    full, lsn = segments[0]
    half = len(full) // 2
    assert not segment_is_whole(full[:half] + bytes(len(full) - half), lsn)  # still being written
    other = segments[1][0]
    assert not segment_is_whole(full[:half] + other[half:], lsn)  # the rest another segment's

    cluster = pg_factory(15)
    cluster.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
    name = str(cluster.sql("SELECT pg_walfile_name(pg_switch_wal())")[0][0])
    data = (cluster.datadir / "pg_wal" / name).read_bytes()
    start = Segment.parse(name).start_lsn()
    assert any(r.is_switch for r in walk_records(data, start, len(data)))
    assert data[-8192:] == bytes(8192), "the pages after a switch are zeroes"
    assert segment_is_whole(data, start)
