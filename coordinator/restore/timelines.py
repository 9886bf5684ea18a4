"""Which timeline a restore with a recovery target follows: decided, or refused, before download.

PostgreSQL (12+) recovers to ``recovery_target_timeline = 'latest'`` by default: at start it
probes the archive for ``<N>.history`` from the backup's timeline + 1 upwards and follows the
highest number it finds before a gap. A timeline is recorded by its history file, one line per
ancestor, oldest first: ``parentTLI<TAB>switch point LSN<TAB>reason``; the last line is its
parent and where it forked from it. A failover (a standby promoted) writes one, and so does a
copy restored to a target and promoted. With an archive shared by a source and its test copies,
the highest timeline may be a copy's: recovery then follows the source up to where the copy
forked and the copy after that, silently without what the source wrote since (or it fails:
"requested timeline N is not a child of this server's history", "recovery ended before
configured recovery target was reached").

So restore reads the archive's history files (``coordinator.walarchive.WalArchive``: stored,
compressed and encrypted as wal-push stores them) and works out the timelines that *descend*
from the backup: those whose history leaves the backup's timeline at or after the backup's end
LSN. With the backup's timeline they form a tree. A timeline is a *possible end* of recovery
when nothing forks from it, or when it went on after its last fork:

- WAL of it is archived after that fork (the segment the switch point falls in, archived
  complete under its own name, or the one after); or
- a timeline forked there stopped at a recovery target (its reason is not PostgreSQL's "no
  recovery target specified"): a recovery stopped on purpose before the end of its parent's
  WAL, as a restored copy does. Such a child is said to look like a copy. A failover's
  promotion ends at the end of the WAL the standby had.

A failover makes a chain (the old line ends where the new one begins): one possible end. Test
copies make branches: several. ``choose_timeline`` decides:

- ``latest`` (the default, or given): the timeline PostgreSQL would follow must descend from
  the backup, else the server would refuse at start: ``ConfigError`` (exit 3). With the default,
  it must also be the only possible end, else ``ConfigError`` naming every possible end with its
  parent, switch point and reason, and how to choose. A recovery that cannot pass a fork meets
  no branch: ``immediate`` stops at the backup's end, an exclusive LSN target before the first
  record at its LSN (an inclusive one replays the record after it, which may begin a timeline).
- a number: the backup's own timeline, or one whose history the archive holds and which descends
  from the backup; ``current``: the backup's own.

The timeline chosen is written as ``recovery_target_timeline`` (``current`` for the backup's own,
else its number; ``latest`` only when asked for): PostgreSQL then follows exactly the timeline
checked here, even if a copy archives a new history file before this copy is started.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from coordinator.history import NO_TARGET_REASON as NO_TARGET_REASON
from coordinator.history import History, Switch, parse_history
from coordinator.restore.recovery import RecoveryTarget
from coordinator.restore.targets import timeline_number
from storage.errors import ConfigError
from storage.manifest import BackupManifest
from storage.walnames import Segment, format_lsn, parse_lsn, segment_number

if TYPE_CHECKING:
    from coordinator.walarchive import WalArchive

# History files probed past the first number missing from the archive: PostgreSQL stops at a
# gap, but a timeline beyond it still shows a branch (a history file that failed to archive).
PROBES_PAST_GAP = 2


class ArchivedTimelines:
    """The archive's history files and segments, read through a ``WalArchive``."""

    def __init__(self, archive: WalArchive, segment_bytes: int, where: str) -> None:
        self._archive = archive
        self._segment_bytes = segment_bytes
        self.where = where  # how messages name the archive
        self._histories: dict[int, History | None] = {}

    def history(self, timeline: int) -> History | None:
        """The history of ``timeline``; None when the archive has no history file for it."""
        if timeline not in self._histories:
            stored = self._archive.find(f"{timeline:08X}.history")
            found = None
            if stored is not None:
                data, _ = self._archive.read(stored)
                found = parse_history(timeline, data.decode("utf-8", "replace"))
            self._histories[timeline] = found
        return self._histories[timeline]

    def after(self, timeline: int) -> dict[int, History]:
        """Every history archived above ``timeline``, probed upwards as PostgreSQL does, and
        ``PROBES_PAST_GAP`` numbers past the first gap."""
        found: dict[int, History] = {}
        probe, missed = timeline + 1, 0
        while missed <= PROBES_PAST_GAP:
            history = self.history(probe)
            if history is None:
                missed += 1
            else:
                found[probe], missed = history, 0
            probe += 1
        return found

    def went_on_after(self, timeline: int, lsn: int) -> str | None:
        """An archived segment of ``timeline`` holding WAL written after a switch at ``lsn``, if
        any: proof that ``timeline`` went on after it.

        The segment after the one the switch point ends, or the one the switch point falls in,
        when archived under its own name: the promoted server archives the old timeline's last
        segment as ``.partial`` (PostgreSQL 9.5+), so a complete one was written to its end by
        a server that stayed on the old timeline past the switch (an old primary that went on,
        or lost commits of a lagging failover).
        """
        per_segment = self._segment_bytes
        # The segment holding ``lsn``; if the switch falls inside it, also the next one.
        holding = segment_number(lsn, per_segment)
        candidates = [holding, holding + 1] if lsn % per_segment else [holding]
        for number in candidates:
            name = Segment(timeline, number).name(per_segment)
            if self._archive.find(name) is not None:
                return name
        return None


@dataclass(frozen=True)
class TimelineChoice:
    """The timeline the copy follows, and the ``recovery_target_timeline`` that makes it."""

    timeline: int
    setting: str  # "current", "latest" or the number
    path: tuple[Switch, ...]  # from the backup's timeline to it

    def describe(self) -> str:
        if not self.path:
            text = f"timeline {self.timeline}, the backup's own"
        else:
            legs = ", ".join(f"{s.timeline} until {format_lsn(s.lsn)}" for s in self.path)
            text = f"timeline {self.timeline} (timeline {legs}, then {self.timeline})"
        if self.setting == "latest":
            text += (" as the archive has it now (recovery_target_timeline 'latest': the highest "
                     "when the copy starts)")
        return text


def choose_timeline(
    manifest: BackupManifest, target: RecoveryTarget, archived: ArchivedTimelines
) -> TimelineChoice:
    """The timeline a restore of ``manifest`` with ``target`` follows (module docstring);
    ``ConfigError`` (exit 3) for a choice PostgreSQL would not make or that is ambiguous."""
    own = manifest.timeline
    number = timeline_number(target.timeline)
    if target.timeline == "current" or number == own:
        return TimelineChoice(own, target.timeline or "current", ())
    if number is not None:
        history = archived.history(number)
        if history is None:
            raise ConfigError(
                f"recovery target timeline {number}: the archive at {archived.where} has no "
                f"history file for it ({number:08X}.history), so PostgreSQL cannot follow it")
        _require_descent(history, manifest, f"recovery target timeline {number}")
        return TimelineChoice(number, str(number), history.path_from(own))
    histories = archived.after(own)
    latest = _postgres_latest(histories, own)
    if latest != own:
        _require_descent(
            histories[latest], manifest,
            f"PostgreSQL would follow timeline {latest} (recovery_target_timeline 'latest', the "
            "highest in the archive), which",
            tree=_Tree(manifest, histories, None))
    if target.timeline == "latest":
        path = histories[latest].path_from(own) if latest != own else ()
        return TimelineChoice(latest, "latest", path)
    tree = _Tree(manifest, histories, _horizon(target, manifest))
    ends = tree.possible_ends(archived)
    followed = tree.reached_on(latest, histories.get(latest))
    if [end.timeline for end in ends] != [followed]:
        raise ConfigError(_ambiguity(manifest, ends, latest, followed))
    if followed == own:
        return TimelineChoice(own, "current", ())
    return TimelineChoice(followed, str(followed), histories[followed].path_from(own))


def _postgres_latest(histories: dict[int, History], own: int) -> int:
    latest = own
    while latest + 1 in histories:
        latest += 1
    return latest


def _horizon(target: RecoveryTarget, manifest: BackupManifest) -> int | None:
    """The LSN recovery cannot read a record at or past, if the target fixes one."""
    if target.setting == "recovery_target":  # immediate: stops once consistent, at the end
        return parse_lsn(manifest.end_lsn)
    if target.lsn is not None and not target.inclusive:
        return target.lsn
    return None


def _require_descent(
    history: History, manifest: BackupManifest, subject: str, tree: _Tree | None = None
) -> None:
    own, end = manifest.timeline, parse_lsn(manifest.end_lsn)
    switch = history.switch_from(own)
    if switch is not None and switch.lsn >= end:
        return
    if switch is None:
        lineage = ", ".join(f"{s.timeline} until {format_lsn(s.lsn)}" for s in history.switches)
        why = f"does not pass through timeline {own} (its history: {lineage})"
    else:
        why = f"left timeline {own} at LSN {format_lsn(switch.lsn)}, before the backup's end"
    others = ""
    if tree is not None:
        descendants = [t for t in tree.nodes() if t != own]
        if descendants:
            others = ", or one that descends from it: " + ", ".join(map(str, descendants))
    raise ConfigError(
        f"{subject} {why}: it cannot continue backup '{manifest.name}' (timeline {own}, ended "
        f"at LSN {manifest.end_lsn}); choose with --recovery-target-timeline: current (timeline "
        f"{own}, the backup's own){others}")


@dataclass(frozen=True)
class _End:
    timeline: int
    note: str


class _Tree:
    """The backup's timeline and those descending from it, as parent → child edges taken from
    every descendant's history (so a timeline whose own history file is missing still shows
    where it forked), edges at or past ``horizon`` cut."""

    def __init__(
        self, manifest: BackupManifest, histories: dict[int, History], horizon: int | None
    ) -> None:
        self.own = manifest.timeline
        end = parse_lsn(manifest.end_lsn)
        self.entered: dict[int, Switch] = {}  # timeline → the switch it began at
        self.children: dict[int, dict[int, Switch]] = {}
        for tli, history in histories.items():
            first = history.switch_from(self.own)
            if first is None or first.lsn < end:
                continue  # not a descendant of the backup
            path = history.path_from(self.own)
            after = [s.timeline for s in path[1:]] + [tli]
            for switch, child in zip(path, after, strict=True):
                if horizon is not None and switch.lsn >= horizon:
                    break
                self.entered[child] = switch
                self.children.setdefault(switch.timeline, {})[child] = switch

    def nodes(self) -> list[int]:
        return sorted({self.own, *self.entered})

    def possible_ends(self, archived: ArchivedTimelines) -> list[_End]:
        ends = []
        for tli in self.nodes():
            kids = self.children.get(tli, {})
            if not kids:
                ends.append(_End(tli, self._leaf(tli)))
                continue
            went_on = self._went_on(tli, kids, archived)
            if went_on is not None:
                ends.append(_End(tli, went_on))
        return ends

    def reached_on(self, latest: int, history: History | None) -> int:
        """The timeline recovery following ``latest`` is on when it stops: ``latest``, or the
        timeline on its way the horizon stops it on."""
        if history is None:
            return latest
        way = [s.timeline for s in history.path_from(self.own)[1:]] + [latest]
        reached = self.own
        for tli in way:
            if tli not in self.entered:
                break
            reached = tli
        return reached

    def _leaf(self, tli: int) -> str:
        if tli == self.own:
            return f"timeline {tli}, the backup's own"
        fork = self.entered[tli]
        copy = (", stopped at a recovery target: looks like a restored copy"
                if fork.at_target else "")
        return (f"timeline {tli}, forked from {fork.timeline} at {format_lsn(fork.lsn)} "
                f"('{fork.reason}'{copy})")

    def _went_on(
        self, tli: int, kids: dict[int, Switch], archived: ArchivedTimelines
    ) -> str | None:
        last = max(fork.lsn for fork in kids.values())
        at_last = sorted(kid for kid, fork in kids.items() if fork.lsn == last)
        own = ", the backup's own," if tli == self.own else ""
        forked = (f"timeline {tli}{own} which went on after timeline "
                  f"{' and '.join(map(str, at_last))} forked from it at {format_lsn(last)}")
        segment = archived.went_on_after(tli, last)
        if segment is not None:
            return f"{forked} (its segment {segment} is archived)"
        stopped = [kid for kid in at_last if kids[kid].at_target]
        if stopped:
            return f"{forked} (timeline {stopped[0]} stopped at a recovery target)"
        return None


def _ambiguity(manifest: BackupManifest, ends: list[_End], latest: int, followed: int) -> str:
    own = manifest.timeline
    if followed not in [end.timeline for end in ends]:
        default = (f"PostgreSQL would follow timeline {latest} (recovery_target_timeline "
                   "'latest', its default), which is none of them")
    else:
        default = (f"PostgreSQL would follow timeline {latest} (recovery_target_timeline "
                   "'latest', its default)")
    return (
        f"the timelines in the archive branch after backup '{manifest.name}' (timeline {own}, "
        f"ended at LSN {manifest.end_lsn}), so recovery could end on "
        f"{'; or on '.join(end.note for end in ends)}; {default}; a copy restored with a "
        "target and archiving into this archive makes such a branch: choose with "
        f"--recovery-target-timeline: current (timeline {own}, the backup's own), a timeline "
        "number, or latest"
    )
