"""The restorable window of each timeline, and the WAL gaps ``cloud-dump info`` reports, worked
out from the backups' manifests, one LIST of the WAL archive, its history files and the newest
segments of each window, read back record by record (``coordinator.walrecords``).

**The WAL path to a timeline T** runs on each ancestor up to the segment its successor begins in
(its history file), then on T. PostgreSQL reads each segment from the newest timeline of the
path whose history covers it, and falls back to an older timeline's copy of a segment only where
that copy is still the same WAL (``XLogFileReadAnyTLI``, src/backend/access/transam/
xlogrecovery.c): the segment a switch falls in, up to the switch point. A later segment of an
older timeline is that timeline's own continuation: its pages carry an older timeline ID than
the ones read before, which PostgreSQL refuses ("out-of-sequence timeline ID"), so it is not on
the path, and T's window never reaches into it. A backup on the path, ended before the path
leaves its timeline, reaches as far as the path's segments run from its first one without a gap.

- *Earliest*: the end (consistency point: ``end_lsn``, ``end_time``) of the oldest backup whose
  WAL runs without a gap to the newest segment any backup reaches: restore refuses an earlier
  target (``coordinator.restore.reachability``), and from there on every point is reachable.
  A backup whose WAL runs into a gap first (a pinned backup once ``expire`` removed the WAL
  after it) is outside the window: it restores to its own end, and through its WAL up to the
  gap, no further.
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

Every fact of a window comes from the WAL on its own path. A segment that cannot be read (damaged,
or encrypted without the key) ends what recovery can replay just as it ends what is read here:
the window's latest point then comes from the segments before it (``unreadable``), or is unknown
when none of them could be read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from coordinator.catalog import (
    WalInventory,
    backup_end,
    end_order,
    first_backup_end,
    missing_runs,
)
from coordinator.history import History
from coordinator.walarchive import WalArchive
from coordinator.walrecords import WalRecord, walk_records
from storage.errors import (
    CloudDumpError,
    IntegrityError,
    PermanentStorageError,
    TransientStorageError,
)
from storage.manifest import BackupManifest
from storage.walnames import Segment, parse_lsn, prev_segment_number, segment_number

# Segments read back from the newest when it holds no transaction after the newest backup's
# end: bounded, as each is a fetch of up to a segment's size.
MAX_SEGMENTS_READ = 8
ONE_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class Latest:
    """How far a restore along a timeline reaches (module docstring)."""

    time: datetime
    lsn: int
    last_transaction_time: datetime | None
    segment: str  # the archived segment the latest LSN lies in


@dataclass(frozen=True)
class Window:
    """The restorable window of one timeline. ``latest`` is None when no segment of its newest
    WAL could be read; ``unreadable`` names the segment that could not be (``error`` says why):
    the window ends before it."""

    timeline: int
    earliest_backup: str
    earliest_time: datetime
    earliest_lsn: int
    latest: Latest | None
    unreadable: str | None = None
    error: CloudDumpError | None = None


@dataclass(frozen=True)
class Gap:
    """A run of missing segments on ``timeline``, ``first`` to ``last`` (names)."""

    timeline: int
    first: str
    last: str
    segments: int


@dataclass
class Reach:
    """What the windows say of the backups: those whose WAL runs to a window's end, and for
    each other backup the last segment its archived WAL runs to (absent: not even its own)."""

    in_window: set[str] = field(default_factory=set)
    replays_to: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Path:
    """The WAL a recovery following ``timeline`` reads: ``legs`` of (timeline, first segment
    number read from it), oldest first."""

    timeline: int
    legs: tuple[tuple[int, int], ...]
    left_at: dict[int, int]  # ancestor timeline -> LSN the path leaves it at

    def owner(self, number: int) -> int:
        """The timeline of the leg segment ``number`` lies on."""
        return next(tli for tli, first in reversed(self.legs) if first <= number)

    def source(self, inventory: WalInventory, number: int) -> int | None:
        """The timeline whose archived copy of segment ``number`` recovery reads: its own
        leg's, else, for the segment a switch falls in, the previous leg's (module docstring);
        None when neither is archived."""
        index = max(i for i, (_tli, first) in enumerate(self.legs) if first <= number)
        timeline, first = self.legs[index]
        if number in inventory.segments.get(timeline, set()):
            return timeline
        older = self.legs[index - 1][0] if index else None
        if older is not None and number == first and number in inventory.segments.get(older, set()):
            return older
        return None


def path_to(timeline: int, history: History | None, segment_size: int) -> _Path:
    if history is None:
        return _Path(timeline, ((timeline, 0),), {})
    legs = [(history.switches[0].timeline, 0)]
    for switch, child in zip(history.switches, [*[s.timeline for s in history.switches[1:]],
                                                 timeline], strict=True):  # fmt: skip
        legs.append((child, segment_number(switch.lsn, segment_size)))
    return _Path(timeline, tuple(legs), {s.timeline: s.lsn for s in history.switches})


def windows(
    archive: WalArchive,
    inventory: WalInventory,
    histories: dict[int, History],
    manifests: list[BackupManifest],
    skipped: set[int],
) -> tuple[list[Window], Reach]:
    """The window of every timeline a backup's WAL gets onto (those in ``skipped``, whose
    history could not be read, left out), and what they say of each backup."""
    size = inventory.segment_size
    found, reach = [], Reach()
    for timeline in sorted(set(inventory.segments) | {m.timeline for m in manifests}):
        if timeline in skipped:
            continue
        path = path_to(timeline, histories.get(timeline), size)
        reaches = _reaches(path, inventory, manifests)
        for manifest in manifests:
            if manifest.timeline == timeline and manifest.name in reaches:
                number = reaches[manifest.name]
                source = path.source(inventory, number)
                reach.replays_to[manifest.name] = Segment(source or timeline, number).name(size)
        if not reaches:
            continue
        newest = max(reaches.values())
        if newest < path.legs[-1][1]:
            continue  # no backup's WAL gets onto this timeline
        reaching = sorted((m for m in manifests if reaches.get(m.name) == newest), key=end_order)
        reach.in_window.update(m.name for m in reaching)
        found.append(_window(archive, inventory, path, newest, reaching[0], reaching[-1]))
    return found, reach


def _reaches(
    path: _Path, inventory: WalInventory, manifests: list[BackupManifest]
) -> dict[str, int]:
    """The newest segment number each backup on ``path`` reaches without a gap from its last
    segment on (its WAL up to there travels in base.tar). The backup that ends first may lack
    that last segment in the archive too: it replays with its own copy (wal-fetch lets
    PostgreSQL read it from pg_wal when whole, as on a primary), and no other backup on the
    path needs it (``verify`` makes the same allowance)."""
    size = inventory.segment_size
    reached = {}
    on_path = {tli for tli, _ in path.legs}
    candidates = []
    for manifest in manifests:
        if manifest.timeline not in on_path:
            continue
        left_at = path.left_at.get(manifest.timeline)
        if left_at is not None and left_at < parse_lsn(manifest.end_lsn):
            continue  # the path leaves its timeline before the backup is consistent
        candidates.append(manifest)
    first = min(candidates, key=end_order, default=None)
    for manifest in candidates:
        number = prev_segment_number(parse_lsn(manifest.end_lsn), size)
        if path.source(inventory, number) is None and (
            manifest is not first or path.source(inventory, number + 1) is None
        ):
            continue  # (carried by the first, but only worth it with archived WAL after it)
        while path.source(inventory, number + 1) is not None:
            number += 1
        reached[manifest.name] = number
    return reached


def _window(
    archive: WalArchive,
    inventory: WalInventory,
    path: _Path,
    newest: int,
    oldest_backup: BackupManifest,
    newest_backup: BackupManifest,
) -> Window:
    consistent = parse_lsn(newest_backup.end_lsn)
    floor = prev_segment_number(consistent, inventory.segment_size)
    read = _Reader(archive, inventory, path)
    records: list[WalRecord] = []
    top, first = newest, newest
    while first >= floor and newest - first < MAX_SEGMENTS_READ:
        if not read.segment(first):
            if not read.damaged:
                break  # no key, or a wrong one: no other segment reads either
            # Recovery stops at a segment it cannot read: the window ends before it.
            top, records = first - 1, []
        else:
            records = read.records(first, top)
            if any(r.xact_time is not None and r.lsn >= consistent for r in records):
                break
        first -= 1
    latest = None
    if top >= floor and (records or read.error is None or read.damaged):
        latest = _latest(records, consistent, backup_end(newest_backup), read.name(top))
    return Window(path.timeline, oldest_backup.name, backup_end(oldest_backup),
                  parse_lsn(oldest_backup.end_lsn), latest, read.unreadable,
                  read.error)  # fmt: skip


def _latest(
    records: list[WalRecord], consistent: int, newest_end: datetime, segment: str
) -> Latest:
    times = [r.xact_time for r in records if r.xact_time is not None and r.lsn >= consistent]
    last = max(times) if times else None
    latest_lsn = max(records[-1].lsn if records else consistent, consistent)
    latest_time = newest_end if last is None else max(last - ONE_MICROSECOND, newest_end)
    return Latest(latest_time, latest_lsn, last, segment)


class _Reader:
    """The path's segments, each read (decrypted, decompressed, checked) at most once. The
    last failure is kept (``unreadable``, ``error``): reading goes from the newest segment
    back, so it is the oldest that could not be read, the one recovery stops at."""

    def __init__(self, archive: WalArchive, inventory: WalInventory, path: _Path) -> None:
        self.archive, self.inventory, self.path = archive, inventory, path
        self.data: dict[int, bytes] = {}
        self.unreadable: str | None = None
        self.error: CloudDumpError | None = None

    @property
    def damaged(self) -> bool:
        """Whether the failure is the segment's own (damaged, gone), not a missing or wrong
        key, which no other segment would read with either."""
        return isinstance(self.error, IntegrityError | PermanentStorageError)

    def name(self, number: int) -> str:
        source = self.path.source(self.inventory, number)
        return self.inventory.name(self.path.timeline if source is None else source, number)

    def segment(self, number: int) -> bool:
        """Read segment ``number``; False, the failure kept, when it cannot be. A transient
        storage failure is raised: nothing else would read either."""
        name = self.name(number)
        try:
            stored = self.archive.find(name)
            if stored is None:
                raise PermanentStorageError(f"archived WAL '{name}' went away while being read")
            self.data[number] = self.archive.read(stored)[0]
        except TransientStorageError:
            raise
        except CloudDumpError as exc:
            self.unreadable, self.error = name, exc
            return False
        return True

    def records(self, first: int, last: int) -> list[WalRecord]:
        """The complete records of segments ``first`` to ``last`` (all read) on the path: of
        an older timeline's copy of a switch segment, only those before the switch point."""
        size = self.inventory.segment_size
        data = b"".join(self.data[n] for n in range(first, last + 1))
        records = list(walk_records(data, Segment(0, first).start_lsn(size), size))
        older = [self.path.left_at[source] for n in range(first, last + 1)
                 if (source := self.path.source(self.inventory, n)) != self.path.owner(n)
                 and source in self.path.left_at]  # fmt: skip
        if older:
            records = [r for r in records if r.end_lsn <= min(older)]
        return records


def gaps(
    inventory: WalInventory, unpinned: list[BackupManifest], pinned: list[BackupManifest]
) -> tuple[list[Gap], list[Gap]]:
    """Missing segments per timeline: ``(gaps, behind_pins)``. Gaps: from the last segment of
    the unpinned backup that ends first on that timeline (its WAL before that travels in
    base.tar; the very first backup's own last segment too, which it replays with its own copy)
    or the timeline's first archived one, to its newest, as verify reports them. Behind pins:
    those from the oldest pinned backup's first segment up to there, which ``expire`` leaves
    once it removed the WAL after a pinned backup (that backup then restores to its own end
    only)."""
    size = inventory.segment_size

    def firsts(names: list[str]) -> dict[int, int]:
        found: dict[int, int] = {}
        for segment in (Segment.parse(name, size) for name in names):
            found[segment.timeline] = min(found.get(segment.timeline, segment.number),
                                          segment.number)  # fmt: skip
        return found

    needed = firsts([m.end_wal_file for m in unpinned])
    kept = firsts([m.start_wal_file for m in pinned])
    carried = first_backup_end(unpinned, size)
    if carried is not None:  # its own last segment will do
        needed[carried[0].timeline] = carried[0].number + 1
    found: tuple[list[Gap], list[Gap]] = ([], [])
    for timeline in sorted(set(inventory.segments) | set(inventory.partials)):
        present = inventory.segments.get(timeline, set()) | inventory.partials.get(timeline, set())
        first = max(min(present), needed.get(timeline, min(present)))
        runs = [(found[0], low, high) for low, high in missing_runs(present, first, max(present))]
        if timeline in kept and kept[timeline] < first:
            runs += [(found[1], low, high)
                     for low, high in missing_runs(present, kept[timeline], first - 1)]  # fmt: skip
        for into, low, high in runs:
            into.append(Gap(timeline, inventory.name(timeline, low),
                            inventory.name(timeline, high), high - low + 1))  # fmt: skip
    return found
