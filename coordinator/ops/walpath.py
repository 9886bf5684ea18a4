"""Which archived WAL each backup needs, following the timelines' history: verify's map of
what must be there (and, with ``--deep``, what is read back).

A backup carries the WAL from its first to its last segment (BASE_BACKUP's WAL option puts it in
base.tar), so it becomes consistent without the archive. To be replayed past its end to the
newest archived WAL it needs, from its last segment on (the archive's copy of that one: the
backup's holds it only up to the backup's end), the path PostgreSQL follows to the newest timeline
(``recovery_target_timeline = 'latest'``): on each timeline of that timeline's history
(``coordinator.history``), from where the path enters it up to the segment before the switch
point, then the next timeline's, up to the newest archived segment of the last one. The segment
holding a switch point is read from the new timeline (PostgreSQL's ``XLogFileReadAnyTLI``
takes the newest timeline that began at or before a segment), so the old timeline's copy of it,
and anything it wrote after the switch (an abandoned line, a primary that went on), is not
needed.

The newest timeline is the highest one with WAL or a history file in the archive. When it does
not descend from the backup (it forked from the backup's timeline before the backup ended, or
from another line), the path goes to the highest timeline that does. A timeline on the path
without its ``.history`` file is named: recovery cannot follow it. A history file that cannot
be read for want of a key (an encrypted archive, verify run without ``--identity-key`` or a
passphrase) is noted, and each timeline it would have placed is checked on its own, from its
first archived segment to its newest, as before history was followed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.catalog import WalInventory
from coordinator.history import History, parse_history
from coordinator.walarchive import WalArchive
from storage.errors import ConfigError, DecryptionFailed, IntegrityError, ObjectNotFound
from storage.manifest import BackupManifest
from storage.walnames import Segment, parse_lsn, segment_number


@dataclass
class NeededWal:
    """By timeline, the segment numbers some backup needs, each with the system identifier of
    the first backup needing it; ``problems`` (history files missing or unreadable) and
    ``notes`` (what could not be followed, and why) for the report."""

    segments: dict[int, dict[int, str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, timeline: int, first: int, last: int, system: str) -> None:
        numbers = self.segments.setdefault(timeline, {})
        for number in range(first, last + 1):
            numbers.setdefault(number, system)

    def problem(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)


def needed_wal(
    archive: WalArchive,
    inventory: WalInventory,
    manifests: list[BackupManifest],
    pinned: set[str],
) -> NeededWal:
    """What ``manifests`` need of the archive ``inventory`` lists (``pinned`` backups: nothing,
    as expire keeps no more than the WAL they carry for them)."""
    needed = NeededWal()
    histories, unreadable = _read_histories(archive, inventory, needed)
    newest = max([*inventory.segments, *inventory.partials, *inventory.histories], default=0)
    if not newest:
        return needed  # nothing archived: each backup restores to its end, no further
    size = inventory.segment_size
    for manifest in manifests:
        if manifest.name in pinned:
            continue
        start = Segment.parse(manifest.start_wal_file, size)
        # A backup's last segment is on its first one's timeline: PostgreSQL fails a backup
        # taken on a standby that is promoted meanwhile.
        end = Segment.parse(manifest.end_wal_file, size)
        system = manifest.system_identifier
        target = _target(histories, newest, start.timeline, parse_lsn(manifest.end_lsn))
        if newest != target and newest not in inventory.histories:
            needed.problem(_no_history(newest))
        path = histories[target].path_from(start.timeline) if target in histories else ()
        timeline, first = start.timeline, end.number
        for switch in path:
            timeline = switch.timeline
            needed.add(timeline, first, segment_number(switch.lsn, size) - 1, system)
            first = segment_number(switch.lsn, size)
            timeline = _next_on_path(histories[target], switch.timeline)
        last = inventory.newest(timeline)
        if last is not None:
            needed.add(timeline, first, last, system)
        for on_path in {s.timeline for s in path if s.timeline > 1} | {target}:
            if on_path > 1 and on_path not in inventory.histories:
                needed.problem(_no_history(on_path))
    for timeline in unreadable:  # not followed: checked on its own, as before
        numbers = inventory.segments.get(timeline, set()) | inventory.partials.get(timeline, set())
        if numbers and manifests:
            needed.add(timeline, min(numbers), max(numbers), manifests[0].system_identifier)
    return needed


def _read_histories(
    archive: WalArchive, inventory: WalInventory, needed: NeededWal
) -> tuple[dict[int, History], set[int]]:
    """The archive's readable histories, and the timelines whose history needs a key."""
    histories: dict[int, History] = {}
    unreadable: set[int] = set()
    for timeline in sorted(inventory.histories):
        name = f"{timeline:08X}.history"
        try:
            stored = archive.find(name)
            if stored is None:
                continue  # removed since the listing
            data, _ = archive.read(stored)
            histories[timeline] = parse_history(timeline, data.decode("utf-8", "replace"))
        except ConfigError as exc:
            unreadable.add(timeline)
            needed.notes.append(f"history file '{name}' not read ({exc}): timeline "
                                f"{timeline} checked on its own")  # fmt: skip
        except (IntegrityError, DecryptionFailed, ObjectNotFound) as exc:
            needed.problem(f"history file '{name}' cannot be read: {exc}")
    return histories, unreadable


def _target(histories: dict[int, History], newest: int, own: int, end_lsn: int) -> int:
    """The timeline the backup's path leads to: the newest if it descends from the backup
    (its history leaves the backup's timeline at or after the backup's end), else the highest
    that does, else the backup's own."""
    descending = [
        timeline for timeline, history in histories.items()
        if timeline > own and (switch := history.switch_from(own)) is not None
        and switch.lsn >= end_lsn
    ]  # fmt: skip
    if newest in descending:
        return newest
    return max(descending, default=own)


def _next_on_path(history: History, timeline: int) -> int:
    """The timeline that follows ``timeline`` in ``history``: the next switch's, or its own."""
    later = [s.timeline for s in history.switches if s.timeline > timeline]
    return min(later, default=history.timeline)


def _no_history(timeline: int) -> str:
    return (f"timeline {timeline} has WAL but no history file '{timeline:08X}.history': "
            "recovery cannot follow it")  # fmt: skip
