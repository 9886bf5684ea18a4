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

import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from coordinator.restore.targets import (
    check_restore_point_name,
    format_lsn,
    normalize_xid,
    parse_lsn,
    parse_target_time,
)
from storage.errors import ConfigError, TargetNotEmpty
from storage.fsutil import write_atomically

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

    @property
    def sought_in_wal(self) -> bool:
        """Whether recovery must find this target in the WAL, and may not: every target but
        'immediate' (met at consistency) and latest (the end of the WAL, wherever it is).

        One the archived WAL ends before is FATAL "recovery ended before configured recovery
        target was reached", not a promotion at that end (PostgreSQL 13+: StartupXLOG,
        xlogrecovery.c since 15).
        """
        return self.setting not in (None, "recovery_target")

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


def normalized_target(target: RecoveryTarget) -> RecoveryTarget:
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


def own_executable() -> str:
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
