"""What a restore does to the recovery configuration of the data directory it restored.

Run as ``restore_backup``'s ``before_startable`` callback: every file is written and verified,
``global/pg_control`` is not yet in place, so a failure here leaves nothing startable, and
nothing startable ever has half of these changes. In order:

1. ``postgresql.auto.conf``: the recovery settings earlier restores left are commented out
   (``coordinator.restore.autoconf``), on every restore, plain or not, so that the copy does only
   what this restore asked for.
2. With a recovery target: the restore config file (``coordinator.restore.recovery``), then a marked
   block with ``restore_command``, the target and ``recovery_target_action = 'promote'``; with
   ``--archive-mode off``, ``archive_mode = 'off'`` in the same block. The file is replaced
   atomically and keeps its mode.
3. Signal files. A target restore creates ``recovery.signal`` and removes a ``standby.signal``
   that came with the backup (a backup taken from a standby carries one, and standby mode wins
   over recovery.signal: the copy would never promote). A plain restore keeps a
   ``standby.signal`` (the copy starts as a standby, and says so) and removes a
   ``recovery.signal`` that came with the backup (a plain restore starts with crash recovery).

``RecoveryConf`` keeps what was done for the report (``coordinator.restore.report``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.restore.autoconf import (
    DisabledSetting,
    disable_earlier_settings,
    foreign_recovery_settings,
    settings_block,
)
from coordinator.restore.pgconf import AUTO_CONF, ConfigView, read_config
from coordinator.restore.recovery import RecoveryTarget, WalFetchCommand, write_restore_config
from coordinator.restore.targets import utc_text
from storage.fsutil import write_atomically

if TYPE_CHECKING:
    from coordinator.restore.run import TargetPlan

ARCHIVE_MODES = ("preserve", "off")
RECOVERY_SIGNAL = "recovery.signal"
STANDBY_SIGNAL = "standby.signal"


@dataclass(frozen=True)
class SettingsRequest:
    """What this restore asks of the copy's recovery and archiving."""

    backup: str
    target: RecoveryTarget | None
    command: WalFetchCommand | None
    archive_mode: str  # "preserve" or "off"
    restored_at: datetime

    @property
    def label(self) -> str:
        return f"of backup '{self.backup}', restored {utc_text(self.restored_at)}"


@dataclass
class SettingsOutcome:
    """What was done to the data directory, and the configuration it now has."""

    written: dict[str, str]
    disabled: list[DisabledSetting]
    signal_notes: list[str]
    standby: bool
    config: ConfigView
    foreign: dict[str, str] = field(default_factory=dict)


class RecoveryConf:
    """The ``before_startable`` callback: applies ``request`` to the plan's PGDATA."""

    def __init__(self, request: SettingsRequest) -> None:
        self.request = request
        self.plan: TargetPlan | None = None
        self.outcome: SettingsOutcome | None = None
        self._wrote_config = False

    def __call__(self, plan: TargetPlan) -> None:
        self.plan = plan
        self.outcome = apply_settings(plan.pgdata, self.request, self._config_written)

    def _config_written(self) -> None:
        self._wrote_config = True

    def discard(self) -> None:
        """After a failed restore: remove the restore config file this run wrote (secrets)."""
        if self._wrote_config and self.request.command is not None:
            with contextlib.suppress(FileNotFoundError):
                self.request.command.config_path.unlink()


def apply_settings(
    pgdata: Path, request: SettingsRequest, config_written: Callable[[], None] | None = None
) -> SettingsOutcome:
    """Steps 1-3 of the module docstring; ``config_written`` is called once the restore config
    file is in place."""
    auto = pgdata / AUTO_CONF
    original = auto.read_text() if auto.exists() else ""
    rewrite = disable_earlier_settings(
        original, f"of backup '{request.backup}' on {utc_text(request.restored_at)}"
    )
    written = settings_to_write(request)
    if request.command is not None:
        write_restore_config(request.command)
        if config_written is not None:
            config_written()
    text = rewrite.text
    if written:
        text += settings_block(request.label, written)
    if text != original:
        _replace_keeping_mode(auto, text)
    notes = _set_signals(pgdata, targeted=request.target is not None, mode=_file_mode(auto))
    config = read_config(pgdata)
    effective = {name: s.value for name, s in config.settings.items()}
    return SettingsOutcome(
        written=written,
        disabled=rewrite.disabled,
        signal_notes=notes,
        standby=(pgdata / STANDBY_SIGNAL).exists(),
        config=config,
        foreign=foreign_recovery_settings(effective, list(written)),
    )


def settings_to_write(request: SettingsRequest) -> dict[str, str]:
    written: dict[str, str] = {}
    if request.target is not None and request.command is not None:
        written["restore_command"] = request.command.restore_command()
        written.update(request.target.settings())
    if request.archive_mode == "off":
        written["archive_mode"] = "off"
    return written


def _set_signals(pgdata: Path, *, targeted: bool, mode: int) -> list[str]:
    notes = []
    unwanted = STANDBY_SIGNAL if targeted else RECOVERY_SIGNAL
    if (pgdata / unwanted).exists():
        (pgdata / unwanted).unlink()
        why = ("standby mode would win over recovery.signal and the copy would never promote"
               if targeted else "a plain restore starts with crash recovery, not archive recovery")
        notes.append(f"removed the {unwanted} that came with the backup: {why}")
    if targeted:
        signal = pgdata / RECOVERY_SIGNAL
        fd = os.open(signal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        os.close(fd)
        notes.append(f"created {signal}")
    return notes


def _file_mode(path: Path) -> int:
    """The mode of the backed-up configuration (0600, or 0640 in a group-access cluster)."""
    try:
        return path.stat().st_mode & 0o660
    except FileNotFoundError:
        return 0o600


def _replace_keeping_mode(path: Path, text: str) -> None:
    """Replace ``path`` atomically with its mode (``_file_mode``); raises ``OSError`` naming it.

    Not fsynced: this runs before restore's sync (``CreatedPaths.sync``) that precedes pg_control.
    """
    write_atomically(path, text, mode=_file_mode(path), sync=False)
