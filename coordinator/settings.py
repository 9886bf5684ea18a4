"""Settings shared by the commands: storage, key layout, passphrase and decryption keys.

Each function reads the parsed command line (flags already merged with environment and config
file by ``coordinator.cli.main``) and returns the object a command works with.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.walarchive import IdentityCache, Keys
from storage.base import Storage
from storage.errors import ConfigError
from storage.factory import open_storage
from storage.layout import DEFAULT_WAL_PREFIX, Layout
from storage.options import StorageOptions

if TYPE_CHECKING:
    from storage.base import Storage


log = logging.getLogger(__name__)

# What a command reports to the operator: one line at a time, on stdout.
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



def wal_layout(args: argparse.Namespace) -> Layout:
    return Layout(cluster=args.cluster, wal_prefix=args.wal_prefix or DEFAULT_WAL_PREFIX)


def keys_from(args: argparse.Namespace, spool: IdentityCache | None) -> Keys:
    return Keys([Path(p) for p in args.identity_key or []], lambda: read_passphrase(args), spool)
