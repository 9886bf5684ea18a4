"""``cloud-dump expire`` and ``cloud-dump delete``: remove backups, and WAL no kept backup needs.

Retention policies, as operators know them from pgBackRest and barman:

- ``--retain N``: the newest N backups are kept;
- ``--recovery-window AGE``: every point of the last AGE stays restorable: the newest backup
  that ended before the window began is kept, with every backup after it.

"Newest" is by the end recorded in ``manifest.json`` (time, then LSN), the order ``list``
shows. The newest backup is always kept, whatever the policy says.

Order of removal: each expired backup's ``manifest.json`` alone first, so that an interrupted
expire never leaves a backup that looks complete but is not; then its other objects; then, once
every expired backup is gone, the WAL no kept backup reads (``expire_wal``). All but the
manifests go through ``Storage.delete_many``: on S3 one request per 1,000 keys, not one per key.

``cloud-dump keep NAME [--until DATE | --forever | --release]`` pins a backup (``keep.json``
in its prefix): expire keeps it outside the policy's count until the date passes or it is
released, and ``delete`` refuses it. A backup carries the WAL that makes it consistent (the
server includes it in the base backup), so a pinned backup restores on its own, without a
recovery target; expire also keeps its archived WAL from its first segment to the one after its
end. A point-in-time restore from it needs the archived WAL after that, which expire removes
once no kept backup needs it: wal-fetch then stops recovery at the gap (exit 200), it does not
promote.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from coordinator.catalog import (
    backup_end,
    end_order,
    find_backups,
    find_divergence,
    pinned_until,
    read_manifest,
    read_wal_inventory,
    segment_size_of,
    timeline_starts,
    wal_file_name,
)
from coordinator.ops.cleanup import parse_age
from coordinator.settings import (
    DeleteSettings,
    ExpireSettings,
    KeepSettings,
    Report,
    layout_of,
    open_store,
)
from storage.base import Storage
from storage.errors import BackupNotFound, ConfigError, ObjectNotFound
from storage.layout import KEEP_NAME, MANIFEST_NAME, Layout, validate_name
from storage.manifest import BackupManifest
from storage.walnames import Segment, kind_of, parse_lsn, segment_number

log = logging.getLogger(__name__)


def run_expire(args: ExpireSettings, report: Report) -> None:
    """Apply the policy ``args`` names; one line per removal (``--dry-run``: per one that
    would be made)."""
    if args.retain is None and args.recovery_window is None:
        raise ConfigError("expire needs a policy: --retain N or --recovery-window AGE")
    window = (None if args.recovery_window is None
              else parse_age(args.recovery_window, "--recovery-window"))  # fmt: skip
    layout = layout_of(args)
    storage = open_store(args)
    try:
        now = datetime.now(UTC)
        backups = find_backups(storage, layout)  # newest first
        pinned = {m.name: until for m in backups
                  if (until := pinned_until(storage, layout, m.name, now)) is not None}  # fmt: skip
        unpinned = [m for m in backups if m.name not in pinned]
        if not unpinned:
            report(f"nothing to expire: no unpinned backups in "
                   f"{layout.describe_backups_root(storage.url)}")  # fmt: skip
            return
        _refuse_diverging(storage, layout, backups)
        kept, expired = plan_expiry(unpinned, args.retain, window, now)
        out = _prefixed(report, args.dry_run)
        for manifest in expired:
            count = delete_backup(storage, layout, manifest, dry_run=args.dry_run)
            out(f"removed backup '{manifest.name}' (ended {manifest.end_time.isoformat()}, "
                f"{count} objects)")  # fmt: skip
        held = [m for m in backups if m.name in pinned]
        removed = expire_wal(storage, layout, kept, held, dry_run=args.dry_run)
        oldest = kept[-1]
        out(f"removed {removed} WAL file(s) no kept backup reads: before "
            f"{oldest.start_wal_file}, the first segment of the oldest kept backup "
            f"'{oldest.name}', or on a timeline older than every kept backup's (pinned ones "
            "keep their own)")  # fmt: skip
        report(f"kept {len(kept)} backup(s): {', '.join(m.name for m in kept)}")
        for manifest in held:
            report(f"kept backup '{manifest.name}': pinned {pinned[manifest.name]}")
    finally:
        storage.close()


def run_delete(args: DeleteSettings, report: Report) -> None:
    """Remove the backup ``--name`` names (``BackupNotFound``, exit 11, if there is none)."""
    if not args.name:
        raise ConfigError("no backup name given: use --name")
    name = validate_name("backup", args.name)
    layout = layout_of(args)
    storage = open_store(args)
    try:
        manifest = read_manifest(storage, layout, name)
        until = pinned_until(storage, layout, name, datetime.now(UTC))
        if until is not None:
            raise ConfigError(f"backup '{name}' is pinned {until}: release it first with "
                              f"'cloud-dump keep {name} --release'")  # fmt: skip
        count = delete_backup(storage, layout, manifest, dry_run=args.dry_run)
    finally:
        storage.close()
    _prefixed(report, args.dry_run)(
        f"removed backup '{name}' ({count} objects); its WAL stays until 'cloud-dump expire'"
    )


def _refuse_diverging(storage: Storage, layout: Layout, backups: list[BackupManifest]) -> None:
    """``ConfigError`` when ``backups`` are of diverging histories (``catalog.find_divergence``).

    A count or a window over two lineages would keep the newest of either, and remove the
    other's backups and the WAL only they read: a restored copy backed up into its source's
    store would expire the source's backups. Which lineage matters is the operator's call.
    Pinned backups count too: pinning the source's backups would leave the copy's the only
    ones the policy keeps, and the source's WAL would go as it arrives.
    """
    inventory = read_wal_inventory(storage, layout, segment_size_of(backups[0]))
    divergence = find_divergence(backups, timeline_starts(backups, inventory))
    if divergence is not None:
        raise ConfigError(
            f"expire will not choose between histories: {divergence.describe()}; keep one "
            "history per location: remove the other's backups with 'cloud-dump delete "
            "--name' (after 'cloud-dump keep NAME --release' for a pinned one), and back "
            "copies up under another --cluster"
        )


def plan_expiry(
    backups: list[BackupManifest], retain: int | None, window: timedelta | None, now: datetime
) -> tuple[list[BackupManifest], list[BackupManifest]]:
    """``(kept, expired)``, each newest first, for backups given in any order."""
    ordered = sorted(backups, key=end_order, reverse=True)
    if retain is not None:
        count = max(1, retain)
    else:
        assert window is not None
        start = now - window
        # The newest backup that ended at or before the window's start reaches all of it.
        count = next((i + 1 for i, m in enumerate(ordered) if backup_end(m) <= start), len(ordered))
    return ordered[:count], ordered[count:]


def delete_backup(
    storage: Storage, layout: Layout, manifest: BackupManifest, *, dry_run: bool
) -> int:
    """Remove every object under the backup's prefix, ``manifest.json`` first and on its own
    (from then on the backup is no longer one for ``list`` and ``restore``, and what an
    interrupted removal leaves is ``cleanup``'s), the rest in batches; how many."""
    prefix = layout.backup_prefix(manifest.name)
    keys = [info.key for info in storage.list(prefix)]
    first = prefix + MANIFEST_NAME
    rest = [k for k in keys if k != first]
    if not dry_run:
        if first in keys:
            storage.delete(first)
        storage.delete_many(rest)
    return len(keys)


def expire_wal(
    storage: Storage,
    layout: Layout,
    kept: list[BackupManifest],
    pinned: list[BackupManifest],
    *,
    dry_run: bool,
) -> int:
    """Remove the WAL files (segments, ``.partial``, ``.backup``) no kept backup reads, except
    those from the first to the last segment of a pinned backup; how many. History files stay.

    A backup's recovery reads WAL from its first segment on, on its own timeline and on the
    timelines that descend from it, whose numbers are always higher (PostgreSQL gives a new
    timeline the highest number in the archive plus one, ``findNewestTimeLine``). So a file is
    kept when some kept backup started on its timeline or a lower one, at or before it. This
    needs names only: history files, which may be encrypted, are not read, and a sibling
    timeline's WAL after a kept backup stays.
    """
    size = segment_size_of(kept[0])
    starts = [Segment.parse(m.start_wal_file, size) for m in kept]
    # Through the segment after the one holding the end LSN (the record after the end is read
    # before recovery stops there). Not a promise that a recovery target works: PostgreSQL 15
    # reads ahead (recovery_prefetch) and may ask for later segments, which wal-fetch then
    # reports as a gap; the pinned backup itself restores without any (see the docstring).
    held = [(Segment.parse(m.start_wal_file, size),
             max(Segment.parse(m.end_wal_file, size).number,
                 segment_number(parse_lsn(m.end_lsn), size)) + 1) for m in pinned]  # fmt: skip

    def needed(segment: Segment) -> bool:
        read = any(segment.timeline >= s.timeline and segment.number >= s.number for s in starts)
        pinned_own = any(segment.timeline >= lo.timeline and lo.number <= segment.number <= hi
                         for lo, hi in held)  # fmt: skip
        return read or pinned_own

    root = layout.wal_root
    doomed = []
    for info in storage.list(root):
        name = wal_file_name(info.key[len(root):])
        if name is None or kind_of(name) not in ("segment", "partial", "backup"):
            continue  # history files, the archive's identity, anything else: kept
        try:
            segment = Segment.parse(name[:24], size)
        except ConfigError:
            continue
        if not needed(segment):
            doomed.append(info.key)
    if not dry_run:
        storage.delete_many(doomed)
    return len(doomed)


def run_keep(args: KeepSettings, report: Report) -> None:
    """Pin (or with ``--release`` unpin) the backup ``args.name`` names."""
    name = validate_name("backup", args.name)
    until = None if args.until is None else parse_until(args.until)
    if until is not None and until <= datetime.now(UTC):
        raise ConfigError(f"--until '{args.until}' is in the past: the pin would protect "
                          "nothing (use --release to unpin)")  # fmt: skip
    layout = layout_of(args)
    storage = open_store(args)
    try:
        key = layout.backup_prefix(name) + KEEP_NAME
        try:
            read_manifest(storage, layout, name)  # BackupNotFound (exit 11) for no such backup
        except BackupNotFound:
            # A pin on a prefix that lost its manifest keeps cleanup away: releasing it must work.
            if not (args.release and _exists(storage, key)):
                raise
        if args.release:
            storage.delete(key)
            report(f"backup '{name}' is no longer pinned: expire may remove it")
            return
        pin = {"until": until.isoformat() if until else None,
               "pinned_at": datetime.now(UTC).isoformat()}  # fmt: skip
        storage.put(key, json.dumps(pin).encode())
    finally:
        storage.close()
    report(f"backup '{name}' is pinned "
           f"{'until ' + until.isoformat() if until else 'until released'}")  # fmt: skip


def _exists(storage: Storage, key: str) -> bool:
    try:
        storage.head(key)
    except ObjectNotFound:
        return False
    return True


def parse_until(text: str) -> datetime:
    """A date (``2027-01-31``: midnight UTC) or a time with its zone, read as restore reads
    ``--recovery-target-time`` (``coordinator.zonedtime``: a numeric offset, ``Z``/``UTC`` or a
    full zone name such as ``Europe/Helsinki``); the instant, in UTC. ``ConfigError`` otherwise.
    """
    from coordinator.zonedtime import parse_zoned_time

    try:
        return datetime.strptime(text.strip(), "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        pass  # more than a date
    return parse_zoned_time(
        text, "--until", without_zone="and a date alone means midnight UTC: add an offset "
        "such as +00:00 or a zone name such as Europe/Helsinki",
    ).instant  # fmt: skip


def _prefixed(report: Report, dry_run: bool) -> Callable[[str], None]:
    if not dry_run:
        return report
    return lambda line: report("(dry run) " + line.replace("removed", "would remove", 1))
