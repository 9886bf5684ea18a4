"""The WAL available after each backup, for ``cloud-dump list``: how far it can be rolled forward.

From a backup's ``start_wal_file``, the contiguous run of archived segments on the same timeline
up to the first gap: recovery from that backup can replay exactly that far. Later timelines
(reached through ``.history`` files) are not followed: that would mean reading, and maybe
decrypting, history files for a listing; the range shown is a lower bound in that case.

The archive is listed once per call, whatever the number of backups. Segment arithmetic needs
the cluster's WAL segment size, which manifests do not record directly: it is derived from the
backup's start and end LSNs and WAL file names (exact unless both fall in a log's first segment,
when PostgreSQL's default, 16 MiB, is assumed).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from storage.base import Storage
from storage.errors import ConfigError
from storage.layout import COMPRESSION_SUFFIXES, ENCRYPTED_SUFFIX, Layout
from storage.manifest import BackupManifest
from storage.walnames import DEFAULT_SEGMENT_SIZE, Segment, wal_kind

_SUFFIXES = {c + e for c in COMPRESSION_SUFFIXES.values() for e in ("", ENCRYPTED_SUFFIX)}
_MIN_SEGMENT_SIZE = 1 << 20  # initdb --wal-segsize accepts 1 MiB .. 1 GiB
_MAX_SEGMENT_SIZE = 1 << 30


@dataclass(frozen=True)
class WalRange:
    first: str
    last: str
    segments: int

    def describe(self) -> str:
        return f"WAL {self.first} .. {self.last} ({self.segments} segments)"


def archived_segment_names(storage: Storage, layout: Layout) -> set[str]:
    """Names of the WAL segments in the archive (one LIST of the WAL prefix)."""
    root = layout.wal_root
    names = set()
    for info in storage.list(root):
        rest = info.key[len(root):]
        name, suffix = rest[:24], rest[24:]
        if suffix in _SUFFIXES and _is_segment(name):
            names.add(name)
    return names


def wal_range(manifest: BackupManifest, archived: set[str]) -> WalRange | None:
    """The archived run from the backup's first segment; None if that segment is not archived."""
    size = segment_size_of(manifest)
    try:
        segment = Segment.parse(manifest.start_wal_file, size)
    except ConfigError:
        return None
    first = segment.name(size)
    if first not in archived:
        return None
    count = 1
    while (following := segment.next()).name(size) in archived:
        segment, count = following, count + 1
    return WalRange(first, segment.name(size), count)


def segment_size_of(manifest: BackupManifest) -> int:
    """The WAL segment size consistent with the manifest's LSNs and WAL file names."""
    candidates = set(_sizes_between(_MIN_SEGMENT_SIZE, _MAX_SEGMENT_SIZE))
    for lsn, name in ((manifest.start_lsn, manifest.start_wal_file),
                      (manifest.end_lsn, manifest.end_wal_file)):
        candidates &= set(_sizes_matching(lsn, name))
    if DEFAULT_SEGMENT_SIZE in candidates or not candidates:
        return DEFAULT_SEGMENT_SIZE
    return min(candidates)


def _sizes_matching(lsn: str, name: str) -> Iterable[int]:
    try:
        high, low = (int(part, 16) for part in lsn.split("/"))
        log, seg = int(name[8:16], 16), int(name[16:24], 16)
    except ValueError:
        return _sizes_between(_MIN_SEGMENT_SIZE, _MAX_SEGMENT_SIZE)
    # A segment name is (timeline, lsn >> 32, (lsn & 0xFFFFFFFF) // segment size).
    return [size for size in _sizes_between(_MIN_SEGMENT_SIZE, _MAX_SEGMENT_SIZE)
            if high == log and low // size == seg]


def _sizes_between(low: int, high: int) -> list[int]:
    sizes, size = [], low
    while size <= high:
        sizes.append(size)
        size <<= 1
    return sizes


def _is_segment(name: str) -> bool:
    try:
        return wal_kind(name) == "segment"
    except ConfigError:
        return False
