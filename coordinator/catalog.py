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

import json
import logging
import threading
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
from storage.layout import KEEP_NAME, MANIFEST_NAME, WAL_OBJECT_SUFFIXES, Layout
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


def first_backup_end(
    manifests: Iterable[BackupManifest], segment_size: int
) -> tuple[Segment, str] | None:
    """The last segment of the backup that ends first, and that backup's name; None for no
    backups. Ordered by timeline, then segment: no other backup's replay needs that segment
    from the archive, as the backup carries it in base.tar (a primary's whole, its end having
    switched WAL). verify and info both allow the archive to lack it."""
    ends = [(Segment.parse(m.end_wal_file, segment_size), m.name) for m in manifests]
    return min(ends, key=lambda end: (end[0].timeline, end[0].number), default=None)


def find_backups(storage: Storage, layout: Layout) -> list[BackupManifest]:
    """Manifests of the complete backups under ``layout``, newest first.

    One that does not parse is left out, with a warning naming it: once per process for each
    stored version of it (``_warn_once``).
    """
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
            _warn_once((storage.url, info.key, info.etag),
                       f"skipping backup '{info.key.split('/')[-2]}': {exc}")  # fmt: skip
    return sorted(manifests, key=lambda m: m.end_time, reverse=True)


# A command calls find_backups several times (restore's choice and reachability check, info's
# sections): its operator hears of a damaged manifest once. Keyed by the object's ETag as well,
# so that a long-lived process warns again about a manifest damaged anew.
_warned: set[tuple[str, str, str]] = set()
_warned_lock = threading.Lock()


def _warn_once(about: tuple[str, str, str], message: str) -> None:
    with _warned_lock:
        if about in _warned:
            return
        _warned.add(about)
    log.warning("%s", message)


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


# --- histories that diverge: one store, two lineages ----------------------------------------------


@dataclass(frozen=True)
class Divergence:
    """Two backups on histories that diverge. Either ``earlier`` (on a lower timeline) ended in
    a segment after the one where ``later``'s timeline begins (``begins``: that segment's name),
    so it holds changes the other timeline never saw; or both are of one timeline and the one
    that ended later in time ended earlier in WAL (``begins`` None): two servers wrote that
    timeline, as a copy restored without a target and started does."""

    earlier: BackupManifest
    later: BackupManifest
    begins: str | None

    def describe(self) -> str:
        if self.begins is None:
            return (
                f"backups '{self.earlier.name}' and '{self.later.name}' are both of timeline "
                f"{self.later.timeline}, but '{self.later.name}' ended later at an earlier LSN "
                f"({self.later.end_lsn} against {self.earlier.end_lsn}): two servers wrote that "
                "timeline (a copy restored without a recovery target, started and backed up "
                "into its source's store), so they are of diverging histories"
            )
        return (
            f"backup '{self.earlier.name}' (timeline {self.earlier.timeline}) ended after "
            f"timeline {self.later.timeline} began in {self.begins}, so it and backup "
            f"'{self.later.name}' (timeline {self.later.timeline}) are of diverging histories "
            "(a restored copy archiving and backing up into its source's archive, or backups "
            "of a timeline that a point-in-time restore abandoned)"
        )


def timeline_starts(
    backups: Iterable[BackupManifest], inventory: WalInventory | None
) -> dict[int, int]:
    """The first segment number of each timeline the store shows: its lowest archived segment
    (whole or ``.partial``), or the first segment of a backup on it, whichever is lower.

    A timeline's first segment holds the point where it forked from its parent (a promoted
    server starts writing the new timeline in the segment of the switch point), so it is a
    lower bound of where it diverged from every lower timeline; no history file has to be read
    (or decrypted) for it.
    """
    starts: dict[int, int] = {}
    if inventory is not None:
        for found in (inventory.segments, inventory.partials):
            for timeline, numbers in found.items():
                if numbers:
                    starts[timeline] = min(starts.get(timeline, min(numbers)), min(numbers))
    for manifest in backups:
        first = _number_at(manifest.start_wal_file, segment_size_of(manifest))
        if first is not None:
            starts[manifest.timeline] = min(starts.get(manifest.timeline, first), first)
    return starts


def ends_before_timeline(manifest: BackupManifest, timeline: int, starts: dict[int, int]) -> bool:
    """Whether ``manifest``, of a lower timeline than ``timeline``, ended no later than the
    segment where ``timeline`` begins (so it can be on ``timeline``'s history). A backup that
    ended in that very segment counts as before it: whether it ended before the switch point
    only the history file could say, and a failover right after a backup is ordinary."""
    begins = starts.get(timeline)
    end = _number_at(manifest.end_wal_file, segment_size_of(manifest))
    return begins is None or end is None or end <= begins


def find_divergence(
    backups: Iterable[BackupManifest], starts: dict[int, int]
) -> Divergence | None:
    """A pair of ``backups`` on diverging histories (``Divergence``), or None when every backup
    can lie on the history of the newest timeline among them. Timelines are compared by number:
    a child's number is always above its parent's; two children of one parent diverge too. On
    one timeline, WAL positions grow with time: a backup that ended later at a lower LSN than
    another was taken of another server writing the same timeline."""
    ordered = sorted(backups, key=lambda m: (m.timeline, end_order(m)))
    for later in reversed(ordered):
        for earlier in ordered:
            if earlier.timeline > later.timeline:
                break
            if earlier.timeline == later.timeline:
                if (backup_end(earlier) < backup_end(later)
                        and parse_lsn(earlier.end_lsn) > parse_lsn(later.end_lsn)):
                    return Divergence(earlier, later, None)
                continue
            if not ends_before_timeline(earlier, later.timeline, starts):
                size = segment_size_of(later)
                begins = Segment(later.timeline, starts[later.timeline]).name(size)
                return Divergence(earlier, later, begins)
    return None


# --- pins (cloud-dump keep) ---------------------------------------------------------------------


def pinned_until(storage: Storage, layout: Layout, name: str, now: datetime) -> str | None:
    """How long the backup is pinned ("until 2027-01-31T00:00:00+00:00", "until released"), or
    None when it is not (no ``keep.json``, or its date has passed)."""
    try:
        pin = json.loads(storage.get(layout.backup_prefix(name) + KEEP_NAME))
    except ObjectNotFound:
        return None
    except ValueError:
        return "(its keep.json is unreadable: kept to be safe)"
    until = pin.get("until") if isinstance(pin, dict) else None
    if until is None:
        return "until released"
    try:
        when = datetime.fromisoformat(str(until))
    except ValueError:
        return "(its keep.json is unreadable: kept to be safe)"
    return f"until {when.isoformat()}" if when > now else None
