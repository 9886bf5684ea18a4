"""Whether a backup can reach a recovery target, judged from its ``manifest.json`` before download.

PostgreSQL cannot stop before the backup is consistent, which it is at the backup's end. Given
an earlier target, it fails late (after the whole download) for an LSN, and for a time it may
promote at the first commit after the backup's end, with rows that did not exist at the target
time. So restore refuses (``ConfigError``, exit 3) a target the manifest shows to be out of
reach, naming the backup's end and the newest earlier backup of the same cluster that reaches
it, if the store holds one:

- time: before ``end_time``. ``end_time`` is the coordinator's clock when the server's
  BASE_BACKUP stream ended, an instant after the server reached the backup's end (and off by
  any difference between the two hosts' clocks): a target within that margin is refused even
  though the server might have reached it. Refusing is the safe side of that doubt; the message
  says so. (Backups taken before this rule recorded the time their uploads drained.)
- LSN: before ``end_lsn``.
- a numeric timeline: lower than the backup's (the backup's history does not contain it).

``immediate`` and ``latest`` are reachable by definition; an xid or a restore point name cannot
be located without the WAL: if it lies before the backup's end, PostgreSQL stops with "recovery
ended before configured recovery target was reached" and does not promote.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from coordinator.catalog import backup_end
from coordinator.restore.recovery import RecoveryTarget
from coordinator.restore.targets import format_lsn, parse_lsn, timeline_number, utc_text
from storage.errors import ConfigError
from storage.manifest import BackupManifest

Backups = Callable[[], Sequence[BackupManifest]]


def check_reachable(target: RecoveryTarget, manifest: BackupManifest, backups: Backups) -> None:
    """Raise ``ConfigError`` when ``manifest``'s backup cannot reach ``target``.

    ``backups`` lists the store's backups (newest first); called only to name an alternative.
    """
    instant = target.instant
    if instant is not None and instant < backup_end(manifest):
        raise ConfigError(
            f"recovery target time '{target.value}' is before the end of backup "
            f"'{manifest.name}' ({utc_text(manifest.end_time)}, the backup host's clock when "
            "its stream ended): PostgreSQL cannot stop before a backup is consistent; "
            + _alternative(manifest, backups, lambda m: backup_end(m) <= instant)
        )
    if target.lsn is not None and target.lsn < parse_lsn(manifest.end_lsn):
        lsn = target.lsn
        raise ConfigError(
            f"recovery target LSN {format_lsn(lsn)} is before the end of backup "
            f"'{manifest.name}' (LSN {manifest.end_lsn}): PostgreSQL cannot stop before a backup "
            "is consistent; "
            + _alternative(manifest, backups, lambda m: parse_lsn(m.end_lsn) <= lsn)
        )
    timeline = timeline_number(target.timeline)
    if timeline is not None and timeline < manifest.timeline:
        raise ConfigError(
            f"recovery target timeline {timeline} is lower than the timeline of backup "
            f"'{manifest.name}' ({manifest.timeline}): its history cannot lead there; "
            + _alternative(manifest, backups, lambda m: m.timeline <= timeline)
        )


def _alternative(
    manifest: BackupManifest, backups: Backups, reaches: Callable[[BackupManifest], bool]
) -> str:
    for other in backups():
        if (
            other.name != manifest.name
            and other.system_identifier == manifest.system_identifier
            and backup_end(other) <= backup_end(manifest)
            and reaches(other)
        ):
            return (f"backup '{other.name}' (ended {utc_text(other.end_time)}, LSN "
                    f"{other.end_lsn}, timeline {other.timeline}) can reach it")
    return "no earlier backup of this cluster in the store can reach it"
