"""``catalog.segment_size_of``: the WAL segment size a backup's manifest implies, for ``list``'s
WAL ranges. Pure arithmetic on what a manifest records, checked on the names PostgreSQL gives."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from coordinator.catalog import find_divergence, segment_size_of, timeline_starts
from storage.manifest import BackupManifest
from storage.walnames import format_lsn, prev_segment_name, segment_name

MiB = 1 << 20


def _manifest(start: int, end: int, size: int) -> BackupManifest:
    """A manifest as ``backup`` writes it: the end WAL file is the segment holding the byte
    before the end LSN (XLByteToPrevSeg), so an end on a segment boundary names the one before.
    """
    now = datetime.now(UTC)
    return BackupManifest.model_construct(
        name="b", tool_version="t", pg_version="17", pg_version_num=170000,
        system_identifier="1", timeline=1, start_lsn=format_lsn(start), end_lsn=format_lsn(end),
        start_wal_file=segment_name(1, start, size), end_wal_file=prev_segment_name(1, end, size),
        start_time=now, end_time=now, compression="zstd", archives=[],
        backup_manifest_key="b/backup_manifest", backup_manifest_size=0,
        backup_manifest_sha256="",
    )  # fmt: skip


@pytest.mark.parametrize("size", [1 * MiB, 16 * MiB, 64 * MiB, 1024 * MiB])
@pytest.mark.parametrize("end_on_a_boundary", [False, True])
def test_the_segment_size_is_found_from_the_manifest(size: int, end_on_a_boundary: bool) -> None:
    start = 5 * size + 40  # inside segment 5
    end = 7 * size if end_on_a_boundary else 7 * size + 4096
    manifest = _manifest(start, end, size)
    assert segment_size_of(manifest) == size


# --- diverging histories ---------------------------------------------------------------------


def _on(name: str, timeline: int, first: int, last: int) -> BackupManifest:
    """A backup of ``timeline`` whose WAL runs from segment ``first`` to ``last``."""
    return BackupManifest.model_validate({
        "name": name, "tool_version": "t", "pg_version": "15", "pg_version_num": 150000,
        "system_identifier": "7", "timeline": timeline,
        "start_lsn": f"0/{first:X}000028", "end_lsn": f"0/{last:X}000100",
        "start_wal_file": f"{timeline:08X}00000000{first:08X}",
        "end_wal_file": f"{timeline:08X}00000000{last:08X}",
        "start_time": "2026-11-01T00:00:00+00:00", "end_time": f"2026-11-01T{last:02d}:00:00+00:00",
        "compression": "zstd", "archives": [], "backup_manifest_key": f"{name}/backup_manifest",
        "backup_manifest_size": 1, "backup_manifest_sha256": "0" * 64,
    })  # fmt: skip


def test_a_failover_after_backups_is_one_history() -> None:
    # Timeline 2 began in segment 6; every timeline-1 backup ended before or in it.
    backups = [_on("a", 1, 2, 3), _on("b", 1, 5, 6), _on("c", 2, 8, 9)]
    starts = timeline_starts(backups, None)
    assert starts == {1: 2, 2: 8}
    assert find_divergence(backups, {**starts, 2: 6}) is None


def test_a_backup_of_the_parent_after_the_fork_diverges() -> None:
    backups = [_on("s1", 1, 2, 3), _on("copy", 2, 4, 5), _on("s2", 1, 8, 9)]
    divergence = find_divergence(backups, {1: 2, 2: 4})
    assert divergence is not None
    assert (divergence.earlier.name, divergence.later.name) == ("s2", "copy")
    assert divergence.begins == "000000020000000000000004"
    assert "diverging histories" in divergence.describe()


def test_sibling_timelines_diverge() -> None:
    # Timelines 2 and 3 both forked from 1; 2's backup ended after 3 began.
    backups = [_on("two", 2, 5, 7), _on("three", 3, 6, 8)]
    assert find_divergence(backups, {2: 5, 3: 6}) is not None
    assert find_divergence([_on("two", 2, 5, 6), _on("three", 3, 6, 8)], {2: 5, 3: 6}) is None


def test_two_servers_writing_one_timeline_diverge() -> None:
    # The copy's backup ended later in time, at a lower LSN than the source's newer one.
    source = _on("source", 1, 8, 9)
    copy = _on("copy", 1, 4, 5).model_copy(update={"end_time": source.end_time.replace(hour=23)})
    divergence = find_divergence([source, copy], {1: 2})
    assert divergence is not None and divergence.begins is None
    assert (divergence.earlier.name, divergence.later.name) == ("source", "copy")
    assert "two servers wrote that timeline" in divergence.describe()
    assert find_divergence([_on("a", 1, 4, 5), source], {1: 2}) is None
