"""Settings shared by the commands: storage, key layout, passphrase, encryption and decryption keys.

Each function reads the parsed command line (flags already merged with environment and config
file by ``coordinator.cli.main``) and returns the object a command works with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from coordinator.walarchive import IdentityCache, Keys
from storage.base import S3_MAX_PART_COUNT, Storage
from storage.errors import ConfigError
from storage.factory import open_storage
from storage.layout import DEFAULT_WAL_PREFIX, Layout
from storage.options import StorageOptions

if TYPE_CHECKING:
    from storage.base import S3_MAX_PART_COUNT, Storage


log = logging.getLogger(__name__)

# What a command reports to the operator: one line at a time, on stdout.
Report = Callable[[str], None]


# --- each command's settings, typed ----------------------------------------------------------
# Built once, at the edge, from the parsed command line (``coordinator.cli.settings``); below
# the CLI nothing reads argparse or the environment for a setting the table declares. Field
# names are the options' ``dest`` in ``options.declared`` (tests/test_options.py holds each
# class to its command's rows). Frozen: a helper gets a copy as JSON on stdin, never argv.


@dataclass(frozen=True, kw_only=True)
class CommonSettings:
    """Where the store and the broker are, and logging: every command's."""

    command: str
    storage: str | None = None
    s3_endpoint: str | None = None
    s3_region: str | None = None
    s3_path_style: bool | None = None
    s3_max_parts: int = S3_MAX_PART_COUNT
    storage_max_attempts: int = 5
    broker: str | None = None
    result_backend: str | None = None
    staging_url: str | None = None
    cluster: str | None = None
    config: str | None = None
    log_level: str = "info"
    # The seed's Storj settings: the CLI resolves storage 'storj' to s3://<storj_bucket> at the
    # gateway (coordinator.cli.seed); the native credentials are only checked, never used.
    storj_bucket: str | None = None
    storj_access: str | None = field(default=None, repr=False)
    storj_api_key: str | None = field(default=None, repr=False)
    storj_satellite: str | None = None
    storj_passphrase: str | None = field(default=None, repr=False)


@dataclass(frozen=True, kw_only=True)
class KeyedSettings(CommonSettings):
    """A command that encrypts or decrypts: the passphrase's sources. ``passphrase`` is the
    flag's or else ``CLOUD_DUMP_PASSPHRASE``; ``passphrase_from_flag`` says it was typed on
    the command line (visible in ps: warned about once)."""

    passphrase_file: str | None = None
    passphrase: str | None = field(default=None, repr=False)
    passphrase_from_flag: bool = False


@dataclass(frozen=True, kw_only=True)
class BackupSettings(KeyedSettings):
    name: str | None = None
    db_url: str | None = field(default=None, repr=False)
    db_url_from_environment: bool = False
    compression: str = "zstd"
    compression_level: int | None = None
    encrypt: bool = False
    recipient_key: tuple[str, ...] = ()
    parallel: int = 4
    part_size_mib: int = 8
    part_timeout: float = 300.0
    task_timeout: float = 600.0
    progress: bool = True
    allow_unchecked_tablespaces: bool = False
    wal_prefix: str | None = None  # CLOUD_DUMP_WAL_PREFIX: backup has no flag for it


@dataclass(frozen=True, kw_only=True)
class RestoreSettings(KeyedSettings):
    name: str | None = None
    pgdata: str | None = None
    identity_key: tuple[str, ...] = ()
    tablespace_mapping: tuple[str, ...] = ()
    parallel: int = 4
    owner: str | None = None
    recovery_target_time: str | None = None
    recovery_target_lsn: str | None = None
    recovery_target_xid: str | None = None
    recovery_target_name: str | None = None
    recovery_target: str | None = None
    recovery_target_timeline: str | None = None
    recovery_target_exclusive: bool = False
    restore_config: str | None = None
    archive_mode: str = "preserve"
    wal_prefix: str | None = None
    spool_dir: str | None = None
    # The WAL archive's keys, where not the backup's; ``wal_passphrase`` is the flag's or else
    # CLOUD_DUMP_WAL_PASSPHRASE, as ``passphrase``.
    wal_identity_key: tuple[str, ...] = ()
    wal_passphrase_file: str | None = None
    wal_passphrase: str | None = field(default=None, repr=False)
    wal_passphrase_from_flag: bool = False


@dataclass(frozen=True, kw_only=True)
class ListSettings(CommonSettings):
    json: bool = False
    parallel: int = 4  # the seed's flag: accepted, unused
    wal_prefix: str | None = None  # CLOUD_DUMP_WAL_PREFIX: list has no flag for it


@dataclass(frozen=True, kw_only=True)
class VerifySettings(KeyedSettings):
    name: str | None = None  # None: every backup
    all: bool = False
    json: bool = False
    parallel: int = 4
    deep: bool = False
    identity_key: tuple[str, ...] = ()
    wal_prefix: str | None = None  # CLOUD_DUMP_WAL_PREFIX: verify has no flag for it


@dataclass(frozen=True, kw_only=True)
class CleanupSettings(CommonSettings):
    older_than: str = "24h"
    dry_run: bool = False
    wal_prefix: str | None = None  # CLOUD_DUMP_WAL_PREFIX: skipped in the flat layout


@dataclass(frozen=True, kw_only=True)
class ExpireSettings(CommonSettings):
    retain: int | None = None
    recovery_window: str | None = None
    dry_run: bool = False
    wal_prefix: str | None = None  # CLOUD_DUMP_WAL_PREFIX: expire has no flag for it


@dataclass(frozen=True, kw_only=True)
class DeleteSettings(CommonSettings):
    name: str | None = None
    dry_run: bool = False
    wal_prefix: str | None = None


@dataclass(frozen=True, kw_only=True)
class KeepSettings(CommonSettings):
    name: str
    until: str | None = None
    forever: bool = False
    release: bool = False
    wal_prefix: str | None = None


@dataclass(frozen=True, kw_only=True)
class InfoSettings(KeyedSettings):
    json: bool = False
    prometheus: bool = False
    identity_key: tuple[str, ...] = ()  # the newest WAL is read: decrypted when encrypted
    wal_prefix: str | None = None


@dataclass(frozen=True, kw_only=True)
class CheckSettings(CommonSettings):
    timeout: float = 60.0
    db_url: str | None = field(default=None, repr=False)
    db_url_from_environment: bool = False
    wal_prefix: str | None = None


@dataclass(frozen=True, kw_only=True)
class WalPushSettings(KeyedSettings):
    path: str
    file_name: str
    compression: str = "zstd"
    encrypt: bool = False
    recipient_key: tuple[str, ...] = ()
    look_ahead: int = 8
    timeout: float = 60.0
    wal_prefix: str | None = None
    spool_dir: str | None = None
    parallel: int = 4  # the seed's flag: accepted, unused


@dataclass(frozen=True, kw_only=True)
class WalFetchSettings(KeyedSettings):
    file_name: str
    path: str
    identity_key: tuple[str, ...] = ()
    prefetch: int = 8
    allow_partial: bool = False
    wal_prefix: str | None = None
    spool_dir: str | None = None
    parallel: int = 4  # the seed's flag: accepted, unused


_S = TypeVar("_S", bound=CommonSettings)


def settings_to_json(settings: CommonSettings) -> dict[str, object]:
    """``settings`` as JSON-safe values, for a detached helper's stdin (never its argv: the
    passphrase would show in ps)."""
    return {f.name: getattr(settings, f.name) for f in fields(settings)}


def settings_from_json(cls: type[_S], data: dict[str, object]) -> _S:
    """The settings a helper was given, as ``settings_to_json`` wrote them; unknown keys (a
    helper started by another version) are ignored."""
    known = {f.name for f in fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
    return cls(**values)  # type: ignore[arg-type]


def storage_url_of(args: CommonSettings) -> str:
    """The storage URL; ``ConfigError`` when none was given."""
    if not args.storage:
        raise ConfigError("no storage given: use --storage or CLOUD_DUMP_STORAGE")
    return args.storage


def open_store(args: CommonSettings) -> Storage:
    """The store ``args`` names, opened; ``ConfigError`` when none was given."""
    return open_storage(storage_url_of(args), StorageOptions.from_settings(args))


def layout_of(
    args: BackupSettings | RestoreSettings | ListSettings | VerifySettings | CleanupSettings
    | ExpireSettings | DeleteSettings | KeepSettings | WalPushSettings | WalFetchSettings
    | CheckSettings | InfoSettings,
) -> Layout:
    """The key layout; refuses a WAL prefix (flag or environment) given with a cluster."""
    return Layout(cluster=args.cluster, wal_prefix=args.wal_prefix or DEFAULT_WAL_PREFIX)


def read_passphrase(args: KeyedSettings) -> str | None:
    """From --passphrase-file, CLOUD_DUMP_PASSPHRASE or --passphrase (warned: ps shows it)."""
    if args.passphrase_file:
        from coordinator.crypto import read_passphrase_file  # pyrage: only when a key is used

        passphrase = read_passphrase_file(args.passphrase_file)
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


@dataclass(frozen=True)
class Encryption:
    """What the operator chose to encrypt to: age public keys read from ``--recipient-key``
    files, or a passphrase. Each command turns it into keys its own way: a backup encrypts to a
    fresh identity of its own, wrapped with the passphrase (``coordinator.backup.run``); WAL to
    the archive's identity, set up once per archive (``coordinator.wal.push.encode``)."""

    recipients: list[str] | None = None
    passphrase: str | None = field(default=None, repr=False)


def encryption_of(args: BackupSettings | WalPushSettings) -> Encryption | None:
    """The encryption ``args`` ask for, None for none; ``ConfigError`` for both a recipient key
    and a passphrase, or ``--encrypt`` with neither."""
    passphrase = read_passphrase(args)
    if args.recipient_key and passphrase:
        raise ConfigError("give either --recipient-key or a passphrase, not both")
    if args.recipient_key:
        from coordinator.crypto import read_recipients  # pyrage: only when keys are given

        return Encryption(recipients=read_recipients([Path(p) for p in args.recipient_key]))
    if passphrase:
        return Encryption(passphrase=passphrase)
    if args.encrypt:
        raise ConfigError("--encrypt needs --recipient-key FILE or --passphrase-file FILE")
    return None


def keys_from(
    args: RestoreSettings | WalFetchSettings | VerifySettings | InfoSettings,
    spool: IdentityCache | None,
) -> Keys:
    return Keys([Path(p) for p in args.identity_key or []], lambda: read_passphrase(args), spool)
