"""``cloud-dump backup``: settings from the command line into a run of ``backup.run``, with the
runner (embedded or Celery workers) chosen and checked before anything is claimed."""

from __future__ import annotations

import logging

from coordinator import pgconn
from coordinator.settings import BackupSettings, Report, encryption_of, layout_of
from options.declared import number_from_env
from storage.errors import ConfigError
from storage.layout import LATEST_NAME, validate_name

log = logging.getLogger(__name__)


def run_backup(args: BackupSettings, report: Report) -> None:
    from coordinator.backup.run import BackupKeys, BackupPlan, run_backup

    if not args.name:
        raise ConfigError("no backup name given: use --name or CLOUD_DUMP_BACKUP_NAME")
    name = validate_name("backup", args.name)
    if name.lower() == LATEST_NAME:  # any case: LATEST next to latest invites a mix-up
        raise ConfigError(f"backup name '{name}' is reserved: 'restore --name {name}' means the "
                          "newest backup")
    layout_of(args).backup_prefix(name)  # rejects names reserved by the layout
    if not args.db_url:
        raise ConfigError("no database given: use --db-url or CLOUD_DUMP_DB_URL")
    if not args.db_url_from_environment and pgconn.has_password(args.db_url):
        log.warning("the password in --db-url is visible to every user in 'ps': prefer "
                    "PGPASSWORD, a .pgpass file or CLOUD_DUMP_DB_URL")
    chosen = encryption_of(args)  # may read a passphrase file: a ConfigError before any work
    plan = BackupPlan(
        name=name,
        cluster=args.cluster,
        dsn=args.db_url,
        compression=args.compression,
        compression_level=args.compression_level,
        encryption=None if chosen is None else BackupKeys.of(chosen),
        # `backup` has no --wal-prefix flag: CLOUD_DUMP_WAL_PREFIX sets it (cli.settings).
        wal_prefix=args.wal_prefix,
        max_in_flight=args.parallel,
        part_timeout_s=args.part_timeout,
        target_part_bytes=args.part_size_mib * 1024 * 1024,
        show_progress=args.progress,
        heartbeat_every_s=float(number_from_env("CLOUD_DUMP_HEARTBEAT_S")),
        allow_unchecked_tablespaces=args.allow_unchecked_tablespaces,
    )
    from coordinator.backup.work import open_work

    work, capabilities = open_work(args)
    try:
        manifest = run_backup(plan, work, capabilities)
    finally:
        work.close()
    report(f"backup '{manifest.name}' complete: {len(manifest.archives)} archive(s), "
           f"{manifest.stored_size} bytes stored, WAL {manifest.start_wal_file} .. "
           f"{manifest.end_wal_file}")
