"""The recovery settings restore writes to ``postgresql.auto.conf``, and those earlier ones left.

Settings a restore appends stay in postgresql.auto.conf after promotion and travel in every later
backup of that cluster (DESIGN.md §8): a copy restored from such a backup would stop again at the
old target and promote, even when it was meant to be a standby. So every restore, plain or not,
first comments out:

- every line of a block an earlier cloud-dump restore wrote: the block this module writes
  (``BLOCK_BEGIN`` ... ``BLOCK_END``) and the one older versions wrote (``OLD_BLOCK_HEADER``
  followed by its setting lines);
- wherever it is, any recovery target setting (``recovery_target*``, as pgBackRest does): a
  target is for one recovery, and ``ALTER SYSTEM`` rewrites the file without comments, so a
  block's marker may be gone while its settings are not;
- a ``restore_command`` that runs ``cloud-dump wal-fetch`` with a restore config file of a
  default name (``[<PGDATA's name>.]cloud-dump-restore.conf``), for the same reason: left
  active, it would fetch through a config file of another restore, likely absent on this host,
  and stop recovery.

Each disabled line stays readable, prefixed with which restore disabled it and who wrote it.
Other recovery settings (an operator's ``restore_command``, ``primary_conninfo``,
``recovery_min_apply_delay``, ...) are kept: they are configuration, not a one-off, and the
restore reports those that change what it asked for (``foreign_recovery_settings``).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath

from coordinator.restore.pgconf import parse_line, quote
from coordinator.restore.restoreconfig import is_restore_config_name

OLD_BLOCK_HEADER = "# point-in-time recovery, written by cloud-dump restore"
BLOCK_BEGIN = "# BEGIN cloud-dump restore settings"
BLOCK_END = "# END cloud-dump restore settings"
DISABLED_PREFIX = "# disabled by cloud-dump restore"
_BEGIN_RE = re.compile(re.escape(BLOCK_BEGIN) + r" \((?P<origin>[^)]*)\)")
_WAL_FETCH_RE = re.compile(r"\swal-fetch\s+%f\s+%p(\s|$)")

RECOVERY_TARGETS = (
    "recovery_target",
    "recovery_target_action",
    "recovery_target_inclusive",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_timeline",
    "recovery_target_xid",
)
# Recovery settings restore keeps when it did not write them, and reports.
OTHER_RECOVERY_SETTINGS = (
    "restore_command",
    "recovery_end_command",
    "archive_cleanup_command",
    "recovery_min_apply_delay",
    "primary_conninfo",
    "primary_slot_name",
    "promote_trigger_file",
)


@dataclass(frozen=True)
class DisabledSetting:
    name: str
    value: str
    origin: str  # who wrote it, or why it is taken as stale, as a phrase


@dataclass(frozen=True)
class Rewrite:
    text: str
    disabled: list[DisabledSetting]


def disable_earlier_settings(text: str, disabled_by: str) -> Rewrite:
    """``text`` (a postgresql.auto.conf) with earlier restores' settings commented out.

    ``disabled_by`` names this restore in the comment, e.g. "of backup 'b' on 2026-...".
    """
    out: list[str] = []
    disabled: list[DisabledSetting] = []
    block: str | None = None  # origin of the block being read, None outside blocks
    for line in text.splitlines():
        stripped = line.strip()
        if stripped == BLOCK_END and block is not None:
            block = None
            continue
        begin = _block_origin(stripped)
        if begin is not None:
            block = begin
            continue
        setting = parse_line(line)
        if block is not None and setting is None:
            block = None  # the old format's block ends at its first non-setting line
        origin = block if setting is not None else None
        if setting is not None and origin is None:
            origin = _stale_origin(setting.name, setting.value)
        if setting is None or origin is None:
            out.append(line)
            continue
        disabled.append(DisabledSetting(setting.name, setting.value, origin))
        out.append(f"{DISABLED_PREFIX} {disabled_by} ({origin}): {stripped}")
    return Rewrite("\n".join(out) + ("\n" if out else ""), disabled)


def _block_origin(stripped: str) -> str | None:
    if stripped == OLD_BLOCK_HEADER:
        return "written by an earlier cloud-dump restore"
    match = _BEGIN_RE.match(stripped)
    if match is not None:
        return f"written by cloud-dump restore {match['origin']}"
    return None


def _stale_origin(name: str, value: str) -> str | None:
    if name in RECOVERY_TARGETS:
        return "unmarked, and a recovery target applies to one recovery only"
    if name == "restore_command" and _is_restores_wal_fetch(value):
        return "unmarked, but the restore_command of an earlier cloud-dump restore"
    return None


def _is_restores_wal_fetch(command: str) -> bool:
    """A ``wal-fetch`` restore_command reading a restore config file of the default name.

    An operator's own wal-fetch (a standby fetching from the archive) names another config
    file and is kept; it would only be taken for ours if it used that name.
    """
    if not _WAL_FETCH_RE.search(command):
        return False
    try:
        words = shlex.split(command.replace("%%", "%"))
    except ValueError:
        return False
    configs = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--config"]
    return any(is_restore_config_name(PurePath(config).name) for config in configs)


def settings_block(origin: str, settings: Mapping[str, str]) -> str:
    """The marked block this restore appends; ``origin`` e.g. "of backup 'b', restored ..."."""
    lines = [f"{BLOCK_BEGIN} ({origin}); a later cloud-dump restore comments these out"]
    lines += [f"{name} = {quote(value)}" for name, value in settings.items()]
    lines.append(BLOCK_END)
    return "\n".join(lines) + "\n"


def foreign_recovery_settings(
    settings: Mapping[str, str], written: Sequence[str]
) -> dict[str, str]:
    """Recovery settings in effect that this restore did not write (name → value)."""
    names = (*RECOVERY_TARGETS, *OTHER_RECOVERY_SETTINGS)
    return {name: value for name, value in settings.items()
            if name in names and name not in written and value != ""}
