"""``cloud-dump list``: the complete backups in a store, newest first.

Only backups with a ``manifest.json`` exist (it is written last); prefixes of running or
abandoned runs are not shown. Under each backup, the WAL archived after it
(``coordinator.walrange``): how far point-in-time recovery from it can go.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from storage import Storage
from storage.errors import PermanentStorageError
from storage.layout import MANIFEST_NAME, Layout
from storage.manifest import BackupManifest

if TYPE_CHECKING:
    from coordinator.walrange import WalRange

WalRanges = Mapping[str, "WalRange | None"]

log = logging.getLogger(__name__)


def find_backups(storage: Storage, layout: Layout) -> list[BackupManifest]:
    """Manifests of the complete backups under ``layout``, newest first."""
    root = layout.backups_root
    depth = root.count("/") + 1
    manifests = []
    for info in storage.list(root):
        # "<root><name>/manifest.json" and nothing deeper or shallower.
        if not info.key.endswith("/" + MANIFEST_NAME) or info.key.count("/") != depth:
            continue
        try:
            manifests.append(BackupManifest.from_json(storage.get(info.key), info.key))
        except PermanentStorageError as exc:
            log.warning("skipping %s", exc)
    return sorted(manifests, key=lambda m: m.end_time, reverse=True)


def human_size(n: int) -> str:
    """``n`` bytes in binary units, as ``list`` and ``restore`` print sizes."""
    return _size(n)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def print_table(
    manifests: list[BackupManifest],
    layout: Layout,
    out: Callable[[str], None],
    wal_ranges: WalRanges | None = None,
    storage_url: str | None = None,
) -> None:
    """The table; with no backup, a line naming where none was found (``storage_url``)."""
    if layout.cluster:
        out(f"Cluster: {layout.cluster}  (WAL archive: {layout.wal_root})")
        out("")
    header = f"{'NAME':<28}{'TIMESTAMP':<27}{'ENCRYPTED':<11}{'PG VERSION':<12}{'SIZE':>10}"
    out(header)
    out("-" * len(header))
    for m in manifests:
        stamp = m.end_time.strftime("%Y-%m-%d %H:%M:%S UTC")
        out(f"{m.name:<28}{stamp:<27}{'yes' if m.encrypted else 'no':<11}{m.pg_version:<12}"
            f"{_size(m.stored_size):>10}")
        if wal_ranges is not None:
            wal = wal_ranges.get(m.name)
            out(f"  {wal.describe() if wal else 'no WAL archived'}")
    if not manifests:
        where = f" in {layout.describe_backups_root(storage_url)}" if storage_url else ""
        out(f"(no backups{where})")


def print_json(
    manifests: list[BackupManifest],
    out: Callable[[str], None],
    wal_ranges: WalRanges | None = None,
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
        }
        for m in manifests
    ]
    out(json.dumps(rows, indent=2))


def _wal_json(wal: WalRange | None) -> dict[str, object] | None:
    if wal is None:
        return None
    return {"first": wal.first, "last": wal.last, "segments": wal.segments}
