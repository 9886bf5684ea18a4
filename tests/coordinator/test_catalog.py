"""``catalog.segment_size_of``: the WAL segment size a backup's manifest implies, for ``list``'s
WAL ranges. Pure arithmetic on what a manifest records, checked on the names PostgreSQL gives."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from coordinator.catalog import segment_size_of
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
