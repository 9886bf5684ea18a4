"""Whether a restored copy will archive WAL, and into which archive.

Read from the files in the restored PGDATA (``coordinator.restore.pgconf``: postgresql.conf with
what it includes, then postgresql.auto.conf, the last setting winning): ``archive_mode``,
``archive_command`` and ``archive_library``. When archive_command runs ``cloud-dump wal-push``,
the archive it pushes into comes from its ``--storage``/``--cluster``/``--wal-prefix`` flags or
the ``--config`` file it names (read here when readable; only the location is taken from it).

A plain restore continues the source's timeline, so a copy pushing into the archive it was
restored from writes WAL under the names of the source's (DESIGN.md §8): the first of the two
to push a name wins and the other's archiving stops for good (exit 17). A copy that recovers
to a target promotes to a new timeline and pushes its ``.history`` file and WAL there: later
restores with a target meet its branch (PostgreSQL's default 'latest' would follow it, and
restore refuses the ambiguity, ``coordinator.restore.timelines``). Both are warned, with
``--archive-mode off`` as the way to make a test copy. A standby (archives only once promoted,
as the source's successor) is not.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path

from coordinator.envfile import decode, values
from coordinator.restore.pgconf import Setting
from coordinator.restore.recoveryconf import SettingsOutcome, SettingsRequest
from storage.errors import ConfigError
from storage.layout import DEFAULT_WAL_PREFIX, Layout
from storage.manifest import BackupManifest


def archiving_line(
    manifest: BackupManifest, request: SettingsRequest, outcome: SettingsOutcome, source: str
) -> tuple[str, str | None]:
    """The "archiving:" line, and a warning when the copy's WAL would collide with its source's.

    ``source``: the archive this restore names (``archive_url``).
    """
    config = outcome.config
    if request.archive_mode == "off":
        return ("archiving: off: this restore wrote archive_mode = 'off' (--archive-mode off), "
                "so the copy archives nothing", None)
    mode = config.get("archive_mode")
    if mode is None:
        if config.unseen:
            return (f"archiving: not known: {config.unseen[0]}, so archive_mode and "
                    "archive_command were not seen; for a copy that must never archive, "
                    "restore with --archive-mode off", None)
        return ("archiving: off (archive_mode is not set in PGDATA's configuration)", None)
    if mode.value.lower() not in ("on", "always"):
        return (f"archiving: off (archive_mode = '{mode.value}' in {mode.path})", None)
    return _archiving_on(manifest, request, outcome, mode, source)


def _archiving_on(
    manifest: BackupManifest,
    request: SettingsRequest,
    outcome: SettingsOutcome,
    mode: Setting,
    source: str,
) -> tuple[str, str | None]:
    config = outcome.config
    command = config.get("archive_command")
    library = config.get("archive_library")
    how = f"archive_mode = '{mode.value}' in {mode.path}"
    standby = outcome.standby and mode.value.lower() == "on"
    if standby:
        how += "; a standby archives only with 'always'"
    if command is None or not command.value:
        if library is not None and library.value:
            return (f"archiving: on ({how}) with archive_library '{library.value}'", None)
        return (f"archiving: on ({how}) but archive_command is empty: WAL stays in pg_wal "
                "until one is set", None)
    destination = archive_of(command.value)
    into = f" into {destination}" if destination else ""
    state = "none while it is a standby" if standby else "on"
    then = ", after a promotion" if standby else ""
    unseen = " (settings outside PGDATA were not seen)" if config.unseen else ""
    line = f"archiving: {state} ({how}){then}: archive_command '{command.value}'{into}{unseen}"
    collides = is_wal_push(command.value) and destination in (source, None)
    if not collides or outcome.standby:
        return line, None
    if request.target is not None:
        return line, _branch(destination, source)
    return line, _collision(manifest, destination, source)


def _branch(destination: str | None, source: str) -> str:
    where = "the archive it was restored from" if destination else "an archive restore could " \
        "not determine, possibly the one it was restored from"
    return (
        f"the copy promotes to a new timeline and archives with cloud-dump wal-push into {where} "
        f"({destination or source}): its .history file and WAL stay there, where later restores "
        "with a target meet its branch (PostgreSQL's default, recovery_target_timeline 'latest', "
        "would follow it instead of the source; restore refuses until "
        "--recovery-target-timeline chooses); for a test copy, restore with --archive-mode off"
    )


def _collision(manifest: BackupManifest, destination: str | None, source: str) -> str:
    where = "the archive it was restored from" if destination else "an archive restore could " \
        "not determine, possibly the one it was restored from"
    return (
        f"the copy continues timeline {manifest.timeline} of its source and archives with "
        f"cloud-dump wal-push into {where} ({destination or source}): its WAL takes the names "
        "of the source's, so the pushes of whichever comes second are refused (exit 17) and "
        "its archiving stops; for a test copy, restore with --archive-mode off"
    )


def is_wal_push(command: str) -> bool:
    return "wal-push" in _words(command)


def archive_of(command: str) -> str | None:
    """The WAL archive a ``cloud-dump wal-push`` archive_command pushes into, when it shows.

    From its flags, else from the ``--config`` file it names (when readable here).
    """
    words = _words(command)
    if "wal-push" not in words:
        return None
    flags = _flags(words[words.index("wal-push") + 1:])
    config = _read_kv(Path(flags["--config"])) if "--config" in flags else {}
    storage = flags.get("--storage") or config.get("CLOUD_DUMP_STORAGE")
    if not storage:
        return None
    cluster = flags.get("--cluster") or config.get("CLOUD_DUMP_CLUSTER") or None
    prefix = flags.get("--wal-prefix") or config.get("CLOUD_DUMP_WAL_PREFIX")
    return archive_url(storage, cluster, prefix)


def archive_url(storage: str, cluster: str | None, wal_prefix: str | None) -> str:
    """``<storage>/<wal root>``: how restore names a WAL archive."""
    try:
        root = Layout(cluster=cluster, wal_prefix=wal_prefix or DEFAULT_WAL_PREFIX).wal_root
    except ConfigError:
        root = "?"
    return f"{storage.rstrip('/')}/{root.rstrip('/')}"


def _words(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()


def _flags(words: list[str]) -> dict[str, str]:
    flags: dict[str, str] = {}
    for i, word in enumerate(words):
        name, sep, value = word.partition("=")
        if not name.startswith("--"):
            continue
        if sep:
            flags[name] = value
        elif i + 1 < len(words):
            flags[name] = words[i + 1]
    return flags


def _read_kv(path: Path) -> Mapping[str, str]:
    """The KEY=VALUE lines of a ``--config`` file (``coordinator.envfile``); empty when it
    cannot be read or is not UTF-8. Unlike ``cloud-dump --config``, a malformed line is skipped,
    not an error: the file belongs to the copy's archive_command, and what is read here only
    names the archive in a line and a warning, which must not fail the restore (the keys that
    are readable still name the archive the copy may push into once the file is fixed)."""
    try:
        return values(decode(path.read_bytes()))
    except (OSError, UnicodeDecodeError):
        return {}
