"""What a store holds: its complete backups (``manifest.json``), and the WAL after each.

``find_backups`` and ``read_manifest`` read the backups. The WAL available after each backup, for
``cloud-dump list``: how far it can be rolled forward.

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

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from storage.base import Storage
from storage.errors import (
    BackupNotFound,
    ConfigError,
    IntegrityError,
    ObjectNotFound,
    PermanentStorageError,
)
from storage.layout import MANIFEST_NAME, WAL_OBJECT_SUFFIXES, Layout
from storage.manifest import BackupManifest
from storage.walnames import (
    DEFAULT_SEGMENT_SIZE,
    SEGMENT_SIZES,
    Segment,
    is_segment,
    kind_of,
    parse_lsn,
    prev_segment_number,
    segment_number,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WalRange:
    first: str
    last: str
    segments: int

    def describe(self) -> str:
        plural = "" if self.segments == 1 else "s"
        return f"WAL {self.first} .. {self.last} ({self.segments} segment{plural})"


def archived_segment_names(storage: Storage, layout: Layout) -> set[str]:
    """Names of the WAL segments in the archive (one LIST of the WAL prefix)."""
    root = layout.wal_root
    names = set()
    for info in storage.list(root):
        rest = info.key[len(root):]
        name, suffix = rest[:24], rest[24:]
        if suffix in WAL_OBJECT_SUFFIXES and is_segment(name):
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
    """The WAL segment size (bytes) consistent with the manifest's LSNs and WAL file names:
    PostgreSQL's default, 16 MiB, when it is one of them or none is."""
    candidates = set(SEGMENT_SIZES)
    candidates &= set(_sizes_matching(manifest.start_lsn, manifest.start_wal_file))
    candidates &= set(_sizes_matching(manifest.end_lsn, manifest.end_wal_file, end=True))
    if DEFAULT_SEGMENT_SIZE in candidates or not candidates:
        return DEFAULT_SEGMENT_SIZE
    return min(candidates)


def _sizes_matching(lsn: str, name: str, *, end: bool = False) -> Iterable[int]:
    """The valid segment sizes at which segment ``name`` holds the byte at ``lsn`` (``end``:
    or the byte before it, as a backup's end WAL file is named, XLByteToPrevSeg: the end LSN
    may fall on a segment boundary); all of them when either is unreadable (that pair then
    says nothing)."""
    try:
        position = parse_lsn(lsn)
    except ConfigError:
        return SEGMENT_SIZES
    if not is_segment(name):
        return SEGMENT_SIZES
    sizes = []
    for size in SEGMENT_SIZES:
        numbers = {segment_number(position, size)}
        if end and position > 0:
            numbers.add(prev_segment_number(position, size))
        if _number_at(name, size) in numbers:
            sizes.append(size)
    return sizes


def _number_at(name: str, size: int) -> int | None:
    """The segment number ``name`` stands for with ``size``-byte segments; None if it names
    none at that size."""
    try:
        return Segment.parse(name, size).number
    except ConfigError:
        return None


def backup_end(manifest: BackupManifest) -> datetime:
    """When the backup ended, as its manifest records it, with a zone (UTC when the manifest
    records none)."""
    end = manifest.end_time
    return end if end.tzinfo is not None else end.replace(tzinfo=UTC)


def end_order(manifest: BackupManifest) -> tuple[datetime, int]:
    """Sort key of backups by their end: time, then LSN (the later sorts last)."""
    return backup_end(manifest), parse_lsn(manifest.end_lsn)


def find_backups(storage: Storage, layout: Layout) -> list[BackupManifest]:
    """Manifests of the complete backups under ``layout``, newest first."""
    root = layout.backups_root
    depth = root.count("/") + 1
    manifests = []
    for info in storage.list(root):
        # "<root><name>/manifest.json" and nothing deeper or shallower.
        if not info.key.endswith("/" + MANIFEST_NAME) or info.key.count("/") != depth:
            continue
        try:
            manifests.append(BackupManifest.from_json(storage.get(info.key), info.key))
        except PermanentStorageError as exc:
            log.warning("skipping %s", exc)
    return sorted(manifests, key=lambda m: m.end_time, reverse=True)


def human_size(n: int) -> str:
    """``n`` bytes in binary units, as ``list`` and ``restore`` print sizes."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


# --- step 1: everything checked before the disk is touched ---------------------------------------


def read_manifest(storage: Storage, layout: Layout, name: str) -> BackupManifest:
    key = layout.manifest_key(name)
    try:
        data = storage.get(key)
    except ObjectNotFound:
        raise BackupNotFound(
            f"backup '{name}' not found in {layout.describe_backups_root(storage.url)}: no "
            f"'{name}/{MANIFEST_NAME}' there"
        ) from None
    try:
        manifest = BackupManifest.from_json(data, key)
    except PermanentStorageError as exc:
        raise IntegrityError(str(exc)) from exc
    if manifest.name != name:
        raise IntegrityError(f"manifest '{key}' describes backup '{manifest.name}', not '{name}'")
    return manifest


# --- the WAL archive as a whole: what verify (and later info, expire) read -----------------------


@dataclass(frozen=True)
class WalInventory:
    """What one LIST of the WAL archive shows, by timeline (``segment_size``-byte segments).

    ``segments``: numbers (``Segment.number``) of whole segments; ``partials``: of ``.partial``
    files (the last, unfinished segment of a timeline that was switched away from);
    ``histories``: timelines with a ``.history`` file.
    """

    segment_size: int
    segments: dict[int, set[int]]
    partials: dict[int, set[int]]
    histories: set[int]

    def name(self, timeline: int, number: int) -> str:
        return Segment(timeline, number).name(self.segment_size)

    def newest(self, timeline: int) -> int | None:
        """The highest segment number stored on ``timeline``, whole or partial."""
        numbers = self.segments.get(timeline, set()) | self.partials.get(timeline, set())
        return max(numbers) if numbers else None


def read_wal_inventory(storage: Storage, layout: Layout, segment_size: int) -> WalInventory:
    """The WAL archive under ``layout`` by timeline (one LIST). Objects that are not WAL files
    as wal-push stores them (``<name>[compression suffix][.age]``) are left out."""
    root = layout.wal_root
    segments: dict[int, set[int]] = {}
    partials: dict[int, set[int]] = {}
    histories: set[int] = set()
    for info in storage.list(root):
        name = wal_file_name(info.key[len(root):])
        kind = kind_of(name) if name else None
        if name is None or kind is None:
            continue
        if kind == "history":
            histories.add(int(name[:8], 16))
            continue
        if kind not in ("segment", "partial"):
            continue
        try:
            segment = Segment.parse(name, segment_size)
        except ConfigError:
            continue  # not a segment name at this size: not this cluster's WAL
        found = segments if kind == "segment" else partials
        found.setdefault(segment.timeline, set()).add(segment.number)
    return WalInventory(segment_size, segments, partials, histories)


def wal_file_name(rest: str) -> str | None:
    """The WAL file name of a stored object's key below the WAL root, or None."""
    for suffix in sorted(WAL_OBJECT_SUFFIXES, key=len, reverse=True):
        if rest.endswith(suffix):
            name = rest[: len(rest) - len(suffix)]
            if kind_of(name) is not None:
                return name
    return None


def missing_runs(present: set[int], first: int, last: int) -> list[tuple[int, int]]:
    """The runs of numbers from ``first`` to ``last`` (inclusive) not in ``present``, as
    ``(first missing, last missing)`` pairs, in order."""
    runs: list[tuple[int, int]] = []
    start: int | None = None
    for number in range(first, last + 1):
        if number in present:
            if start is not None:
                runs.append((start, number - 1))
                start = None
        elif start is None:
            start = number
    if start is not None:
        runs.append((start, last))
    return runs
