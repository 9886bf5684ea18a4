"""What each command does with its parsed flags: build settings, storage and runner, run.

``coordinator.cli`` parses and maps errors to exit codes; this module turns flags into the
objects the library code takes, reading key and passphrase files here, at the edge.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from storage import Storage, StorageOptions, open_storage
from storage.base import S3_MAX_PART_SIZE_BYTES, S3_MIN_PART_SIZE_BYTES, Capabilities
from storage.errors import ConfigError
from storage.factory import storage_url
from storage.layout import DEFAULT_WAL_PREFIX, Layout, validate_name

if TYPE_CHECKING:
    from coordinator.backup import Encryption
    from coordinator.recovery import RecoveryTarget
    from coordinator.restore import RestoreSummary
    from coordinator.restoresettings import RestoreSettings
    from coordinator.runners import Runner
    from storage.manifest import BackupManifest

log = logging.getLogger(__name__)
Report = Callable[[str], None]


def storage_options(args: argparse.Namespace) -> StorageOptions:
    return StorageOptions(
        s3_endpoint=args.s3_endpoint,
        s3_region=args.s3_region,
        s3_path_style=args.s3_path_style,
        max_part_count=args.s3_max_parts,
        max_attempts=args.storage_max_attempts,
    )


def open_store(args: argparse.Namespace) -> Storage:
    if not args.storage:
        raise ConfigError("no storage given: use --storage or CLOUD_DUMP_STORAGE")
    return open_storage(args.storage, storage_options(args))


def layout_of(args: argparse.Namespace) -> Layout:
    """The key layout; refuses a WAL prefix (flag or environment) given with a cluster."""
    # `backup` and `list` have no --wal-prefix flag: the environment sets it for the flat layout.
    prefix = getattr(args, "wal_prefix", None) or os.environ.get("CLOUD_DUMP_WAL_PREFIX")
    return Layout(cluster=args.cluster, wal_prefix=prefix or DEFAULT_WAL_PREFIX)


def read_passphrase(args: argparse.Namespace) -> str | None:
    """From --passphrase-file, CLOUD_DUMP_PASSPHRASE or --passphrase (warned: ps shows it)."""
    if args.passphrase_file:
        try:
            text = Path(args.passphrase_file).read_text()
        except OSError as exc:
            raise ConfigError(
                f"cannot read passphrase file '{args.passphrase_file}': {exc.strerror}"
            ) from exc
        passphrase = text.splitlines()[0] if text else ""
    elif args.passphrase:
        if args.passphrase_from_flag:
            log.warning("--passphrase is visible to every user in 'ps': prefer "
                        "--passphrase-file or CLOUD_DUMP_PASSPHRASE")
        passphrase = args.passphrase
    else:
        return None
    if not passphrase:
        raise ConfigError("the passphrase is empty")
    return str(passphrase)


def run_backup(args: argparse.Namespace, report: Report) -> None:
    from coordinator.backup import BackupPlan, run_backup

    name = validate_name("backup", args.name or "")
    layout_of(args).backup_prefix(name)  # rejects names reserved by the layout
    if not args.db_url:
        raise ConfigError("no database given: use --db-url or CLOUD_DUMP_DB_URL")
    if args.db_url != os.environ.get("CLOUD_DUMP_DB_URL") and _has_password(args.db_url):
        log.warning("the password in --db-url is visible to every user in 'ps': prefer "
                    "PGPASSWORD, a .pgpass file or CLOUD_DUMP_DB_URL")
    plan = BackupPlan(
        name=name,
        cluster=args.cluster,
        dsn=args.db_url,
        compression=args.compression,
        compression_level=args.compression_level,
        encryption=_backup_encryption(args),
        # `backup` has no --wal-prefix flag: the environment sets it for the flat layout.
        wal_prefix=getattr(args, "wal_prefix", None) or os.environ.get("CLOUD_DUMP_WAL_PREFIX"),
        max_in_flight=max(2, args.parallel * 2),
        part_timeout_s=args.part_timeout,
        target_part_bytes=args.part_size_mib * 1024 * 1024,
        show_progress=args.progress,
    )
    runner, capabilities = _runner(args)
    try:
        manifest = run_backup(plan, runner, capabilities)
    finally:
        runner.close()
    report(f"backup '{manifest.name}' complete: {len(manifest.archives)} archive(s), "
           f"{manifest.stored_size} bytes stored, WAL {manifest.start_wal_file} .. "
           f"{manifest.end_wal_file}")


def _has_password(dsn: str) -> bool:
    if "://" in dsn:
        try:
            return urlsplit(dsn).password is not None
        except ValueError:
            return False
    return "password=" in dsn


def _backup_encryption(args: argparse.Namespace) -> Encryption | None:
    from coordinator.backup import Encryption
    from coordinator.crypto import read_recipients

    passphrase = read_passphrase(args)
    keys = [Path(p) for p in args.recipient_key or []]
    if keys and passphrase:
        raise ConfigError("give either --recipient-key or a passphrase, not both")
    if keys:
        return Encryption(read_recipients(keys))
    if passphrase:
        return Encryption.with_passphrase(passphrase)
    if args.encrypt:
        raise ConfigError("--encrypt needs --recipient-key FILE or --passphrase-file FILE")
    return None


def _runner(args: argparse.Namespace) -> tuple[Runner, Capabilities]:
    """Celery workers when a broker is given, else threads of this process."""
    if args.broker:
        from coordinator.dispatch import open_broker
        from coordinator.runners import CeleryRunner

        # The workers hold the storage; told one, this backup must land there (every task
        # carries it, and a worker storing elsewhere refuses: exit 3).
        location = storage_url(args.storage) if args.storage else None
        broker = open_broker(args.broker, args.result_backend, args.staging_url)
        # The store's limits come from the flags.
        capabilities = Capabilities(
            S3_MIN_PART_SIZE_BYTES, S3_MAX_PART_SIZE_BYTES, args.s3_max_parts
        )
        runner = CeleryRunner(
            broker, task_timeout_s=args.task_timeout, part_timeout_s=args.part_timeout,
            storage_url=location,
        )  # fmt: skip
        return runner, capabilities
    from coordinator.runners import EmbeddedRunner

    storage = open_store(args)
    return EmbeddedRunner(storage, args.parallel), storage.capabilities


def run_restore(args: argparse.Namespace, report: Report) -> None:
    from coordinator.ownership import resolve_owner
    from coordinator.recovery import check_restore_config, target_from_args, wal_fetch_command
    from coordinator.restore import restore_backup
    from coordinator.restoresettings import RestoreSettings, SettingsRequest

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
    from coordinator.listing import find_backups
    from coordinator.reachability import check_reachable
    from coordinator.restore import read_manifest
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
    from coordinator.restoretargets import plan_targets

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
    """``target`` pinned to the timeline ``coordinator.timelines`` chooses from the archive's
    history files (refusing an ambiguous or impossible one, exit 3)."""
    from dataclasses import replace

    from coordinator.archiving import archive_url
    from coordinator.timelines import ArchivedTimelines, choose_timeline
    from coordinator.walprefetch import WalArchive, keys_from
    from coordinator.walrange import segment_size_of

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
    from coordinator.archiving import archive_url
    from coordinator.restorereport import restore_report

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


def run_list(args: argparse.Namespace, report: Report) -> None:
    from coordinator.listing import find_backups, print_json, print_table
    from coordinator.walrange import archived_segment_names, wal_range

    # `list` has no --wal-prefix flag of its own: the environment sets it for the flat layout.
    wal_prefix = getattr(args, "wal_prefix", None) or os.environ.get("CLOUD_DUMP_WAL_PREFIX")
    layout = Layout(cluster=args.cluster, wal_prefix=wal_prefix or DEFAULT_WAL_PREFIX)
    storage = open_store(args)
    try:
        manifests = find_backups(storage, layout)
        archived = archived_segment_names(storage, layout) if manifests else set()
    finally:
        storage.close()
    ranges = {m.name: wal_range(m, archived) for m in manifests}
    if args.json:
        print_json(manifests, report, ranges)
    else:
        print_table(manifests, layout, report, ranges, storage.url)


def run_check(args: argparse.Namespace, report: Report) -> None:
    from coordinator.check import check_storage, check_workers

    if not args.storage and not args.broker:
        raise ConfigError("nothing to check: give --storage, --broker or both")
    if args.storage:
        storage = open_store(args)
        try:
            check_storage(storage, report)
        finally:
            storage.close()
    if args.broker:
        location = storage_url(args.storage) if args.storage else None
        check_workers(args.broker, args.result_backend, args.timeout, report, location)

