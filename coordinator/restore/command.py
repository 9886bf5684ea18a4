"""``cloud-dump restore``: checks made before anything is downloaded, the restore, the report.

``coordinator.cli.main`` parses and maps errors to exit codes; this module turns restore's flags
into the objects ``coordinator.restore.run`` takes: the target checked against the backup and the
archive's timelines, the recovery settings, the restore config file and the final report.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.restore.choose import LATEST
from coordinator.restore.recovery import (
    AWS_VARIABLES,
    RecoveryTarget,
    WalFetchCommand,
    normalized_target,
    own_executable,
)
from coordinator.restore.restoreconfig import absolute_path, default_restore_config
from coordinator.restore.targets import (
    normalize_timeline,
)
from coordinator.settings import (
    Report,
    RestoreSettings,
    layout_of,
    open_store,
    read_passphrase,
    storage_url_of,
)
from storage.base import Storage
from storage.errors import ConfigError
from storage.layout import validate_name

if TYPE_CHECKING:
    from coordinator.restore.recoveryconf import RecoveryConf
    from coordinator.restore.run import RestoreSummary
    from coordinator.walarchive import WalArchive
    from storage.manifest import BackupManifest

log = logging.getLogger(__name__)


def run_restore(args: RestoreSettings, report: Report) -> None:
    from coordinator.restore.ownership import resolve_owner
    from coordinator.restore.recovery import check_restore_config
    from coordinator.restore.recoveryconf import RecoveryConf, SettingsRequest
    from coordinator.restore.run import restore_backup

    # No name, or "latest": chosen from the store's manifests once it is open (restore.choose).
    chosen = not args.name or args.name == LATEST
    name = "" if chosen else validate_name("backup", str(args.name))
    if not args.pgdata:
        raise ConfigError("no target directory given: use --pgdata or PGDATA")
    storage_url_of(args)  # no storage: refused before anything is decided
    if args.wal_passphrase_from_flag and not args.wal_passphrase_file:
        log.warning("--wal-passphrase is visible to every user in 'ps': prefer "
                    "--wal-passphrase-file or CLOUD_DUMP_WAL_PASSPHRASE")
    # Refuse a bad recovery target before downloading anything.
    target = target_from_args(args)
    command = wal_fetch_command(args, Path(args.pgdata), os.environ) if target else None
    if command is not None:
        check_restore_config(command)  # not another copy's (exit 13)
    # Run as root: who gets what the restore writes, decided before anything is downloaded.
    owner = resolve_owner(args.owner, Path(args.pgdata))
    storage = open_store(args)
    settings: RecoveryConf | None = None
    try:
        if chosen:
            name = _choose(storage, args, target)
        manifest, target = _check_before_download(storage, args, name, target)
        # Applied once every file is verified, before pg_control makes PGDATA startable.
        settings = RecoveryConf(SettingsRequest(
            name, target, command, args.archive_mode, datetime.now(UTC)))
        summary = restore_backup(
            storage,
            layout_of(args),
            name,
            Path(args.pgdata),
            identity_paths=[Path(p) for p in args.identity_key or []],
            passphrase=read_passphrase(args),
            tablespace_mapping=_mapping(args.tablespace_mapping),
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


def _choose(storage: Storage, args: RestoreSettings, target: RecoveryTarget | None) -> str:
    """The name of the backup ``coordinator.restore.choose`` picks for ``target``; logged with
    the reason, as the operator named none."""
    from coordinator.catalog import (
        find_backups,
        read_wal_inventory,
        segment_size_of,
        timeline_starts,
    )
    from coordinator.restore.choose import choose_backup

    layout = layout_of(args)
    backups = find_backups(storage, layout)
    # Where each timeline begins, from one LIST of the archive: backups of diverging histories
    # (a copy backed up into its source's store) are told apart by it.
    inventory = (read_wal_inventory(storage, layout, segment_size_of(backups[0]))
                 if backups else None)  # fmt: skip
    manifest, why = choose_backup(target, backups, layout.describe_backups_root(storage.url),
                                  timeline_starts(backups, inventory))
    log.info("restoring backup '%s' (%s; ended %s, LSN %s, timeline %s): %s of %d",
             manifest.name, "--name latest" if args.name else "no --name given",
             manifest.end_time.isoformat(), manifest.end_lsn, manifest.timeline, why,
             len(backups))  # fmt: skip
    return manifest.name


def _check_before_download(
    storage: Storage, args: RestoreSettings, name: str, target: RecoveryTarget | None
) -> tuple[BackupManifest, RecoveryTarget | None]:
    """The backup's manifest, and the target with the timeline recovery will follow; with a
    target, refuse one it cannot reach or an ambiguous timeline (exit 3), a WAL archive
    location where nothing was ever archived (exit 18) and WAL keys that would not decrypt the
    archive (exit 14)."""
    from coordinator.catalog import find_backups, read_manifest
    from coordinator.restore.reachability import check_reachable
    from coordinator.settings import keys_from
    from coordinator.walarchive import WalArchive, require_wal_archive

    manifest = read_manifest(storage, layout_of(args), name)
    if args.restore_config and target is not None:
        _refuse_config_inside_targets(Path(args.restore_config), manifest, args)
    if target is not None:
        check_reachable(target, manifest, lambda: find_backups(storage, layout_of(args)))
        require_wal_archive(storage, layout_of(args),
                            immediate=args.recovery_target == "immediate")
        # The keys wal-fetch will have (the restore config gets the same view of the flags).
        archive = WalArchive(storage, layout_of(args), keys_from(wal_keys_view(args), None))
        archive.check_keys(manifest.start_wal_file, lambda mode: _wal_keys_hint(args, mode))
        target = _follow_timeline(args, archive, manifest, target)
    return manifest, target


def _wal_keys_hint(args: RestoreSettings, mode: str) -> str:
    """What to give for a WAL archive encrypted in ``mode`` ("passphrase" or "recipients"),
    for the message refusing the keys restore had."""
    if mode == "passphrase":
        give = ("give the archive's passphrase with --wal-passphrase-file FILE (or "
                "CLOUD_DUMP_WAL_PASSPHRASE), or its unwrapped key with --wal-identity-key FILE")
    else:
        give = ("give an identity that matches one of its recipients with --wal-identity-key "
                "FILE (or CLOUD_DUMP_WAL_IDENTITY_KEY)")
    if wal_keys_view(args) is args:
        give += " (with no --wal-* key given, restore tried the backup's keys)"
    return give


def _refuse_config_inside_targets(
    config: Path, manifest: BackupManifest, args: RestoreSettings
) -> None:
    """A restore config inside PGDATA or a tablespace directory would travel, secrets and all,
    in every base backup of the copy: refuse it (exit 3) before anything is written."""
    from coordinator.restore.targetdirs import plan_targets

    assert args.pgdata is not None  # run_restore refused it missing
    plan = plan_targets(manifest, Path(args.pgdata), _mapping(args.tablespace_mapping))
    where = Path(os.path.normpath(config.absolute()))
    for directory in (plan.pgdata, *plan.tablespaces.values()):
        if where.is_relative_to(Path(os.path.normpath(directory.absolute()))):
            raise ConfigError(
                f"--restore-config '{config}' is inside '{directory}', which every base backup "
                "of the copy carries (with the credentials and keys the file may hold): put it "
                "outside the restored directories"
            )


def _follow_timeline(
    args: RestoreSettings, archive: WalArchive, manifest: BackupManifest, target: RecoveryTarget
) -> RecoveryTarget:
    """``target`` pinned to the timeline ``coordinator.restore.timelines`` chooses from the
    archive's history files (refusing an ambiguous or impossible one, exit 3)."""

    from coordinator.catalog import segment_size_of
    from coordinator.restore.archiving import archive_url
    from coordinator.restore.timelines import ArchivedTimelines, choose_timeline

    where = archive_url(storage_url_of(args), args.cluster, args.wal_prefix)
    choice = choose_timeline(
        manifest, target, ArchivedTimelines(archive, segment_size_of(manifest), where))
    return replace(target, timeline=choice.setting, followed=choice.describe())


def _report_restore(
    args: RestoreSettings,
    summary: RestoreSummary,
    manifest: BackupManifest,
    settings: RecoveryConf,
    report: Report,
) -> None:
    from coordinator.restore.archiving import archive_url
    from coordinator.restore.report import restore_report

    assert settings.outcome is not None  # restore_backup calls before_startable or raises
    text = restore_report(
        summary, manifest, settings.request, settings.outcome, settings.plan,
        archive_url(storage_url_of(args), args.cluster, args.wal_prefix),
    )
    for line in text.lines:
        report(line)
    for warning in text.warnings:
        log.warning("%s", warning)


def _mapping(pairs: Iterable[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old.startswith("/") or not new.startswith("/"):
            raise ConfigError(f"invalid --tablespace-mapping '{pair}': expected /OLD=/NEW")
        mapping[old.rstrip("/")] = new.rstrip("/")
    return mapping


def target_from_args(args: RestoreSettings) -> RecoveryTarget | None:
    """The target the restore flags ask for, normalised; None for a plain restore.

    ``ConfigError`` (exit 3) for a value PostgreSQL would refuse or read otherwise.
    """
    timeline = (None if args.recovery_target_timeline is None
                else normalize_timeline(args.recovery_target_timeline))
    given = [
        (setting, value)
        for setting, value in (
            ("recovery_target_time", args.recovery_target_time),
            ("recovery_target_lsn", args.recovery_target_lsn),
            ("recovery_target_xid", args.recovery_target_xid),
            ("recovery_target_name", args.recovery_target_name),
        )
        if value is not None
    ]
    if args.recovery_target == "immediate":
        given.append(("recovery_target", "immediate"))
    if not given and args.recovery_target != "latest" and timeline is None:
        if args.recovery_target_exclusive:
            raise ConfigError("--recovery-target-exclusive needs a target time, LSN or xid")
        return None
    setting, value = given[0] if given else (None, None)
    if args.recovery_target_exclusive and setting not in (
        "recovery_target_time", "recovery_target_lsn", "recovery_target_xid"
    ):
        raise ConfigError("--recovery-target-exclusive needs a target time, LSN or xid")
    target = RecoveryTarget(setting, value, timeline, not args.recovery_target_exclusive)
    return normalized_target(target) if setting is not None and value is not None else target


def wal_keys_view(args: RestoreSettings) -> RestoreSettings:
    """``args`` with the WAL archive's keys in place of the backup's when any is given
    (``--wal-identity-key``, ``--wal-passphrase-file``, the WAL passphrase: the seed's, for an
    archive encrypted otherwise than the backup); else ``args``, whose keys open both."""
    if not (args.wal_identity_key or args.wal_passphrase_file or args.wal_passphrase):
        return args
    return replace(args, identity_key=args.wal_identity_key,
                   passphrase_file=args.wal_passphrase_file, passphrase=args.wal_passphrase,
                   passphrase_from_flag=False)  # warned about once, by run_restore


def wal_fetch_command(
    args: RestoreSettings, pgdata: Path, environ: Mapping[str, str]
) -> WalFetchCommand:
    """The wal-fetch invocation and settings for a restore run with ``args``.

    ``CLOUD_DUMP_EXECUTABLE`` overrides the path of the command the server runs, for hosts where
    the server's user reaches cloud-dump by another path than the one running restore.
    """
    args = wal_keys_view(args)  # wal-fetch decrypts the WAL archive: its keys
    settings: dict[str, str] = {"CLOUD_DUMP_STORAGE": storage_url_of(args)}
    optional = {
        "CLOUD_DUMP_S3_ENDPOINT": args.s3_endpoint,
        "CLOUD_DUMP_S3_REGION": args.s3_region,
        "CLOUD_DUMP_S3_PATH_STYLE": None if args.s3_path_style is None
        else str(args.s3_path_style).lower(),
        "CLOUD_DUMP_STORAGE_MAX_ATTEMPTS": str(args.storage_max_attempts),
        "CLOUD_DUMP_CLUSTER": args.cluster,
        "CLOUD_DUMP_WAL_PREFIX": args.wal_prefix,
        "CLOUD_DUMP_SPOOL_DIR": args.spool_dir and str(Path(args.spool_dir).absolute()),
        "CLOUD_DUMP_IDENTITY_KEY": ",".join(
            str(Path(p).absolute()) for p in args.identity_key or []
        ),
    }
    if args.passphrase_file:
        optional["CLOUD_DUMP_PASSPHRASE_FILE"] = str(Path(args.passphrase_file).absolute())
    elif args.passphrase:
        optional["CLOUD_DUMP_PASSPHRASE"] = args.passphrase
    if str(args.storage).startswith("s3:"):
        optional.update({name: environ.get(name) for name in AWS_VARIABLES})
    settings.update({k: v for k, v in optional.items() if v})
    config = Path(args.restore_config) if args.restore_config else default_restore_config(pgdata)
    executable = environ.get("CLOUD_DUMP_EXECUTABLE") or own_executable()
    return WalFetchCommand(Path(executable).absolute(), absolute_path(config), settings,
                           absolute_path(pgdata))
