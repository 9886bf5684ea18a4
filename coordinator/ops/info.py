"""``cloud-dump info``: what a store holds for one cluster, and how far a restore from it reaches
(read by ``coordinator.ops.infostore``), printed as text for an operator, one JSON document
(``--json``), or Prometheus' text format (``--prometheus``, ``coordinator.ops.infometrics``).

Whatever could be read is printed, in every format, and what could not be is named (``problems``
in the JSON document, ``cloud_dump_info_ok`` and ``cloud_dump_info_problems`` in the metrics, a
last section of the text); so are backups of diverging histories, which restore without
``--name`` and expire refuse (in the text, under the backups). The command then fails with the
exit code of the first such problem (``Problem``, in ``inforeport.PROBLEM_KINDS`` order), so
that a monitoring job both gets output it can act on and learns that part of it is missing, or
that the commands it watches over will fail.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import datetime

from coordinator.catalog import backup_end, human_size
from coordinator.ops.infometrics import format_prometheus
from coordinator.ops.inforeport import Incomplete, Info, Problem
from coordinator.ops.infostore import read_info
from coordinator.ops.infowindow import Gap, Window
from coordinator.settings import InfoSettings, Report
from storage.errors import CloudDumpError
from storage.layout import KEEP_NAME, MANIFEST_NAME
from storage.walnames import format_lsn


def run_info(args: InfoSettings, report: Report) -> None:
    """Print the report as text, ``--json`` or ``--prometheus``; then raise the first problem's
    error (its exit code), summarised, when part of the store could not be read."""
    info = read_info(args)
    render = format_json if args.json else format_prometheus if args.prometheus else format_text
    for line in render(info):
        report(line)
    if info.problems:
        raise failure(info.problems)


def failure(problems: list[Problem]) -> CloudDumpError:
    """The first problem's error (so its class and exit code), its message saying how many
    there were."""
    first = problems[0]
    error = copy.copy(first.error)
    more = f" ({len(problems)} problems, the first)" if len(problems) > 1 else ""
    what = "found a problem" if first.found else "could not read everything"
    error.args = (f"info {what}{more}: {first.message}",)
    return error


def format_text(info: Info) -> Iterator[str]:
    layout = f"cluster '{info.cluster}'" if info.cluster else "flat layout: no cluster"
    yield f"Backups in {info.location} ({layout}); WAL archive {info.wal_location}"
    yield ""
    yield from _backups_text(info)
    for problem in info.problems:
        if problem.kind == "diverging_histories":
            yield f"Diverging histories: {problem.message}"
    yield ""
    yield "Restorable window:"
    if not info.windows:
        yield "  none: no backup has its WAL archived"
    for window in info.windows:
        yield from _window_text(window)
    yield from _outside_text(info)
    yield ""
    yield from _wal_text(info)
    for incomplete in info.incomplete:
        yield f"Incomplete backup '{incomplete.name}': {_incomplete_text(info, incomplete)}"
    if info.stored_bytes is not None:
        sizes = ", ".join(f"{kind} {human_size(n)}" for kind, n in info.stored_bytes.items())
        yield f"Stored: {sizes}"
    verify = info.verify
    if verify is None:
        yield "Verify: no result recorded"
    else:
        verdict = "OK" if verify.ok else f"{verify.problems} problem(s)"
        deep = ", deep" if verify.deep else ""
        yield (f"Verify: {verdict}, {verify.backups_checked} backup(s){deep}, finished "
               f"{_utc(verify.finished)}")  # fmt: skip
    unread = [p for p in info.problems if not p.found]
    if unread:
        yield ""
        yield "Could not read:"
        for problem in unread:
            yield f"  {problem.message}"


def _backups_text(info: Info) -> Iterator[str]:
    header = (f"{'NAME':<24}{'ENDED (UTC)':<22}{'TL':>3}  {'START LSN':<13}{'END LSN':<13}"
              f"{'STORED':>10}  KEPT")  # fmt: skip
    yield header
    yield "-" * len(header)
    if info.backups is None:
        yield "(could not be read)"
    for backup in info.backups or []:
        m = backup.manifest
        yield (f"{m.name:<24}{_utc(backup_end(m)):<22}{m.timeline:>3}  {m.start_lsn:<13}"
               f"{m.end_lsn:<13}{human_size(m.stored_size):>10}  "
               f"{backup.pinned or 'no'}")  # fmt: skip


def _window_text(window: Window) -> Iterator[str]:
    yield (
        f"  timeline {window.timeline}: from {_utc(window.earliest_time, micro=True)} "
        f"(LSN {format_lsn(window.earliest_lsn)}, end of backup '{window.earliest_backup}')"
    )
    latest = window.latest
    if latest is None:
        yield f"              to: unknown ('{window.unreadable}' could not be read)"
        return
    yield (
        f"              to {_utc(latest.time, micro=True)} "
        f"(LSN {format_lsn(latest.lsn)}, in {latest.segment})"
    )
    if latest.last_transaction_time is not None:
        yield (
            f"              last transaction {_utc(latest.last_transaction_time, micro=True)}"
            " (reached by the LSN or --recovery-target latest)"
        )
    if window.unreadable is not None:
        yield (
            f"              and no further: '{window.unreadable}' could not be read, and "
            "recovery stops there"
        )


def _outside_text(info: Info) -> Iterator[str]:
    """The backups a point-in-time restore cannot go past: their WAL runs into a gap first."""
    for backup in info.backups or []:
        if backup.in_window:
            continue
        m = backup.manifest
        kept = f", kept {backup.pinned}" if backup.pinned else ""
        reach = (f"; its archived WAL runs to {backup.replays_to}, then a gap"
                 if backup.replays_to else "")  # fmt: skip
        yield (
            f"  outside the window: backup '{m.name}' (timeline {m.timeline}{kept}) restores "
            f"to its own end ({_utc(backup_end(m), micro=True)}, LSN {m.end_lsn}){reach}"
        )


def _wal_text(info: Info) -> Iterator[str]:
    if not info.wal:
        yield "WAL: nothing archived" if info.gaps is not None else "WAL: could not be read"
    for index, timeline in enumerate(info.wal):
        lead = "WAL: " if index == 0 else "     "
        which = f"timeline {timeline.timeline}: " if len(info.wal) > 1 else ""
        age = ""
        if timeline.modified is not None:
            seconds = max(0.0, (info.now - timeline.modified).total_seconds())
            age = f", archived {_utc(timeline.modified)} UTC, {seconds:.0f} s ago"
        ended = " (a later timeline forked from it: no longer written)" * timeline.switched_away
        yield f"{lead}{which}newest segment {timeline.newest_segment}{age}{ended}"
    for gap in info.gaps or []:
        yield f"  gap on timeline {gap.timeline}: {_gap_text(gap)}"
    for gap in info.pinned_gaps:
        yield (
            f"  behind pinned backups on timeline {gap.timeline}: {_gap_text(gap)} (a "
            "point-in-time restore from those backups stops at it)"
        )
    if info.gaps == [] and info.wal:
        yield "  no gaps" + (" in the window's WAL" if info.pinned_gaps else "")


def _gap_text(gap: Gap) -> str:
    count = "" if gap.segments == 1 else f" ({gap.segments} segments)"
    return f"{gap.first} .. {gap.last} missing{count}"


def _incomplete_text(info: Info, incomplete: Incomplete) -> str:
    what = (f"{incomplete.objects} object(s), {incomplete.uploads} open upload(s), "
            f"{human_size(incomplete.stored_bytes)}")  # fmt: skip
    if incomplete.state in ("running", "silent"):
        last = incomplete.last_sign_of_life
        ago = "?" if last is None else f"{max(0.0, (info.now - last).total_seconds()):.0f} s"
        run = (f"run {incomplete.run_id} on {incomplete.host}, started {incomplete.started_at},"
               f" last sign of life {ago} ago")  # fmt: skip
        state = ("running" if incomplete.state == "running"
                 else "silent (killed or hung: 'cloud-dump cleanup' removes it)")  # fmt: skip
        return f"{state}, {run}: {what}"
    state = {
        "unclaimed": "no claim and no manifest (an interrupted removal: 'cloud-dump cleanup' "
                     "removes it)",
        "pinned": f"pinned ({KEEP_NAME}) with no {MANIFEST_NAME}, so not restorable as it is: "
                  "'cloud-dump cleanup' leaves it alone ('cloud-dump keep "
                  f"{incomplete.name} --release' lets it remove it)",
        "stray uploads": "complete, with uploads left open (a killed finalize: 'cloud-dump "
                         "cleanup' aborts them)",
        "unreadable manifest": "its manifest.json does not parse",
    }.get(incomplete.state, incomplete.state)  # fmt: skip
    return f"{state}: {what}"


def _utc(when: datetime, *, micro: bool = False) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S" + (".%f" if micro else ""))


def format_json(info: Info) -> Iterator[str]:
    yield json.dumps(info_document(info), indent=2)


def info_document(info: Info) -> dict[str, object]:
    """The JSON document (README, "Monitoring: info")."""
    newest = info.newest_wal
    modified = None if newest is None else newest.modified
    return {
        "location": info.location,
        "cluster": info.cluster,
        "wal_location": info.wal_location,
        "generated_at": info.now.isoformat(),
        "ok": not info.problems,
        "problems": [{"kind": p.kind, "message": p.message} for p in info.problems],
        "backups": None if info.backups is None else [
            {"name": b.manifest.name, "start_time": b.manifest.start_time.isoformat(),
             "end_time": backup_end(b.manifest).isoformat(), "timeline": b.manifest.timeline,
             "start_lsn": b.manifest.start_lsn, "end_lsn": b.manifest.end_lsn,
             "stored_bytes": b.manifest.stored_size, "database_bytes": None,
             "pinned": b.pinned is not None, "pinned_until": b.pinned,
             "in_window": b.in_window, "replays_to_segment": b.replays_to}
            for b in info.backups
        ],
        "windows": [_window_document(w) for w in info.windows],
        "wal": {
            "newest_segment": None if newest is None else newest.newest_segment,
            "newest_segment_modified": _iso(modified),
            "newest_segment_age_seconds": _age(info, modified),
            "timelines": info.timelines,
            "newest": [{"timeline": t.timeline, "segment": t.newest_segment,
                        "modified": _iso(t.modified), "age_seconds": _age(info, t.modified),
                        "switched_away": t.switched_away} for t in info.wal],
            "gaps": None if info.gaps is None else [_gap_document(g) for g in info.gaps],
            "gaps_behind_pins": [_gap_document(g) for g in info.pinned_gaps],
        },
        "stored_bytes": info.stored_bytes,
        "incomplete": [
            {"name": i.name, "state": i.state, "objects": i.objects, "uploads": i.uploads,
             "stored_bytes": i.stored_bytes, "run_id": i.run_id, "host": i.host,
             "started_at": i.started_at, "last_sign_of_life": _iso(i.last_sign_of_life)}
            for i in info.incomplete
        ],
        "verify": None if info.verify is None else json.loads(info.verify.model_dump_json()),
    }  # fmt: skip


def _window_document(w: Window) -> dict[str, object]:
    latest = w.latest
    return {
        "timeline": w.timeline,
        "earliest": {"time": w.earliest_time.isoformat(), "lsn": format_lsn(w.earliest_lsn),
                     "backup": w.earliest_backup},
        "latest": None if latest is None else {
            "time": latest.time.isoformat(), "lsn": format_lsn(latest.lsn),
            "segment": latest.segment,
            "last_transaction_time": _iso(latest.last_transaction_time)},
        "unreadable_segment": w.unreadable,
    }  # fmt: skip


def _gap_document(gap: Gap) -> dict[str, object]:
    return {"timeline": gap.timeline, "first": gap.first, "last": gap.last,
            "segments": gap.segments}  # fmt: skip


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _age(info: Info, when: datetime | None) -> float | None:
    return None if when is None else (info.now - when).total_seconds()
