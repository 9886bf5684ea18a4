"""``cloud-dump info``: what a store holds for one cluster, and how far a restore from it reaches
(read by ``coordinator.ops.infostore``, whose docstring defines the restorable window), printed
as text for an operator, one JSON document (``--json``), or Prometheus' text exposition format
0.0.4 (``--prometheus``) for node_exporter's textfile collector.

Prometheus (https://prometheus.io/docs/instrumenting/exposition_formats/): a ``# HELP`` and a
``# TYPE`` line per metric, then ``name{label="value",...} number`` lines; label values escape
backslash, double quote and newline. Every metric is a gauge named ``cloud_dump_*`` with its
unit as suffix (``_seconds``, ``_bytes``, ``_timestamp_seconds``: seconds since the Unix epoch),
labelled with ``cluster`` (empty in the flat layout) and ``location`` (the backups' URL), and
``timeline`` where it is per timeline. LSNs are WAL byte positions (``_lsn_bytes``). The
``cloud_dump_verify_*`` metrics appear only once verify has recorded a result.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime

from coordinator.catalog import backup_end, human_size
from coordinator.ops.infostore import Info, Window, read_info
from coordinator.settings import InfoSettings, Report
from storage.walnames import format_lsn


def run_info(args: InfoSettings, report: Report) -> None:
    """Print the report as text, ``--json`` or ``--prometheus``."""
    info = read_info(args)
    render = format_json if args.json else format_prometheus if args.prometheus else format_text
    for line in render(info):
        report(line)


def format_text(info: Info) -> Iterator[str]:
    layout = f"cluster '{info.cluster}'" if info.cluster else "flat layout: no cluster"
    yield f"Backups in {info.location} ({layout}); WAL archive {info.wal_location}"
    yield ""
    header = (f"{'NAME':<24}{'ENDED (UTC)':<22}{'TL':>3}  {'START LSN':<13}{'END LSN':<13}"
              f"{'STORED':>10}  KEPT")  # fmt: skip
    yield header
    yield "-" * len(header)
    for backup in info.backups:
        m = backup.manifest
        yield (f"{m.name:<24}{_utc(backup_end(m)):<22}{m.timeline:>3}  {m.start_lsn:<13}"
               f"{m.end_lsn:<13}{human_size(m.stored_size):>10}  "
               f"{backup.pinned or 'no'}")  # fmt: skip
    yield ""
    yield "Restorable window:"
    if not info.windows:
        yield "  none: no backup has its WAL archived"
    for window in info.windows:
        yield from _window_text(window)
    yield ""
    if info.newest_segment is None:
        yield "WAL: nothing archived"
    else:
        modified = info.newest_segment_modified
        age = f", {_age_text(info, modified)}" if modified else ""
        yield f"WAL: newest segment {info.newest_segment}{age}"
    for gap in info.gaps:
        count = "" if gap.segments == 1 else f" ({gap.segments} segments)"
        yield f"  gap on timeline {gap.timeline}: {gap.first} .. {gap.last} missing{count}"
    if not info.gaps and info.newest_segment is not None:
        yield "  no gaps"
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


def _window_text(window: Window) -> Iterator[str]:
    yield (f"  timeline {window.timeline}: from {_utc(window.earliest_time, micro=True)} "
           f"(LSN {format_lsn(window.earliest_lsn)}, end of backup '{window.earliest_backup}')")
    yield (f"              to {_utc(window.latest_time, micro=True)} "
           f"(LSN {format_lsn(window.latest_lsn)}, in {window.newest_segment})")
    if window.last_transaction_time is not None:
        yield (f"              last transaction {_utc(window.last_transaction_time, micro=True)}"
               " (reached by the LSN or --recovery-target latest)")


def _utc(when: datetime, *, micro: bool = False) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S" + (".%f" if micro else ""))


def _age_text(info: Info, modified: datetime) -> str:
    seconds = max(0.0, (info.now - modified).total_seconds())
    return f"archived {_utc(modified)} UTC, {seconds:.0f} s ago"


def format_json(info: Info) -> Iterator[str]:
    yield json.dumps(info_document(info), indent=2)


def info_document(info: Info) -> dict[str, object]:
    """The JSON document (README, "Monitoring: info")."""
    modified = info.newest_segment_modified
    return {
        "location": info.location,
        "cluster": info.cluster,
        "wal_location": info.wal_location,
        "generated_at": info.now.isoformat(),
        "backups": [
            {"name": b.manifest.name, "start_time": b.manifest.start_time.isoformat(),
             "end_time": backup_end(b.manifest).isoformat(), "timeline": b.manifest.timeline,
             "start_lsn": b.manifest.start_lsn, "end_lsn": b.manifest.end_lsn,
             "stored_bytes": b.manifest.stored_size, "database_bytes": None,
             "pinned": b.pinned is not None, "pinned_until": b.pinned}
            for b in info.backups
        ],
        "windows": [
            {"timeline": w.timeline,
             "earliest": {"time": w.earliest_time.isoformat(), "lsn": format_lsn(w.earliest_lsn),
                          "backup": w.earliest_backup},
             "latest": {"time": w.latest_time.isoformat(), "lsn": format_lsn(w.latest_lsn),
                        "segment": w.newest_segment,
                        "last_transaction_time": _iso(w.last_transaction_time)}}
            for w in info.windows
        ],
        "wal": {
            "newest_segment": info.newest_segment,
            "newest_segment_modified": _iso(modified),
            "newest_segment_age_seconds": (None if modified is None
                                           else (info.now - modified).total_seconds()),
            "timelines": info.timelines,
            "gaps": [{"timeline": g.timeline, "first": g.first, "last": g.last,
                      "segments": g.segments} for g in info.gaps],
        },
        "stored_bytes": info.stored_bytes,
        "verify": None if info.verify is None else json.loads(info.verify.model_dump_json()),
    }  # fmt: skip


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def format_prometheus(info: Info) -> Iterator[str]:
    base = {"cluster": info.cluster or "", "location": info.location}
    newest = max(info.backups, key=lambda b: backup_end(b.manifest), default=None)
    metrics: list[tuple[str, str, list[tuple[dict[str, str], float]]]] = [
        ("backups", "complete backups in the store", [(base, len(info.backups))]),
    ]
    if newest is not None:
        end = backup_end(newest.manifest)
        metrics += [
            ("newest_backup_end_timestamp_seconds", "when the newest backup ended",
             [(base, end.timestamp())]),
            ("newest_backup_age_seconds", "seconds since the newest backup ended",
             [(base, (info.now - end).total_seconds())]),
        ]  # fmt: skip
    per_tl = [({**base, "timeline": str(w.timeline)}, w) for w in info.windows]
    metrics += [
        ("restore_window_start_timestamp_seconds",
         "earliest recovery target time a restore reaches (the oldest usable backup's end)",
         [(labels, w.earliest_time.timestamp()) for labels, w in per_tl]),
        ("restore_window_end_timestamp_seconds",
         "latest recovery target time a restore reaches",
         [(labels, w.latest_time.timestamp()) for labels, w in per_tl]),
        ("restore_window_start_lsn_bytes", "earliest recovery target LSN a restore reaches",
         [(labels, float(w.earliest_lsn)) for labels, w in per_tl]),
        ("restore_window_end_lsn_bytes", "latest recovery target LSN a restore reaches",
         [(labels, float(w.latest_lsn)) for labels, w in per_tl]),
        ("wal_gaps", "runs of missing WAL segments",
         [({**base, "timeline": str(t)}, sum(1 for g in info.gaps if g.timeline == t))
          for t in info.timelines]),
    ]  # fmt: skip
    modified = info.newest_segment_modified
    if modified is not None:
        metrics += [
            ("wal_newest_segment_timestamp_seconds", "when the newest WAL segment was stored",
             [(base, modified.timestamp())]),
            ("wal_archive_lag_seconds", "age of the newest archived WAL segment",
             [(base, (info.now - modified).total_seconds())]),
        ]  # fmt: skip
    metrics.append(("stored_bytes", "bytes stored, by kind (backups, wal, other)",
                    [({**base, "kind": kind}, float(n))
                     for kind, n in info.stored_bytes.items()]))  # fmt: skip
    if info.verify is not None:
        v = info.verify
        metrics += [
            ("verify_ok", "1 when the last verify found nothing wrong", [(base, float(v.ok))]),
            ("verify_last_timestamp_seconds", "when the last verify finished",
             [(base, v.finished.timestamp())]),
            ("verify_problems", "problems the last verify reported", [(base, v.problems)]),
        ]  # fmt: skip
    for name, help_text, samples in metrics:
        if not samples:
            continue
        yield f"# HELP cloud_dump_{name} {help_text}"
        yield f"# TYPE cloud_dump_{name} gauge"
        for labels, value in samples:
            yield f"cloud_dump_{name}{{{_labels(labels)}}} {_number(value)}"


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
