"""``cloud-dump restore``: checks made before anything is downloaded, the restore, the report.

``coordinator.cli.main`` parses and maps errors to exit codes; this module turns restore's flags
into the objects ``coordinator.restore.run`` takes: the target checked against the backup and the
archive's timelines, the recovery settings, the restore config file and the final report.
"""

from __future__ import annotations

import argparse
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.settings import Report, layout_of, open_store, read_passphrase
from storage.base import Storage
from storage.errors import ConfigError
from storage.layout import DEFAULT_WAL_PREFIX, Layout, validate_name

if TYPE_CHECKING:
    from coordinator.restore.recovery import RecoveryTarget
    from coordinator.restore.recoveryconf import RestoreSettings
    from coordinator.restore.run import RestoreSummary
    from storage.manifest import BackupManifest

log = logging.getLogger(__name__)


def run_restore(args: argparse.Namespace, report: Report) -> None:
    from coordinator.restore.ownership import resolve_owner
    from coordinator.restore.recovery import (
        check_restore_config,
        target_from_args,
        wal_fetch_command,
    )
    from coordinator.restore.recoveryconf import RestoreSettings, SettingsRequest
    from coordinator.restore.run import restore_backup

    name = validate_name("backup", args.name or "")
    if not args.pgdata:
        raise ConfigError("no target directory given: use --pgdata or PGDATA")
    # Refuse a bad recovery target before downloading anything.
    target = target_from_args(args)
    command = wal_fetch_command(args, Path(args.pgdata), os.environ) if target else None
    if command is not None:
        check_restore_config(command)  # not another copy's (exit 13)
    # Run as root: who gets what the restore writes, decided before anything is downloaded.
    owner = resolve_owner(args.owner, Path(args.pgdata))
    storage = open_store(args)
    settings: RestoreSettings | None = None
    try:
        manifest, target = _check_before_download(storage, args, name, target)
        # Applied once every file is verified, before pg_control makes PGDATA startable.
        settings = RestoreSettings(SettingsRequest(
            name, target, command, args.archive_mode, datetime.now(UTC)))
        summary = restore_backup(
            storage,
            layout_of(args),
            name,
            Path(args.pgdata),
            identity_paths=[Path(p) for p in args.identity_key or []],
            passphrase=read_passphrase(args),
            tablespace_mapping=_mapping(args.tablespace_mapping or []),
            parallel=args.parallel,
            before_startable=settings,
            owner=owner,
            owned_paths=[command.config_path] if command else [],
        )
    except BaseException:
        if settings is not None:
            settings.discard()
        raise
    finally:
        storage.close()
    assert settings is not None  # made before restore_backup, which returned
    _report_restore(args, summary, manifest, settings, report)


def _check_before_download(
    storage: Storage, args: argparse.Namespace, name: str, target: RecoveryTarget | None
) -> tuple[BackupManifest, RecoveryTarget | None]:
    """The backup's manifest, and the target with the timeline recovery will follow; with a
    target, refuse one it cannot reach or an ambiguous timeline (exit 3) and a WAL archive
    location where nothing was ever archived (exit 18)."""
    from coordinator.catalog import find_backups, read_manifest
    from coordinator.restore.reachability import check_reachable
    from coordinator.walarchive import require_wal_archive

    manifest = read_manifest(storage, layout_of(args), name)
    if args.restore_config and target is not None:
        _refuse_config_inside_targets(Path(args.restore_config), manifest, args)
    if target is not None:
        check_reachable(target, manifest, lambda: find_backups(storage, layout_of(args)))
        require_wal_archive(storage, _wal_layout(args),
                            immediate=args.recovery_target == "immediate")
        target = _follow_timeline(storage, args, manifest, target)
    return manifest, target


def _refuse_config_inside_targets(
    config: Path, manifest: BackupManifest, args: argparse.Namespace
) -> None:
    """A restore config inside PGDATA or a tablespace directory would travel, secrets and all,
    in every base backup of the copy: refuse it (exit 3) before anything is written."""
    from coordinator.restore.targetdirs import plan_targets

    plan = plan_targets(manifest, Path(args.pgdata), _mapping(args.tablespace_mapping or []))
    where = Path(os.path.normpath(config.absolute()))
    for directory in (plan.pgdata, *plan.tablespaces.values()):
        if where.is_relative_to(Path(os.path.normpath(directory.absolute()))):
            raise ConfigError(
                f"--restore-config '{config}' is inside '{directory}', which every base backup "
                "of the copy carries (with the credentials and keys the file may hold): put it "
                "outside the restored directories"
            )


def _follow_timeline(
    storage: Storage, args: argparse.Namespace, manifest: BackupManifest, target: RecoveryTarget
) -> RecoveryTarget:
    """``target`` pinned to the timeline ``coordinator.restore.timelines`` chooses from the
    archive's history files (refusing an ambiguous or impossible one, exit 3)."""
    from dataclasses import replace

    from coordinator.catalog import segment_size_of
    from coordinator.restore.archiving import archive_url
    from coordinator.restore.timelines import ArchivedTimelines, choose_timeline
    from coordinator.settings import keys_from
    from coordinator.walarchive import WalArchive

    archive = WalArchive(storage, _wal_layout(args), keys_from(args, None))
    where = archive_url(args.storage, args.cluster, args.wal_prefix)
    choice = choose_timeline(
        manifest, target, ArchivedTimelines(archive, segment_size_of(manifest), where))
    return replace(target, timeline=choice.setting, followed=choice.describe())


def _wal_layout(args: argparse.Namespace) -> Layout:
    return Layout(cluster=args.cluster, wal_prefix=args.wal_prefix or DEFAULT_WAL_PREFIX)


def _report_restore(
    args: argparse.Namespace,
    summary: RestoreSummary,
    manifest: BackupManifest,
    settings: RestoreSettings,
    report: Report,
) -> None:
    from coordinator.restore.archiving import archive_url
    from coordinator.restore.report import restore_report

    assert settings.outcome is not None  # restore_backup calls before_startable or raises
    text = restore_report(
        summary, manifest, settings.request, settings.outcome, settings.plan,
        archive_url(args.storage, args.cluster, args.wal_prefix),
    )
    for line in text.lines:
        report(line)
    for warning in text.warnings:
        log.warning("%s", warning)


def _mapping(pairs: list[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old.startswith("/") or not new.startswith("/"):
            raise ConfigError(f"invalid --tablespace-mapping '{pair}': expected /OLD=/NEW")
        mapping[old.rstrip("/")] = new.rstrip("/")
    return mapping
