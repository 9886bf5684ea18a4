"""What ``cloud-dump info`` reports, read from the store: the backups, the restorable window of
each timeline, the WAL archive's state, stored bytes and verify's last result.

Read-only, from one LIST of the location, one of the WAL archive, the backups' manifests and
pins, the archive's history files, verify's last result and the newest archived segment(s),
which are fetched, decrypted, decompressed and walked record by record
(``coordinator.walrecords``).

**The restorable window** of a timeline T: the points a restore following T can be asked for.
The WAL path to T runs on each ancestor timeline up to the segment its successor begins in (its
history file), then on T; PostgreSQL reads the segment holding a switch point from the newer
timeline (``XLogFileReadAnyTLI``). A backup on that path, ended before the path leaves its
timeline, reaches as far as the archived segments run from its first one without a gap.

- *Earliest*: the end (consistency point: ``end_lsn``, ``end_time``) of the oldest backup whose
  WAL runs without a gap to the newest segment any backup reaches: restore refuses an earlier
  target (``coordinator.restore.reachability``), and from there on every point is reachable.
- *Latest LSN*: where the last complete record in that newest segment begins. An inclusive
  ``recovery_target_lsn`` stops after the first record beginning at or past the target
  (``recoveryStopsAfter``, src/backend/access/transam/xlogrecovery.c): a target past that start
  would find no record to stop at.
- *Latest time*: one microsecond before the newest commit or abort record after the newest
  backup's end. ``recovery_target_time`` is compared with those records' ``xact_time`` only, and
  an inclusive target stops *before* the first one later than it (``recoveryStopsBefore``): a
  target at or after the newest one finds none, and PostgreSQL 13+ then fails with "recovery ended
  before configured recovery target was reached" instead of promoting
  (https://www.postgresql.org/docs/current/runtime-config-wal.html#RUNTIME-CONFIG-WAL-RECOVERY-TARGET).
  That newest transaction itself is reached with the latest LSN or ``--recovery-target latest``
  (``last_transaction_time``). With no commit or abort after the newest backup's end, the
  latest time is that backup's end time.

Also: the backups (pins from ``keep.json``), the newest archived segment and its age (the
store's last-modified time), gaps per timeline (as ``verify`` finds them), stored bytes by kind
and ``verify``'s last recorded result. ``BackupNotFound`` (exit 11) for a location without a
backup.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from coordinator.catalog import (
    WalInventory,
    backup_end,
    end_order,
    find_backups,
    missing_runs,
    read_wal_inventory,
    segment_size_of,
    wal_file_name,
)
from coordinator.history import History, parse_history
from coordinator.ops.expire import pinned_until
from coordinator.settings import InfoSettings, keys_from, layout_of, open_store
from coordinator.walarchive import WalArchive
from coordinator.walrecords import WalRecord, walk_records
from storage.base import Storage
from storage.errors import BackupNotFound, ObjectNotFound, PermanentStorageError
from storage.layout import Layout
from storage.manifest import BackupManifest
from storage.verifyresult import VerifyResult
from storage.walnames import Segment, is_segment, parse_lsn, prev_segment_number, segment_number

log = logging.getLogger(__name__)

# Segments read back from the newest when it holds no transaction after the newest backup's
# end: bounded, as each is a fetch of up to a segment's size.
MAX_SEGMENTS_READ = 8
ONE_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class BackupInfo:
    manifest: BackupManifest
    pinned: str | None  # "until released", "until <time>", or None


@dataclass(frozen=True)
class Window:
    """The restorable window of one timeline (module docstring)."""

    timeline: int
    earliest_backup: str
    earliest_time: datetime
    earliest_lsn: int
    latest_time: datetime
    latest_lsn: int
    last_transaction_time: datetime | None
    newest_segment: str  # the newest segment the window's WAL reaches


@dataclass(frozen=True)
class Gap:
    timeline: int
    first: str
    last: str
    segments: int


@dataclass
class Info:
    """Everything ``info`` reports for one location."""

    location: str  # where the backups are: storage URL and backups root
    wal_location: str
    cluster: str | None
    now: datetime
    backups: list[BackupInfo] = field(default_factory=list)  # newest first
    windows: list[Window] = field(default_factory=list)
    newest_segment: str | None = None
    newest_segment_modified: datetime | None = None
    gaps: list[Gap] = field(default_factory=list)
    timelines: list[int] = field(default_factory=list)  # with archived WAL
    stored_bytes: dict[str, int] = field(default_factory=dict)  # backups, wal, other
    verify: VerifyResult | None = None


def read_info(args: InfoSettings) -> Info:
    """Everything ``info`` reports for the location ``args`` name; ``BackupNotFound`` (exit 11)
    when it holds no backup."""
    layout = layout_of(args)
    storage = open_store(args)
    try:
        url = storage.url.rstrip("/")
        now = datetime.now(UTC)
        manifests = find_backups(storage, layout)
        if not manifests:
            raise BackupNotFound(f"no backups in {layout.describe_backups_root(storage.url)}")
        info = Info(f"{url}/{layout.backups_root}", f"{url}/{layout.wal_root}", layout.cluster,
                    now)  # fmt: skip
        info.backups = [BackupInfo(m, pinned_until(storage, layout, m.name, now))
                        for m in manifests]  # fmt: skip
        _read_listing(storage, layout, manifests, info)
        inventory = read_wal_inventory(storage, layout, segment_size_of(manifests[0]))
        info.timelines = sorted(set(inventory.segments) | set(inventory.partials))
        info.gaps = _gaps(inventory, info.backups)
        info.verify = _read_verify_result(storage, layout)
        archive = WalArchive(storage, layout, keys_from(args, None))
        histories = _histories(archive, inventory)
        info.windows = _windows(archive, inventory, histories, manifests)
    finally:
        storage.close()
    return info


def _read_listing(
    storage: Storage, layout: Layout, manifests: list[BackupManifest], info: Info
) -> None:
    """Stored bytes by kind, and the newest segment with its last-modified time (one LIST of
    the cluster's prefix, or of the whole location in the flat layout)."""
    scope = f"{layout.cluster}/" if layout.cluster else ""
    backup_prefixes = tuple(layout.backup_prefix(m.name) for m in manifests)
    totals = {"backups": 0, "wal": 0, "other": 0}
    # Segment names sort in WAL order within a timeline; across timelines, by position first.
    newest: tuple[str, str, float | None] | None = None
    for item in storage.list(scope):
        if item.key.startswith(layout.wal_root):
            totals["wal"] += item.size
            name = wal_file_name(item.key[len(layout.wal_root):])
            if name is not None and is_segment(name) and (
                newest is None or (name[8:], name) > (newest[0], newest[1])
            ):
                newest = (name[8:], name, item.modified_s)
        elif item.key.startswith(backup_prefixes):
            totals["backups"] += item.size
        else:
            totals["other"] += item.size
    info.stored_bytes = totals
    if newest is not None:
        info.newest_segment = newest[1]
        if newest[2] is not None:
            info.newest_segment_modified = datetime.fromtimestamp(newest[2], UTC)


def _read_verify_result(storage: Storage, layout: Layout) -> VerifyResult | None:
    key = layout.verify_result_key()
    try:
        return VerifyResult.from_json(storage.get(key), key)
    except ObjectNotFound:
        return None
    except PermanentStorageError as exc:
        log.warning("%s: left out", exc)
        return None


def _gaps(inventory: WalInventory, backups: list[BackupInfo]) -> list[Gap]:
    """Missing segments per timeline, from the oldest unpinned backup's first segment on that
    timeline (or the timeline's first archived one) to its newest, as verify reports them."""
    size = inventory.segment_size
    starts: dict[int, int] = {}
    for backup in backups:
        if backup.pinned is None:
            start = Segment.parse(backup.manifest.start_wal_file, size)
            starts[start.timeline] = min(starts.get(start.timeline, start.number), start.number)
    gaps = []
    for timeline in sorted(set(inventory.segments) | set(inventory.partials)):
        present = inventory.segments.get(timeline, set()) | inventory.partials.get(timeline, set())
        first = max(min(present), starts.get(timeline, min(present)))
        for low, high in missing_runs(present, first, max(present)):
            gaps.append(Gap(timeline, inventory.name(timeline, low),
                            inventory.name(timeline, high), high - low + 1))  # fmt: skip
    return gaps


def _histories(archive: WalArchive, inventory: WalInventory) -> dict[int, History]:
    found = {}
    for timeline in sorted(inventory.histories):
        stored = archive.find(f"{timeline:08X}.history")
        if stored is not None:
            data, _ = archive.read(stored)
            found[timeline] = parse_history(timeline, data.decode("utf-8", "replace"))
    return found


@dataclass(frozen=True)
class _Path:
    """The WAL a recovery following ``timeline`` reads: ``legs`` of (timeline, first segment
    number read from it), oldest first."""

    timeline: int
    legs: tuple[tuple[int, int], ...]
    left_at: dict[int, int]  # ancestor timeline -> LSN the path leaves it at

    def owner(self, number: int) -> int:
        return next(tli for tli, first in reversed(self.legs) if first <= number)


def _path(timeline: int, history: History | None, segment_size: int) -> _Path:
    if history is None:
        return _Path(timeline, ((timeline, 0),), {})
    legs = [(history.switches[0].timeline, 0)]
    for switch, child in zip(history.switches, [*[s.timeline for s in history.switches[1:]],
                                                 timeline], strict=True):  # fmt: skip
        legs.append((child, segment_number(switch.lsn, segment_size)))
    return _Path(timeline, tuple(legs), {s.timeline: s.lsn for s in history.switches})


def _windows(
    archive: WalArchive,
    inventory: WalInventory,
    histories: dict[int, History],
    manifests: list[BackupManifest],
) -> list[Window]:
    size = inventory.segment_size
    windows = []
    timelines = sorted(set(inventory.segments) | {m.timeline for m in manifests})
    for timeline in timelines:
        path = _path(timeline, histories.get(timeline), size)
        reaches = _reaches(path, inventory, manifests)
        if not reaches:
            continue
        newest = max(reaches.values())
        if newest < path.legs[-1][1]:
            continue  # no backup's WAL gets onto this timeline
        reaching = sorted((m for m in manifests if reaches.get(m.name) == newest), key=end_order)
        windows.append(_window(archive, inventory, path, newest, reaching[0], reaching[-1]))
    return windows


def _reaches(
    path: _Path, inventory: WalInventory, manifests: list[BackupManifest]
) -> dict[str, int]:
    """The newest segment number each backup on ``path`` reaches without a gap, for those whose
    own WAL (to their end) is archived."""
    size = inventory.segment_size
    reached = {}
    on_path = {tli for tli, _ in path.legs}
    for manifest in manifests:
        if manifest.timeline not in on_path:
            continue
        left_at = path.left_at.get(manifest.timeline)
        if left_at is not None and left_at < parse_lsn(manifest.end_lsn):
            continue  # the path leaves its timeline before the backup is consistent
        number = Segment.parse(manifest.start_wal_file, size).number
        if not _present(path, inventory, number):
            continue
        while _present(path, inventory, number + 1):
            number += 1
        if number >= prev_segment_number(parse_lsn(manifest.end_lsn), size):
            reached[manifest.name] = number
    return reached


def _present(path: _Path, inventory: WalInventory, number: int) -> bool:
    owner = path.owner(number)
    if number in inventory.segments.get(owner, set()):
        return True
    # PostgreSQL falls back to an older timeline's copy of the segment a switch falls in.
    earlier = [tli for tli, first in path.legs if first <= number and tli != owner]
    return bool(earlier) and number in inventory.segments.get(earlier[-1], set())


def _window(
    archive: WalArchive,
    inventory: WalInventory,
    path: _Path,
    newest: int,
    oldest_backup: BackupManifest,
    newest_backup: BackupManifest,
) -> Window:
    size = inventory.segment_size
    consistent = parse_lsn(newest_backup.end_lsn)
    floor = prev_segment_number(consistent, size)
    records: list[WalRecord] = []
    first = newest
    while True:
        records = _read_records(archive, inventory, path, first, newest)
        timed = [r for r in records if r.xact_time is not None and r.lsn >= consistent]
        if (records and timed) or first <= floor or newest - first + 1 >= MAX_SEGMENTS_READ:
            break
        first -= 1
    latest_lsn = records[-1].lsn if records else consistent
    latest_lsn = max(latest_lsn, consistent)
    times = [r.xact_time for r in records if r.xact_time is not None and r.lsn >= consistent]
    last = max(times) if times else None
    newest_end = backup_end(newest_backup)
    latest_time = newest_end if last is None else max(last - ONE_MICROSECOND, newest_end)
    return Window(
        timeline=path.timeline,
        earliest_backup=oldest_backup.name,
        earliest_time=backup_end(oldest_backup),
        earliest_lsn=parse_lsn(oldest_backup.end_lsn),
        latest_time=latest_time,
        latest_lsn=latest_lsn,
        last_transaction_time=last,
        newest_segment=Segment(path.owner(newest), newest).name(size),
    )


def _read_records(
    archive: WalArchive, inventory: WalInventory, path: _Path, first: int, last: int
) -> list[WalRecord]:
    """The complete records of the path's segments ``first`` to ``last``."""
    size = inventory.segment_size
    data = []
    for number in range(first, last + 1):
        # The path's timeline for it, else an older one's copy (``_present``).
        candidates = [tli for tli, start in reversed(path.legs) if start <= number]
        name = Segment(candidates[0], number).name(size)
        stored = next((found for tli in candidates
                       if (found := archive.find(Segment(tli, number).name(size)))), None)
        if stored is None:
            raise PermanentStorageError(f"archived WAL '{name}' went away while being read")
        data.append(archive.read(stored)[0])
    return list(walk_records(b"".join(data), Segment(0, first).start_lsn(size), size))
