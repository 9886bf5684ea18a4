"""Which backup a restore without ``--name`` (or with ``--name latest``) restores.

Decided from the store's ``manifest.json`` files alone, before anything is downloaded, and
without reading this host's clock: a target time is compared with the times the manifests
record, a target LSN with their LSNs.

- a time or LSN target: the newest backup that can reach it (``coordinator.restore.
  reachability``: it ended at or before the target, and its timeline is not above a numeric
  target timeline);
- ``immediate``, ``latest``, or no target: the newest backup (of a numeric target timeline, or
  below it, when one is given);
- a transaction ID or a restore point name: refused (exit 3). Where those lie in the WAL is not
  recorded anywhere a restore could read before replaying it; guessing the newest backup would
  make PostgreSQL stop with "recovery ended before configured recovery target was reached"
  after the whole download whenever the target came earlier. ``--name`` says which.

"Newest" is by the end of the backup as its manifest records it (``end_time``, then
``end_lsn``): the order ``cloud-dump list`` shows. Backups of more than one cluster (system
identifier) under one location are refused rather than mixed: ``--cluster`` or ``--name``
tells them apart. So are backups of diverging histories of one cluster among those that could
serve (``catalog.find_divergence``): a restored copy that archives and is backed up into its
source's store makes a second lineage whose times and LSNs interleave with the source's, and
"the newest backup before the target" would silently pick either; ``--name`` or a numeric
``--recovery-target-timeline`` says which (the latter keeps only backups that can lie on that
timeline's history).
"""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.catalog import (
    backup_end,
    end_order,
    ends_before_timeline,
    find_divergence,
    timeline_starts,
)
from coordinator.restore.recovery import RecoveryTarget
from coordinator.restore.targets import format_lsn, parse_lsn, timeline_number, utc_text
from storage.errors import BackupNotFound, ConfigError
from storage.layout import LATEST_NAME
from storage.manifest import BackupManifest

LATEST = LATEST_NAME  # --name latest: the newest backup, as with no --name


def choose_backup(
    target: RecoveryTarget | None,
    backups: Sequence[BackupManifest],
    where: str,
    starts: dict[int, int] | None = None,
) -> tuple[BackupManifest, str]:
    """The backup to restore for ``target`` among ``backups`` (any order), and why, as a
    phrase for the log ("the newest backup that ends at or before ..."). ``where``: the backups root
    as messages name it. ``starts``: the first segment number of each timeline
    (``catalog.timeline_starts``, from the WAL archive); None: from the backups alone.

    Raises ``BackupNotFound`` (exit 11) when there is no backup at all, ``ConfigError`` (exit 3)
    for a target no backup reaches (naming the nearest ones), an xid or restore point target,
    backups of several clusters, or candidates of diverging histories.
    """
    if not backups:
        raise BackupNotFound(f"no backup to restore: none in {where}")
    clusters = sorted({m.system_identifier for m in backups})
    if len(clusters) > 1:
        raise ConfigError(
            f"the backups in {where} are of {len(clusters)} different clusters (system "
            f"identifiers {', '.join(clusters)}): name the backup to restore with --name"
        )
    ordered = sorted(backups, key=end_order, reverse=True)
    setting = target.setting if target is not None else None
    if setting in ("recovery_target_xid", "recovery_target_name"):
        assert target is not None
        what = "transaction ID" if setting == "recovery_target_xid" else "restore point"
        raise ConfigError(
            f"a {what} target ('{target.value}') needs --name: where it lies in the WAL is not "
            "known before recovery replays it, so no backup can be chosen for it "
            "('cloud-dump list' shows the backups)"
        )
    if starts is None:
        starts = timeline_starts(backups, None)
    timeline = timeline_number(target.timeline) if target is not None else None
    if timeline is not None:
        ordered = [m for m in ordered if m.timeline == timeline or (
            m.timeline < timeline and ends_before_timeline(m, timeline, starts))]
        if not ordered:
            raise ConfigError(
                f"no backup can reach timeline {timeline}: every backup in {where} is of a "
                f"later timeline or ended after it began ({_nearest([_oldest(backups)])})"
            )
    if target is None or (target.instant is None and target.lsn is None):
        candidates, why, by = ordered, "the newest backup", "age"
    else:
        by = _target_text(target)
        candidates = [m for m in ordered if _reaches(m, target)]
        why = f"the newest backup that ends at or before {_target_text(target)}"
        if not candidates:
            raise ConfigError(
                f"no backup can reach {_target_text(target)}: PostgreSQL cannot stop before a "
                f"backup is consistent, and the oldest backup in {where} ends later "
                f"({_nearest([ordered[-1]])})"
            )
    divergence = find_divergence(candidates, starts)
    if divergence is not None:
        how = "name the backup with --name"
        if divergence.begins is not None:
            how += (f", or the history with --recovery-target-timeline "
                    f"{divergence.earlier.timeline} or {divergence.later.timeline}")
        raise ConfigError(f"cannot choose a backup by {by} alone: {divergence.describe()}: {how}")
    return candidates[0], why


def _reaches(manifest: BackupManifest, target: RecoveryTarget) -> bool:
    """Whether the backup ended at or before the target (as ``reachability`` judges it)."""
    if target.instant is not None and target.instant < backup_end(manifest):
        return False
    return target.lsn is None or parse_lsn(manifest.end_lsn) <= target.lsn


def _target_text(target: RecoveryTarget) -> str:
    if target.instant is not None:
        return f"target time '{target.value}'"
    assert target.lsn is not None
    return f"target LSN {format_lsn(target.lsn)}"


def _nearest(manifests: Sequence[BackupManifest]) -> str:
    return "; ".join(
        f"backup '{m.name}' ended {utc_text(m.end_time)}, LSN {m.end_lsn}, timeline {m.timeline}"
        for m in manifests
    )


def _oldest(backups: Sequence[BackupManifest]) -> BackupManifest:
    return min(backups, key=end_order)
