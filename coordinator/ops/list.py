"""``cloud-dump list``: the complete backups in a store, newest first.

Only backups with a ``manifest.json`` exist (it is written last); prefixes of running or
abandoned runs are not shown. Under each backup, the WAL archived after it
(``coordinator.catalog``): how far point-in-time recovery from it can go, and whether
``cloud-dump keep`` pins it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from coordinator.catalog import human_size
from coordinator.settings import ListSettings, Report, layout_of, open_store
from storage.layout import Layout
from storage.manifest import BackupManifest

if TYPE_CHECKING:
    from coordinator.catalog import WalRange

WalRanges = Mapping[str, "WalRange | None"]

log = logging.getLogger(__name__)


def print_table(
    manifests: list[BackupManifest],
    layout: Layout,
    out: Callable[[str], None],
    wal_ranges: WalRanges | None = None,
    storage_url: str | None = None,
    pins: Mapping[str, str | None] | None = None,
) -> None:
    """The table; with no backup, a line naming where none was found (``storage_url``).
    ``pins``: how long each pinned backup is kept (``cloud-dump keep``)."""
    if layout.cluster:
        out(f"Cluster: {layout.cluster}  (WAL archive: {layout.wal_root})")
        out("")
    header = f"{'NAME':<28}{'TIMESTAMP':<27}{'ENCRYPTED':<11}{'PG VERSION':<12}{'SIZE':>10}"
    out(header)
    out("-" * len(header))
    for m in manifests:
        stamp = m.end_time.strftime("%Y-%m-%d %H:%M:%S UTC")
        out(f"{m.name:<28}{stamp:<27}{'yes' if m.encrypted else 'no':<11}{m.pg_version:<12}"
            f"{human_size(m.stored_size):>10}")
        if wal_ranges is not None:
            wal = wal_ranges.get(m.name)
            out(f"  {wal.describe() if wal else 'no WAL archived'}")
        pinned = (pins or {}).get(m.name)
        if pinned:
            out(f"  kept {pinned} (cloud-dump keep: expire leaves it)")
    if not manifests:
        where = f" in {layout.describe_backups_root(storage_url)}" if storage_url else ""
        out(f"(no backups{where})")


def print_json(
    manifests: list[BackupManifest],
    out: Callable[[str], None],
    wal_ranges: WalRanges | None = None,
    pins: Mapping[str, str | None] | None = None,
) -> None:
    rows = [
        {
            "name": m.name,
            "cluster": m.cluster,
            "start_time": m.start_time.isoformat(),
            "end_time": m.end_time.isoformat(),
            "encrypted": m.encrypted,
            "pg_version": m.pg_version,
            "system_identifier": m.system_identifier,
            "timeline": m.timeline,
            "start_lsn": m.start_lsn,
            "end_lsn": m.end_lsn,
            "start_wal_file": m.start_wal_file,
            "end_wal_file": m.end_wal_file,
            "compression": m.compression,
            "stored_bytes": m.stored_size,
            "wal": _wal_json((wal_ranges or {}).get(m.name)),
            "kept": (pins or {}).get(m.name),
        }
        for m in manifests
    ]
    out(json.dumps(rows, indent=2))


def _wal_json(wal: WalRange | None) -> dict[str, object] | None:
    if wal is None:
        return None
    return {"first": wal.first, "last": wal.last, "segments": wal.segments}


def run_list(args: ListSettings, report: Report) -> None:
    from coordinator.catalog import archived_segment_names, find_backups, pinned_until, wal_range

    layout = layout_of(args)  # `list` has no --wal-prefix: CLOUD_DUMP_WAL_PREFIX sets it
    storage = open_store(args)
    try:
        manifests = find_backups(storage, layout)
        archived = archived_segment_names(storage, layout) if manifests else set()
        now = datetime.now(UTC)
        # One small GET per backup: pins are rare, and a LIST of the flat layout's root would
        # walk the whole WAL archive.
        pins = {m.name: pinned_until(storage, layout, m.name, now) for m in manifests}
    finally:
        storage.close()
    ranges = {m.name: wal_range(m, archived) for m in manifests}
    if args.json:
        print_json(manifests, report, ranges, pins)
    else:
        print_table(manifests, layout, report, ranges, storage.url, pins)
