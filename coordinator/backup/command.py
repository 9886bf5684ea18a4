"""``cloud-dump backup``: settings from the command line into a run of ``backup.run``, with the
runner (embedded or Celery workers) chosen and checked before anything is claimed."""

from __future__ import annotations

import contextlib
import importlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from coordinator.settings import BackupSettings, Report, encryption_of, layout_of
from options.declared import number_from_env
from storage.errors import ConfigError
from storage.layout import LATEST_NAME, validate_name

if TYPE_CHECKING:
    from coordinator.backup.run import BackupPlan
    from coordinator.backup.work import BackupWork
    from coordinator.settings import Encryption
    from storage.base import Capabilities

log = logging.getLogger(__name__)


def run_backup(args: BackupSettings, report: Report) -> None:
    if not args.name:
        raise ConfigError("no backup name given: use --name or CLOUD_DUMP_BACKUP_NAME")
    name = validate_name("backup", args.name)
    if name.lower() == LATEST_NAME:  # any case: LATEST next to latest invites a mix-up
        raise ConfigError(f"backup name '{name}' is reserved: 'restore --name {name}' means the "
                          "newest backup")
    layout_of(args).backup_prefix(name)  # rejects names reserved by the layout
    db_url = args.db_url
    if not db_url:
        raise ConfigError("no database given: use --db-url or CLOUD_DUMP_DB_URL")
    chosen = encryption_of(args)  # may read a passphrase file: a ConfigError before any work
    # The runner is opened on a thread while this one imports the backup's code (psycopg, the
    # pipeline) and makes its keys: connecting to a broker is round trips (six with the broker
    # 50 ms away), a passphrase's scrypt 1.7 s. What both sides import is imported first, so
    # that the two threads never import one package at the same time.
    for shared in ("workers.backup", "workers.location", "ssl", "subprocess"):
        importlib.import_module(shared)
    from coordinator.backup.work import new_claim, open_work
    from workers.backup import BackupRef

    # The claim goes out as soon as the runner is open, unless a passphrase must first be
    # checked against the WAL archive's key (backup.run.check_wal_archive_passphrase).
    heartbeat_every_s = float(number_from_env("CLOUD_DUMP_HEARTBEAT_S"))
    claiming = new_claim(BackupRef(name=name, cluster=args.cluster), heartbeat_every_s,
                         args.s3_max_parts)  # fmt: skip
    send_ahead = chosen is None or chosen.passphrase is None

    def open_and_claim() -> tuple[BackupWork, Capabilities]:
        work, capabilities = open_work(args)
        if send_ahead:
            try:
                work.send_claim(claiming)
            except BaseException:
                work.close()
                raise
        return work, capabilities

    with ThreadPoolExecutor(1, thread_name_prefix="open-work") as pool:
        opening = pool.submit(open_and_claim)
        try:
            from coordinator import pgconn

            if not args.db_url_from_environment and pgconn.has_password(db_url):
                log.warning("the password in --db-url is visible to every user in 'ps': "
                            "prefer PGPASSWORD, a .pgpass file or CLOUD_DUMP_DB_URL")
            plan = _plan(args, name, db_url, chosen, heartbeat_every_s)
            work, capabilities = opening.result()
        except BaseException:
            with contextlib.suppress(BaseException):  # the runner's own error is raised above
                _withdraw(opening.result()[0])
            raise

    from coordinator.backup.run import run_backup as run

    try:
        manifest = run(plan, work, capabilities, claiming)
    finally:
        work.close()
    report(f"backup '{manifest.name}' complete: {len(manifest.archives)} archive(s), "
           f"{manifest.stored_size} bytes stored, WAL {manifest.start_wal_file} .. "
           f"{manifest.end_wal_file}")


def _withdraw(work: BackupWork) -> None:
    try:
        work.withdraw_claim()
    finally:
        work.close()


def _plan(
    args: BackupSettings, name: str, dsn: str, chosen: Encryption | None, heartbeat_every_s: float
) -> BackupPlan:
    from coordinator.backup.run import BackupKeys, BackupPlan

    return BackupPlan(
        name=name,
        cluster=args.cluster,
        dsn=dsn,
        compression=args.compression,
        compression_level=args.compression_level,
        encryption=None if chosen is None else BackupKeys.of(chosen),
        # `backup` has no --wal-prefix flag: CLOUD_DUMP_WAL_PREFIX sets it (cli.settings).
        wal_prefix=args.wal_prefix,
        max_in_flight=args.parallel,
        part_timeout_s=args.part_timeout,
        target_part_bytes=args.part_size_mib * 1024 * 1024,
        show_progress=args.progress,
        heartbeat_every_s=heartbeat_every_s,
        allow_unchecked_tablespaces=args.allow_unchecked_tablespaces,
    )
