"""The facts ``cloud-dump info`` reports, as ``coordinator.ops.infostore`` reads them and
``coordinator.ops.info`` and ``coordinator.ops.infometrics`` print them: plain data, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from coordinator.ops.infowindow import Gap, Window
from storage.errors import CloudDumpError
from storage.manifest import BackupManifest
from storage.verifyresult import VerifyResult

# The kinds of problem (the ``kind`` label of ``cloud_dump_info_problems``), in report order.
PROBLEM_KINDS = ("storage", "no_backups", "verify_result", "wal_history", "wal_segment")


@dataclass(frozen=True)
class Problem:
    """A part of the report that could not be read: ``kind`` (``PROBLEM_KINDS``), what it
    means for the report (``effect``), and the error (its exit code is the command's)."""

    kind: str
    effect: str
    error: CloudDumpError

    @property
    def message(self) -> str:
        return f"{self.effect}: {self.error}"


@dataclass(frozen=True)
class BackupInfo:
    manifest: BackupManifest
    pinned: str | None  # "until released", "until <time>", or None
    in_window: bool = True  # its WAL runs to its timeline's window (``infowindow``)
    replays_to: str | None = None  # the last segment its archived WAL runs to without a gap


@dataclass(frozen=True)
class Incomplete:
    """A backup prefix without a manifest (or uploads open beside one), and what it holds.
    ``state``: ``running`` (its claim's heartbeat is recent), ``silent`` (no heartbeat for three
    periods: killed or hung, ``cleanup`` removes it), ``unclaimed`` (what an interrupted removal
    left), ``stray uploads`` (beside a complete backup)."""

    name: str
    state: str
    objects: int
    uploads: int
    stored_bytes: int
    run_id: str | None = None
    host: str | None = None
    started_at: str | None = None
    last_sign_of_life: datetime | None = None


@dataclass(frozen=True)
class TimelineWal:
    """The newest archived segment of one timeline; ``switched_away``: a later timeline forked
    from it and it wrote nothing after the fork (a failover's old timeline): it is not expected
    to grow."""

    timeline: int
    newest_segment: str
    modified: datetime | None
    switched_away: bool = False


@dataclass
class Info:
    """Everything ``info`` reports for one location; ``problems``: what could not be read."""

    location: str  # where the backups are: storage URL and backups root
    wal_location: str
    cluster: str | None
    now: datetime
    backups: list[BackupInfo] | None = None  # newest first; None: not read
    windows: list[Window] = field(default_factory=list)
    wal: list[TimelineWal] = field(default_factory=list)
    gaps: list[Gap] | None = None
    pinned_gaps: list[Gap] = field(default_factory=list)
    timelines: list[int] = field(default_factory=list)  # with archived WAL
    stored_bytes: dict[str, int] | None = None  # backups, wal, incomplete, other
    incomplete: list[Incomplete] = field(default_factory=list)
    verify: VerifyResult | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def newest_wal(self) -> TimelineWal | None:
        """The newest segment of any timeline (segment names order by WAL position first)."""
        return max(self.wal, key=lambda t: (t.newest_segment[8:], t.timeline), default=None)
