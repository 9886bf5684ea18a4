"""The parsed command line into the command's typed settings: the one place below ``main``
that reads an ``argparse.Namespace``, and the last that reads a declared variable from the
environment (the ones with no flag: ``CLOUD_DUMP_PASSPHRASE``, ``CLOUD_DUMP_WAL_PASSPHRASE``, and
``CLOUD_DUMP_WAL_PREFIX`` for ``backup`` and ``list``)."""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, fields

from coordinator.cli.seed import resolve_storj
from coordinator.settings import (
    BackupSettings,
    CheckSettings,
    CleanupSettings,
    CommonSettings,
    DeleteSettings,
    ExpireSettings,
    InfoSettings,
    KeepSettings,
    ListSettings,
    RestoreSettings,
    VerifySettings,
    WalFetchSettings,
    WalPushSettings,
)

SETTINGS: dict[str, type[CommonSettings]] = {
    "backup": BackupSettings,
    "restore": RestoreSettings,
    "list": ListSettings,
    "verify": VerifySettings,
    "info": InfoSettings,
    "cleanup": CleanupSettings,
    "expire": ExpireSettings,
    "delete": DeleteSettings,
    "keep": KeepSettings,
    "check": CheckSettings,
    "wal-push": WalPushSettings,
    "wal-fetch": WalFetchSettings,
}


def settings_of(args: argparse.Namespace) -> CommonSettings:
    """``args`` (flags merged with the config file and environment by the parser) as the
    settings of ``args.command``."""
    cls = SETTINGS[args.command]
    values: dict[str, object] = {}
    for f in fields(cls):
        value = getattr(args, f.name, MISSING)
        if value is MISSING:
            continue  # not a flag of this command: the class's default, or set below
        values[f.name] = tuple(value) if isinstance(value, list) else value
    names = {f.name for f in fields(cls)}
    if "passphrase" in names:
        # Read here rather than as the flag's default, so that only a passphrase typed on the
        # command line (visible in ps) gets the warning.
        values["passphrase_from_flag"] = args.passphrase is not None
        values["passphrase"] = args.passphrase or os.environ.get("CLOUD_DUMP_PASSPHRASE") or None
    if "wal_passphrase" in names:  # restore's, for the WAL archive: as the passphrase
        values["wal_passphrase_from_flag"] = args.wal_passphrase is not None
        values["wal_passphrase"] = (args.wal_passphrase
                                    or os.environ.get("CLOUD_DUMP_WAL_PASSPHRASE") or None)
    if "db_url_from_environment" in names:
        # Whether the database URL is CLOUD_DUMP_DB_URL's (or the config file's, which sets
        # it): only one typed on the command line shows in ps, and gets the warning.
        values["db_url_from_environment"] = (
            args.db_url is not None and args.db_url == os.environ.get("CLOUD_DUMP_DB_URL"))
    if "wal_prefix" in names and "wal_prefix" not in values:
        values["wal_prefix"] = os.environ.get("CLOUD_DUMP_WAL_PREFIX") or None
    for key in ("recipient_key", "identity_key", "wal_identity_key", "tablespace_mapping"):
        if key in names and values.get(key) is None:
            values[key] = ()
    resolve_storj(values, args.command)  # --storage storj: the gateway's s3:// location
    return cls(**values)  # type: ignore[arg-type]
