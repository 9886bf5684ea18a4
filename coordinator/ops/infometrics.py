"""``cloud-dump info --prometheus``: the report as Prometheus' text exposition format 0.0.4, for
node_exporter's textfile collector.

Format (https://prometheus.io/docs/instrumenting/exposition_formats/): a ``# HELP`` and a
``# TYPE`` line per metric, then ``name{label="value",...} number`` lines; label values escape
backslash, double quote and newline. Every metric is a gauge named ``cloud_dump_*`` with its
unit as suffix (``_seconds``, ``_bytes``, ``_timestamp_seconds``: seconds since the Unix epoch),
labelled with ``cluster`` (empty in the flat layout) and ``location`` (the backups' URL), and
``timeline``, ``kind`` or ``state`` where it applies. LSNs are WAL byte positions
(``_lsn_bytes``).

Every metric that could be computed is printed, and ``cloud_dump_info_ok`` (1 only when every
part of the store was read and its backups are of one history) and
``cloud_dump_info_problems{kind}`` always are: a metric missing for lack of data is told apart
from one that could not be read. The ``cloud_dump_verify_*``
metrics appear only once verify has recorded a result.
"""

from __future__ import annotations

from collections.abc import Iterator

from coordinator.catalog import backup_end
from coordinator.ops.inforeport import PROBLEM_KINDS, Info

Samples = list[tuple[dict[str, str], float]]
INCOMPLETE_STATES = ("running", "silent", "unclaimed", "pinned", "stray uploads",
                     "unreadable manifest")  # fmt: skip


def format_prometheus(info: Info) -> Iterator[str]:
    base = {"cluster": info.cluster or "", "location": info.location}
    metrics = [*_health(info, base), *_backups(info, base), *_windows(info, base),
               *_wal(info, base), *_storage(info, base), *_verify(info, base)]  # fmt: skip
    for name, help_text, samples in metrics:
        if not samples:
            continue
        yield f"# HELP cloud_dump_{name} {help_text}"
        yield f"# TYPE cloud_dump_{name} gauge"
        for labels, value in samples:
            yield f"cloud_dump_{name}{{{_labels(labels)}}} {_number(value)}"


Metric = tuple[str, str, Samples]


def _health(info: Info, base: dict[str, str]) -> list[Metric]:
    return [
        ("info_ok", "1 when info read every part of the store and found its backups of one "
         "history, 0 otherwise (see cloud_dump_info_problems; what it could read is still "
         "reported)",
         [(base, float(not info.problems))]),
        ("info_problems", "parts of the store info could not read, and backups of diverging "
         "histories (which restore without --name and expire refuse), by kind",
         [({**base, "kind": kind}, sum(1 for p in info.problems if p.kind == kind))
          for kind in PROBLEM_KINDS]),
    ]  # fmt: skip


def _backups(info: Info, base: dict[str, str]) -> list[Metric]:
    if info.backups is None:
        return []
    metrics: list[Metric] = [
        ("backups", "complete backups in the store", [(base, len(info.backups))]),
        ("backups_outside_window", "backups a point-in-time restore cannot take past a WAL gap "
         "(pinned ones once expire removed the WAL after them): they restore to their own end",
         [(base, sum(1 for b in info.backups if not b.in_window))]),
    ]  # fmt: skip
    newest = max(info.backups, key=lambda b: backup_end(b.manifest), default=None)
    if newest is not None:
        end = backup_end(newest.manifest)
        metrics += [
            ("newest_backup_end_timestamp_seconds", "when the newest backup ended",
             [(base, end.timestamp())]),
            ("newest_backup_age_seconds", "seconds since the newest backup ended",
             [(base, (info.now - end).total_seconds())]),
        ]  # fmt: skip
    return metrics


def _windows(info: Info, base: dict[str, str]) -> list[Metric]:
    per_tl = [({**base, "timeline": str(w.timeline)}, w) for w in info.windows]
    known = [(labels, w.latest) for labels, w in per_tl if w.latest is not None]
    return [
        ("restore_window_start_timestamp_seconds",
         "earliest recovery target time a restore reaches (the oldest usable backup's end)",
         [(labels, w.earliest_time.timestamp()) for labels, w in per_tl]),
        ("restore_window_end_timestamp_seconds",
         "latest recovery target time a restore reaches",
         [(labels, latest.time.timestamp()) for labels, latest in known]),
        ("restore_window_start_lsn_bytes", "earliest recovery target LSN a restore reaches",
         [(labels, float(w.earliest_lsn)) for labels, w in per_tl]),
        ("restore_window_end_lsn_bytes", "latest recovery target LSN a restore reaches",
         [(labels, float(latest.lsn)) for labels, latest in known]),
    ]  # fmt: skip


def _wal(info: Info, base: dict[str, str]) -> list[Metric]:
    metrics: list[Metric] = []
    if info.gaps is not None:
        metrics += [
            ("wal_gaps", "runs of missing WAL segments in the WAL the restorable window and "
             "every unpinned backup need",
             [({**base, "timeline": str(t)}, sum(1 for g in info.gaps if g.timeline == t))
              for t in info.timelines]),
            ("wal_gaps_behind_pins", "runs of missing WAL segments after pinned backups, before "
             "that WAL (expire removes it): those backups restore to their own end",
             [({**base, "timeline": str(t)}, sum(1 for g in info.pinned_gaps if g.timeline == t))
              for t in info.timelines]),
        ]  # fmt: skip
    dated = [(t, t.modified) for t in info.wal if t.modified is not None]
    metrics += [
        ("wal_newest_segment_timestamp_seconds",
         "when the newest WAL segment of the timeline was stored",
         [({**base, "timeline": str(t.timeline)}, m.timestamp()) for t, m in dated]),
        ("wal_archive_lag_seconds",
         "age of the newest archived WAL segment of each timeline still written (not one a "
         "later timeline forked from at its end)",
         [({**base, "timeline": str(t.timeline)}, (info.now - m).total_seconds())
          for t, m in dated if not t.switched_away]),
    ]  # fmt: skip
    return metrics


def _storage(info: Info, base: dict[str, str]) -> list[Metric]:
    metrics: list[Metric] = []
    if info.stored_bytes is not None:
        metrics += [
            ("stored_bytes", "bytes stored, by kind (backups, wal, incomplete: backups without "
             "a manifest and open uploads, other)",
             [({**base, "kind": kind}, float(n)) for kind, n in info.stored_bytes.items()]),
            ("incomplete_backups", "backup prefixes without a manifest (or with uploads left "
             "open), by state (running, silent: killed or hung, unclaimed, pinned: left alone "
             "by cleanup, stray uploads, unreadable manifest)",
             [({**base, "state": state.replace(" ", "_")},
               sum(1 for i in info.incomplete if i.state == state))
              for state in INCOMPLETE_STATES]),
        ]  # fmt: skip
    return metrics


def _verify(info: Info, base: dict[str, str]) -> list[Metric]:
    if info.verify is None:
        return []
    v = info.verify
    return [
        ("verify_ok", "1 when the last verify found nothing wrong", [(base, float(v.ok))]),
        ("verify_last_timestamp_seconds", "when the last verify finished",
         [(base, v.finished.timestamp())]),
        ("verify_problems", "problems the last verify reported", [(base, v.problems)]),
    ]  # fmt: skip


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
