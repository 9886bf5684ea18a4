"""``cloud-dump expire`` and ``cloud-dump delete``: remove backups, and WAL no kept backup needs.

Retention policies, as operators know them from pgBackRest and barman:

- ``--retain N``: the newest N backups are kept;
- ``--recovery-window AGE``: every point of the last AGE stays restorable: the newest backup
  that ended before the window began is kept, with every backup after it.

"Newest" is by the end recorded in ``manifest.json`` (time, then LSN), the order ``list``
shows. The newest backup is always kept, whatever the policy says.

A backup is removed ``manifest.json`` first: from that moment it is no longer a backup for
``list`` or ``restore``, and if the removal is interrupted, ``cloud-dump cleanup`` removes the
rest as an incomplete prefix. Then the WAL: every archived WAL file (segment, ``.partial``,
``.backup``) whose segment lies before the first segment of the oldest kept backup is removed.
Segment numbers are positions in the WAL (LSN / segment size) whatever the timeline, so a file
before every kept backup's start is needed by none of them, on any timeline; files from there on
stay, on every timeline. History files and the archive's identity always stay (they are tiny,
and recovery reads every history file of the timelines it follows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from coordinator.catalog import find_backups, read_manifest, segment_size_of, wal_file_name
from coordinator.ops.cleanup import parse_age
from coordinator.settings import (
    DeleteSettings,
    ExpireSettings,
    Report,
    layout_of,
    open_store,
)
from storage.base import Storage
from storage.errors import ConfigError
from storage.layout import MANIFEST_NAME, Layout, validate_name
from storage.manifest import BackupManifest
from storage.walnames import Segment, kind_of, parse_lsn

log = logging.getLogger(__name__)


def run_expire(args: ExpireSettings, report: Report) -> None:
    """Apply the policy ``args`` names; one line per removal (``--dry-run``: per one that
    would be made)."""
    if args.retain is None and args.recovery_window is None:
        raise ConfigError("expire needs a policy: --retain N or --recovery-window AGE")
    window = parse_age(args.recovery_window) if args.recovery_window is not None else None
    layout = layout_of(args)
    storage = open_store(args)
    try:
        backups = find_backups(storage, layout)  # newest first
        if not backups:
            report(f"nothing to expire: no backups in "
                   f"{layout.describe_backups_root(storage.url)}")  # fmt: skip
            return
        kept, expired = plan_expiry(backups, args.retain, window, datetime.now(UTC))
        out = _prefixed(report, args.dry_run)
        for manifest in expired:
            count = delete_backup(storage, layout, manifest, dry_run=args.dry_run)
            out(f"removed backup '{manifest.name}' (ended {manifest.end_time.isoformat()}, "
                f"{count} objects)")  # fmt: skip
        removed = expire_wal(storage, layout, kept, dry_run=args.dry_run)
        oldest = kept[-1]
        out(f"removed {removed} WAL file(s) before {oldest.start_wal_file}, the first segment "
            f"of the oldest kept backup '{oldest.name}'")  # fmt: skip
        report(f"kept {len(kept)} backup(s): {', '.join(m.name for m in kept)}")
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
        count = delete_backup(storage, layout, manifest, dry_run=args.dry_run)
    finally:
        storage.close()
    _prefixed(report, args.dry_run)(
        f"removed backup '{name}' ({count} objects); its WAL stays until 'cloud-dump expire'"
    )


def plan_expiry(
    backups: list[BackupManifest], retain: int | None, window: timedelta | None, now: datetime
) -> tuple[list[BackupManifest], list[BackupManifest]]:
    """``(kept, expired)``, each newest first, for backups given in any order."""
    ordered = sorted(backups, key=_end_order, reverse=True)
    if retain is not None:
        count = max(1, retain)
    else:
        assert window is not None
        start = now - window
        # The newest backup that ended at or before the window's start reaches all of it.
        count = next((i + 1 for i, m in enumerate(ordered) if _end(m) <= start), len(ordered))
    return ordered[:count], ordered[count:]


def delete_backup(
    storage: Storage, layout: Layout, manifest: BackupManifest, *, dry_run: bool
) -> int:
    """Remove every object under the backup's prefix, ``manifest.json`` first; how many."""
    prefix = layout.backup_prefix(manifest.name)
    keys = [info.key for info in storage.list(prefix)]
    first = prefix + MANIFEST_NAME
    ordered = [first] + [k for k in keys if k != first] if first in keys else keys
    if not dry_run:
        for key in ordered:
            storage.delete(key)
    return len(ordered)


def expire_wal(
    storage: Storage, layout: Layout, kept: list[BackupManifest], *, dry_run: bool
) -> int:
    """Remove the WAL files before the first segment of every kept backup; how many."""
    size = segment_size_of(kept[0])
    first_needed = min(Segment.parse(m.start_wal_file, size).number for m in kept)
    root = layout.wal_root
    removed = 0
    for info in list(storage.list(root)):
        name = wal_file_name(info.key[len(root):])
        if name is None or kind_of(name) not in ("segment", "partial", "backup"):
            continue  # history files, the archive's identity, anything else: kept
        try:
            number = Segment.parse(name[:24], size).number
        except ConfigError:
            continue
        if number < first_needed:
            if not dry_run:
                storage.delete(info.key)
            removed += 1
    return removed


def _prefixed(report: Report, dry_run: bool) -> Callable[[str], None]:
    if not dry_run:
        return report
    return lambda line: report("(dry run) " + line.replace("removed", "would remove", 1))


def _end(manifest: BackupManifest) -> datetime:
    end = manifest.end_time
    return end if end.tzinfo is not None else end.replace(tzinfo=UTC)


def _end_order(manifest: BackupManifest) -> tuple[datetime, int]:
    return _end(manifest), parse_lsn(manifest.end_lsn)
