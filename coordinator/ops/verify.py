"""``cloud-dump verify``: whether what the store holds would still restore.

For each backup (``--name``, or every backup):

- every object its ``manifest.json`` names (each tablespace archive, PostgreSQL's
  ``backup_manifest``, the passphrase-wrapped key) exists with its recorded size, and its
  SHA-256, computed from the bytes read back from storage (``coordinator.rangedread``, as a
  restore reads them), matches the recorded one: checksums a store keeps in its own metadata
  are not trusted for this;
- the WAL from the backup's first segment to its last, which recovery needs before the copy is
  consistent, is archived on the backup's timeline.

For the WAL archive, from one LIST: on each timeline, from the first segment of the oldest
checked backup that is not pinned (``cloud-dump keep``: expire keeps only a pinned backup's own
WAL) (or the timeline's first archived segment) to its newest, no segment is missing (a
``.partial`` counts: it is where a timeline was switched away from); and every timeline after
the first that has WAL has its ``.history`` file, without which recovery cannot follow it.

The report names each missing or damaged object and each gap (first and last missing segment).
Exit 0 only when everything checks out; otherwise the report, then one line on stderr and exit
15 (``IntegrityError``). Nothing is written or deleted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from coordinator.catalog import (
    WalInventory,
    find_backups,
    human_size,
    missing_runs,
    read_manifest,
    read_wal_inventory,
    segment_size_of,
)
from coordinator.ops.cleanup import backup_prefixes, foreign_objects
from coordinator.ops.expire import pinned_until
from coordinator.rangedread import RangedReader, range_size_for
from coordinator.settings import Report, VerifySettings, layout_of, open_store
from storage.base import Storage
from storage.errors import BackupNotFound, CloudDumpError, IntegrityError
from storage.layout import Layout
from storage.manifest import BackupManifest
from storage.walnames import DEFAULT_SEGMENT_SIZE, Segment

log = logging.getLogger(__name__)


@dataclass
class BackupCheck:
    """What verify found for one backup."""

    name: str
    objects: int = 0
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class WalCheck:
    """What verify found in the WAL archive: per timeline, the archived range."""

    location: str
    timelines: dict[int, dict[str, object]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def run_verify(args: VerifySettings, report: Report) -> None:
    """Check the backups and WAL ``args`` select; print the report; raise ``IntegrityError``
    (exit 15) naming the count and the first problem when anything does not check out."""
    layout = layout_of(args)
    storage = open_store(args)
    try:
        manifests = _selected(storage, layout, args.name)
        backups = [_check_backup(storage, m, args.parallel) for m in manifests]
        if args.name is None:
            backups += _unreadable(storage, layout, {m.name for m in manifests})
        if not backups:
            raise BackupNotFound(
                f"nothing to verify: no backups in {layout.describe_backups_root(storage.url)}"
            )
        now = datetime.now(UTC)
        pinned = {m.name for m in manifests if pinned_until(storage, layout, m.name, now)}
        wal = _check_wal(storage, layout, manifests, pinned)
    finally:
        storage.close()
    (_print_json if args.json else _print_text)(backups, wal, report)
    problems = [p for b in backups for p in b.problems] + wal.problems
    if problems:
        raise IntegrityError(
            f"verify found {len(problems)} problem(s), the first: {problems[0]}"
        )


def _selected(storage: Storage, layout: Layout, name: str | None) -> list[BackupManifest]:
    if name is not None:
        return [read_manifest(storage, layout, name)]
    return list(reversed(find_backups(storage, layout)))  # oldest first, as WAL runs


def _unreadable(storage: Storage, layout: Layout, read: set[str]) -> list[BackupCheck]:
    """Prefixes that look like backups but cannot be restored: a ``manifest.json`` that does
    not parse (``list`` and ``restore`` skip it), or objects with neither a manifest nor a claim
    (an interrupted delete or abort). A claimed prefix is a running backup's, or ``cleanup``'s
    to judge: not named here."""
    found = []
    for prefix in backup_prefixes(storage, layout).values():
        if prefix.name in read or prefix.has_claim:
            continue
        check = BackupCheck(prefix.name, objects=len(prefix.keys))
        if prefix.has_manifest:
            try:
                read_manifest(storage, layout, prefix.name)
            except CloudDumpError as exc:
                check.problems.append(f"backup '{prefix.name}': {exc}")
        elif prefix.keys and not foreign_objects(layout, prefix):
            check.problems.append(
                f"'{layout.backup_prefix(prefix.name)}' holds {len(prefix.keys)} object(s) but "
                "no manifest.json: not a backup that restores (an interrupted delete or abort: "
                "'cloud-dump cleanup' removes it)"
            )
        if check.problems:
            found.append(check)
    return found


def _check_backup(storage: Storage, manifest: BackupManifest, parallel: int) -> BackupCheck:
    check = BackupCheck(manifest.name)
    # Sizes from one LIST of the backup's prefix: a HEAD of a local object reads all of it.
    prefix = manifest.backup_manifest_key.rpartition("/")[0] + "/"
    sizes = {info.key: info.size for info in storage.list(prefix)}
    objects = [(a.key, a.stored_size, a.sha256, max((p.size for p in a.parts), default=0))
               for a in manifest.archives]  # fmt: skip
    objects.append((manifest.backup_manifest_key, manifest.backup_manifest_size,
                    manifest.backup_manifest_sha256, 0))  # fmt: skip
    for key, size, sha256, part_size in objects:
        check.objects += 1
        if key not in sizes:
            check.problems.append(f"backup '{manifest.name}': object '{key}' is missing")
            continue
        if sizes[key] != size:
            check.problems.append(
                f"backup '{manifest.name}': object '{key}' is {sizes[key]} bytes, "
                f"manifest.json records {size}"
            )
            continue
        try:
            check.bytes_read += _read_back(storage, key, size, sha256, part_size, parallel)
        except IntegrityError as exc:
            check.problems.append(f"backup '{manifest.name}': {exc}")
    wrapped = manifest.encryption.wrapped_identity_key if manifest.encryption else None
    if wrapped is not None:
        check.objects += 1
        if not any(True for _ in storage.list(wrapped)):
            check.problems.append(
                f"backup '{manifest.name}': its passphrase-wrapped key '{wrapped}' is missing"
            )
    return check


def _read_back(
    storage: Storage, key: str, size: int, sha256: str, part_size: int, parallel: int
) -> int:
    """Read ``key`` whole, checking its SHA-256 (``IntegrityError`` naming it); bytes read."""
    reader = RangedReader(storage, key, size, range_bytes=range_size_for(part_size),
                          parallel=parallel, sha256=sha256)  # fmt: skip
    with reader:
        while reader.read(1 << 20):
            pass
    return size


def _check_wal(
    storage: Storage, layout: Layout, manifests: list[BackupManifest], pinned: set[str]
) -> WalCheck:
    segment_size = segment_size_of(manifests[0]) if manifests else DEFAULT_SEGMENT_SIZE
    wal = WalCheck(f"{storage.url.rstrip('/')}/{layout.wal_root}")
    try:
        inventory = read_wal_inventory(storage, layout, segment_size)
    except CloudDumpError as exc:
        wal.problems.append(f"the WAL archive at '{wal.location}' cannot be listed: {exc}")
        return wal
    starts: dict[int, int] = {}  # timeline -> the oldest checked backup's first segment
    for manifest in manifests:
        _check_consistency_wal(manifest, inventory, wal)
        if manifest.name in pinned:
            continue  # expire keeps only its own WAL: what follows it may rightly be gone
        start = Segment.parse(manifest.start_wal_file, segment_size)
        starts[start.timeline] = min(starts.get(start.timeline, start.number), start.number)
    timelines = sorted(set(inventory.segments) | set(inventory.partials))
    for timeline in timelines:
        present = inventory.segments.get(timeline, set()) | inventory.partials.get(timeline, set())
        newest = max(present)
        lowest = min(present)
        first = max(lowest, starts.get(timeline, lowest))
        wal.timelines[timeline] = {
            "first": inventory.name(timeline, first),
            "newest": inventory.name(timeline, newest),
            "segments": len([n for n in present if n >= first]),
        }
        for gap_start, gap_end in missing_runs(present, first, newest):
            gap = _run(inventory, timeline, gap_start, gap_end)
            wal.problems.append(
                f"WAL gap on timeline {timeline}: {gap} "
                "missing"
            )
        if timeline > 1 and timeline not in inventory.histories:
            wal.problems.append(
                f"timeline {timeline} has WAL but no history file '{timeline:08X}.history': "
                "recovery cannot follow it"
            )
    if not timelines and manifests:
        wal.problems.append(f"no WAL is archived at '{wal.location}'")
    return wal


def _check_consistency_wal(
    manifest: BackupManifest, inventory: WalInventory, wal: WalCheck
) -> None:
    """The WAL the backup needs to become consistent: its first to its last segment."""
    size = inventory.segment_size
    first = Segment.parse(manifest.start_wal_file, size)
    last = Segment.parse(manifest.end_wal_file, size)
    present = inventory.segments.get(first.timeline, set())
    for start, end in missing_runs(present, first.number, last.number):
        wal.problems.append(
            f"backup '{manifest.name}' cannot become consistent: WAL "
            f"{_run(inventory, first.timeline, start, end)} missing"
        )


def _run(inventory: WalInventory, timeline: int, start: int, end: int) -> str:
    count = end - start + 1
    if count == 1:
        return f"segment {inventory.name(timeline, start)}"
    return (f"segments {inventory.name(timeline, start)} .. {inventory.name(timeline, end)} "
            f"({count} segments)")  # fmt: skip


def _print_text(backups: list[BackupCheck], wal: WalCheck, out: Callable[[str], None]) -> None:
    for check in backups:
        verdict = "OK" if not check.problems else f"{len(check.problems)} problem(s)"
        out(f"backup '{check.name}': {verdict} ({check.objects} objects, "
            f"{human_size(check.bytes_read)} read back)")  # fmt: skip
        for problem in check.problems:
            out(f"  {problem}")
    verdict = "OK" if not wal.problems else f"{len(wal.problems)} problem(s)"
    out(f"WAL archive '{wal.location}': {verdict}")
    for timeline, facts in sorted(wal.timelines.items()):
        out(f"  timeline {timeline}: {facts['first']} .. {facts['newest']} "
            f"({facts['segments']} segment{'' if facts['segments'] == 1 else 's'})")  # fmt: skip
    for problem in wal.problems:
        out(f"  {problem}")
    if not backups:
        out("(no backups to verify)")


def _print_json(backups: list[BackupCheck], wal: WalCheck, out: Callable[[str], None]) -> None:
    ok = not wal.problems and not any(b.problems for b in backups)
    out(json.dumps({
        "ok": ok,
        "backups": [asdict(b) | {"ok": not b.problems} for b in backups],
        "wal": {"location": wal.location, "ok": not wal.problems,
                "timelines": {str(t): f for t, f in sorted(wal.timelines.items())},
                "problems": wal.problems},
    }, indent=2))  # fmt: skip
