"""Timeline history files (``<timeline>.history``), as PostgreSQL reads them.

A timeline is recorded by its history file, one line per ancestor, oldest first:
``parentTLI<TAB>switch point LSN<TAB>reason``; the last line is its parent and where it forked
from it (PostgreSQL's ``readTimeLineHistory``, src/backend/access/transam/timeline.c). A
failover (a standby promoted) writes one, and so does a copy restored to a target and promoted.

Read by restore (which timeline to follow, ``coordinator.restore.timelines``) and by verify
(which WAL the newest timeline needs, ``coordinator.ops.walpath``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from storage.errors import ConfigError, IntegrityError
from storage.walnames import parse_lsn

NO_TARGET_REASON = "no recovery target specified"  # PostgreSQL's, for a promotion at WAL's end
_LINE_RE = re.compile(r"(\d+)\s+(\S+)(?:\s+(.*))?", re.ASCII)  # parent, LSN, reason


@dataclass(frozen=True)
class Switch:
    """One line of a history file: ``timeline`` ended at ``lsn`` (the next one begins there)."""

    timeline: int
    lsn: int
    reason: str

    @property
    def at_target(self) -> bool:
        """Whether the recovery that made the next timeline stopped at a recovery target."""
        return self.reason != NO_TARGET_REASON


@dataclass(frozen=True)
class History:
    """A timeline and its ancestors, as its history file records them."""

    timeline: int
    switches: tuple[Switch, ...]  # oldest first; the last one is the fork from the parent

    @property
    def fork(self) -> Switch:
        return self.switches[-1]

    def switch_from(self, timeline: int) -> Switch | None:
        return next((s for s in self.switches if s.timeline == timeline), None)

    def path_from(self, timeline: int) -> tuple[Switch, ...]:
        """The switches from ``timeline`` on, to this one."""
        return tuple(s for s in self.switches if s.timeline >= timeline)


def parse_history(timeline: int, text: str) -> History:
    """A history file as PostgreSQL reads it (``readTimeLineHistory``); ``IntegrityError``."""
    switches: list[Switch] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE_RE.fullmatch(line)
        parent = int(match[1]) if match else None
        lsn = _lsn_or_none(match[2]) if match else None
        if match is None or parent is None or lsn is None or parent >= timeline or (
            switches and parent <= switches[-1].timeline
        ):
            raise IntegrityError(f"history file of timeline {timeline}, line {number}: "
                                 f"{raw!r} is not 'parent<TAB>LSN<TAB>reason' with timelines "
                                 "increasing and below its own")
        switches.append(Switch(parent, lsn, (match[3] or "").strip()))
    if not switches:
        raise IntegrityError(f"history file of timeline {timeline} names no parent timeline")
    return History(timeline, tuple(switches))


def _lsn_or_none(text: str) -> int | None:
    try:
        return parse_lsn(text)
    except ConfigError:
        return None
