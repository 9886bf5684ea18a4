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

# The kinds of problem (the ``kind`` label of ``cloud_dump_info_problems``), in report order:
# the first one's exit code is the command's.
PROBLEM_KINDS = ("storage", "no_backups", "diverging_histories", "verify_result", "wal_history",
                 "wal_segment")  # fmt: skip
# Problems the store shows rather than parts of it that could not be read.
FOUND_KINDS = ("diverging_histories",)


@dataclass(frozen=True)
class Problem:
    """A part of the report that could not be read, or a fault the store shows (``found``):
    ``kind`` (``PROBLEM_KINDS``), what it means for the report or for the commands that read the
    store (``effect``), and the error (its exit code is the command's)."""

    kind: str
    effect: str
    error: CloudDumpError

    @property
    def message(self) -> str:
        return f"{self.effect}: {self.error}"

    @property
    def found(self) -> bool:
        """Whether the store shows this fault (``FOUND_KINDS``) rather than hides a part."""
        return self.kind in FOUND_KINDS


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
    left), ``pinned`` (no claim, a ``keep.json``: ``cleanup`` leaves it alone), ``stray uploads``
    (beside a complete backup), ``unreadable manifest``."""

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
    """Everything ``info`` reports for one location; ``problems``: what could not be read, and
    the faults found (``Problem.found``)."""

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
