"""Recovery settings for point-in-time restore (DESIGN.md §6): what PostgreSQL needs to replay WAL
from the archive up to a target, then promote.

``coordinator.restore.recoveryconf`` appends them to ``PGDATA/postgresql.auto.conf`` (PostgreSQL's
own format, ``key = 'value'``; the last occurrence of a setting wins), in a block marked as
cloud-dump's (``coordinator.restore.autoconf``), after disabling what earlier restores left there:

- ``restore_command = '<cloud-dump> wal-fetch %f %p --config <restore config>'``;
- the target: one of ``recovery_target_time/lsn/xid/name`` or ``recovery_target = 'immediate'``
  (none for "latest": replay everything archived), its value normalised to a spelling
  PostgreSQL accepts (``coordinator.restore.targets``). The other target settings are written first
  as ``''``, which unsets them, so that a target set in postgresql.conf cannot combine with ours
  ("multiple recovery targets specified");
- ``recovery_target_inclusive``, ``recovery_target_timeline`` when given, and
  ``recovery_target_action = 'promote'``;

then creates ``recovery.signal``.

No secret goes into postgresql.auto.conf (anyone with ``pg_read_all_settings`` reads it, and it
travels in every base backup). restore_command names a *restore config file* instead: KEY=VALUE
lines (read by ``cloud-dump --config``) with the storage location, the WAL prefix, the key file
or passphrase, and the AWS credentials of the restore's own environment, since the server has no
other way to get them. The file is created with mode 0600, by default beside PGDATA (not inside
it, so that a later base backup of the restored cluster does not carry it to storage) and named
after it (``<PGDATA's name>.cloud-dump-restore.conf``: sibling copies each have their own), and
must be owned by the server's OS user (restore run as root gives it to the data directory's
owner). Its first lines record which PGDATA it serves: restore never replaces a restore config
file that serves another PGDATA, or one that does not say (``check_restore_config``,
``TargetNotEmpty``, exit 13, before anything is downloaded, and again just before writing), since
that copy's restore_command would then read this restore's storage and keys; re-restoring into
the same PGDATA replaces its own.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from coordinator.fsutil import write_atomically
from coordinator.restore.targets import (
    check_restore_point_name,
    format_lsn,
    normalize_timeline,
    normalize_xid,
    parse_lsn,
    parse_target_time,
)
from storage.errors import ConfigError, TargetNotEmpty

# The default restore config of PGDATA ``.../NAME`` is ``.../NAME.cloud-dump-restore.conf``;
# versions before it used this name alone, one per parent directory.
RESTORE_CONFIG_NAME = "cloud-dump-restore.conf"
_CONFIG_HEADER = ("# cloud-dump settings for restore_command (wal-fetch); mode 0600, may hold "
                  "secrets")
_SERVES = "# serves PGDATA: "
TARGET_SETTINGS = (
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
)
# Copied into the restore config only when the restore itself had them: boto3's standard chain
# reads them, and the server's environment is usually bare.
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CA_BUNDLE",
)


@dataclass(frozen=True)
class RecoveryTarget:
    """Where recovery stops. ``setting`` None: at the end of the archived WAL ("latest").

    ``value`` and ``timeline`` are normalised (``coordinator.restore.targets``); ``instant`` (time)
    and ``lsn`` are what reachability is judged on.
    """

    setting: str | None = None
    value: str | None = None
    timeline: str | None = None
    inclusive: bool = True
    instant: datetime | None = None
    lsn: int | None = None
    followed: str | None = None  # the timeline recovery follows (coordinator.restore.timelines)

    def settings(self) -> dict[str, str]:
        """The recovery settings, in the order they are written."""
        # The unset ones first: PostgreSQL rejects assigning any target setting, even '', once
        # another one is set ("multiple recovery targets specified").
        out = {name: "" for name in TARGET_SETTINGS if name != self.setting}
        if self.setting is not None:
            out[self.setting] = self.value or ""
        if self.setting in ("recovery_target_time", "recovery_target_lsn", "recovery_target_xid"):
            out["recovery_target_inclusive"] = "on" if self.inclusive else "off"
        if self.timeline is not None:
            out["recovery_target_timeline"] = self.timeline
        out["recovery_target_action"] = "promote"
        return out

    def describe(self) -> str:
        """Where recovery stops, as a phrase."""
        if self.setting is None:
            stop = "the end of the archived WAL"
        elif self.setting == "recovery_target":
            stop = "the backup's consistency point (recovery_target = 'immediate')"
        else:
            edge = "" if self.inclusive or self.setting == "recovery_target_name" else ", exclusive"
            stop = f"{self.setting} = '{self.value}'{edge}"
        if self.followed is not None:
            stop += f" on {self.followed}"
        elif self.timeline is not None:
            stop += f" on timeline {self.timeline}"
        return stop


def target_from_args(args: argparse.Namespace) -> RecoveryTarget | None:
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
    return _normalized(target) if setting is not None and value is not None else target


def _normalized(target: RecoveryTarget) -> RecoveryTarget:
    value = target.value or ""
    if target.setting == "recovery_target_time":
        time = parse_target_time(value)
        return replace(target, value=time.text, instant=time.instant)
    if target.setting == "recovery_target_lsn":
        lsn = parse_lsn(value)
        return replace(target, value=format_lsn(lsn), lsn=lsn)
    if target.setting == "recovery_target_xid":
        return replace(target, value=normalize_xid(value))
    if target.setting == "recovery_target_name":
        return replace(target, value=check_restore_point_name(value))
    return target


@dataclass(frozen=True)
class WalFetchCommand:
    """How the recovering server runs wal-fetch: the executable and its restore config file."""

    executable: Path
    config_path: Path
    settings: Mapping[str, str]
    pgdata: Path | None = None  # the data directory the restore config file serves

    def restore_command(self) -> str:
        # PostgreSQL expands %f/%p/%r in restore_command; a literal % in a path must be %%.
        executable, config = (
            shlex.quote(str(path)).replace("%", "%%")
            for path in (self.executable, self.config_path)
        )
        return f"{executable} wal-fetch %f %p --config {config}"


def wal_fetch_command(
    args: argparse.Namespace, pgdata: Path, environ: Mapping[str, str]
) -> WalFetchCommand:
    """The wal-fetch invocation and settings for a restore run with ``args``.

    ``CLOUD_DUMP_EXECUTABLE`` overrides the path of the command the server runs, for hosts where
    the server's user reaches cloud-dump by another path than the one running restore.
    """
    settings: dict[str, str] = {"CLOUD_DUMP_STORAGE": args.storage}
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
    executable = environ.get("CLOUD_DUMP_EXECUTABLE") or _own_executable()
    return WalFetchCommand(Path(executable).absolute(), _absolute(config), settings,
                           _absolute(pgdata))


def default_restore_config(pgdata: Path) -> Path:
    """``<PGDATA's parent>/<PGDATA's name>.cloud-dump-restore.conf``: one per copy."""
    path = _absolute(pgdata)
    return path.parent / f"{path.name}.{RESTORE_CONFIG_NAME}"


def is_restore_config_name(name: str) -> bool:
    """Whether ``name`` is the name restore gives a restore config file by default (this
    version's, ``<PGDATA's name>.cloud-dump-restore.conf``, or earlier versions')."""
    return name == RESTORE_CONFIG_NAME or name.endswith("." + RESTORE_CONFIG_NAME)


def _absolute(path: Path) -> Path:
    return Path(os.path.normpath(path.absolute()))  # ".." resolved, symbolic links kept


def check_restore_config(command: WalFetchCommand) -> None:
    """Refuse (``TargetNotEmpty``) to replace a restore config file serving another PGDATA.

    A file that records this PGDATA is this copy's own, from an earlier restore into it: it may
    be replaced. One that records another PGDATA, or none (written by an earlier version, or
    not a restore config file at all), is another copy's restore_command's, or unknown.
    """
    path, pgdata = command.config_path, command.pgdata
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TargetNotEmpty(f"restore config '{path}' exists and cannot be read "
                             f"({exc.strerror}): restore does not replace it") from exc
    served = served_pgdata(text)
    if served is not None and pgdata is not None and _same_path(served, pgdata):
        return
    whose = (f"serves PGDATA '{served}'" if served is not None
             else "does not say which PGDATA it serves (an earlier version's, or not a restore "
                  "config file)")
    raise TargetNotEmpty(
        f"restore config '{path}' exists and {whose}: replacing it would point that copy's "
        "restore_command at this restore's storage and keys; choose another file with "
        "--restore-config, or remove it if no copy uses it")


def served_pgdata(text: str) -> Path | None:
    """The PGDATA a restore config file records it serves, if it does."""
    for line in text.splitlines():
        if line.startswith(_SERVES):
            return Path(line[len(_SERVES):])
    return None


def _same_path(one: Path, other: Path) -> bool:
    return one == other or one.resolve() == other.resolve()


def _own_executable() -> str:
    """The cloud-dump console script running now: the server runs the same installation."""
    script = Path(sys.argv[0])
    if script.name == "cloud-dump" and script.is_file():
        return str(script)
    beside = Path(sys.executable).parent / "cloud-dump"  # the venv's bin, symlinks unresolved
    if beside.is_file():
        return str(beside)
    raise ConfigError("cannot tell where the cloud-dump command is installed: set "
                      "CLOUD_DUMP_EXECUTABLE to the path the server should run")


def write_restore_config(command: WalFetchCommand) -> None:
    """Write the file restore_command reads, replaced atomically, mode 0600 from its creation.

    Checked again just before: another restore may have written it since the first check.
    """
    check_restore_config(command)
    write_atomically(command.config_path, _config_text(command.settings, command.pgdata).encode())


def _config_text(settings: Mapping[str, str], pgdata: Path | None) -> str:
    lines = [_CONFIG_HEADER]
    if pgdata is not None:
        if "\n" in str(pgdata) or "\r" in str(pgdata):
            raise ConfigError(f"PGDATA {str(pgdata)!r} spans lines: it cannot be recorded in "
                              "the restore config file")
        lines.append(f"{_SERVES}{pgdata}")
    for key, value in settings.items():
        if "\n" in value or "\r" in value:
            raise ConfigError(f"the value of {key} spans lines: it cannot go into a config file")
        # cloud-dump --config strips one pair of surrounding quotes and unescapes nothing.
        lines.append(f'{key}="{value}"')
    return "\n".join(lines) + "\n"
