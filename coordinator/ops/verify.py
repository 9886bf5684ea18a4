"""``cloud-dump verify``: whether what the store holds would still restore.

For each backup (``--name``, or every backup):

- every object its ``manifest.json`` names (each tablespace archive, PostgreSQL's
  ``backup_manifest``, the passphrase-wrapped key) exists with its recorded size, and its
  SHA-256, computed from the bytes read back from storage (``coordinator.rangedread``, as a
  restore reads them), matches the recorded one: checksums a store keeps in its own metadata
  are not trusted for this. A manifest written before the wrapped key's size and SHA-256 were
  recorded (format version 1) gets the key's presence checked, and a note;
- the WAL from the backup's first segment to its last, which recovery needs before the copy is
  consistent, is archived on the backup's timeline.

For the WAL archive, from one LIST and its history files: the WAL each backup that is not pinned
(``cloud-dump keep``: expire keeps only a pinned backup's own WAL) needs to replay to the newest
archived segment, along the newest timeline's history (``coordinator.ops.walpath``), is archived
(a ``.partial`` counts), and every timeline on that path has its ``.history`` file.

``--deep`` (``coordinator.ops.deep``) reads it all back to its contents instead of its stored
bytes alone: every archive decrypted, decompressed and walked as tar, each file checked against
PostgreSQL's ``backup_manifest`` (itself checked against its ``Manifest-Checksum``); every needed
WAL segment decrypted, decompressed, checked against its recorded SHA-256, its first page header
against its name and the backup's system identifier.

The report names each missing or damaged object and each gap (first and last missing segment).
Exit 0 only when everything checks out; otherwise the report, then one line on stderr and exit
15 (``IntegrityError``). Nothing is deleted; a run over every backup records its outcome
(``storage.verifyresult``) for ``info``, and nothing else is written.
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
    first_backup_end,
    human_size,
    pinned_until,
    read_manifest,
    read_wal_inventory,
    segment_size_of,
)
from coordinator.ops.cleanup import backup_prefixes, foreign_objects
from coordinator.ops.deep import DeepFindings, check_deep, wal_to_read
from coordinator.ops.walpath import NeededWal, needed_wal
from coordinator.rangedread import RangedReader, range_size_for
from coordinator.settings import Report, VerifySettings, keys_from, layout_of, open_store
from coordinator.walarchive import WalArchive
from storage.base import Storage
from storage.errors import BackupNotFound, CloudDumpError, IntegrityError
from storage.layout import Layout
from storage.manifest import ArchiveRecord, BackupManifest
from storage.verifyresult import VerifyResult
from storage.walnames import DEFAULT_SEGMENT_SIZE, Segment

log = logging.getLogger(__name__)


@dataclass
class BackupCheck:
    """What verify found for one backup."""

    name: str
    objects: int = 0
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why
    # --deep: files read out of the archives (and their bytes), checked against backup_manifest
    files_checked: int | None = None
    file_bytes_checked: int | None = None


@dataclass
class WalCheck:
    """What verify found in the WAL archive: per timeline, the archived range."""

    location: str
    timelines: dict[int, dict[str, object]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # --deep: segments read back, and their original bytes
    segments_read: int | None = None
    bytes_read: int | None = None
    # What the backups need, and the archive holds: for --deep to read.
    needed: NeededWal | None = field(default=None, repr=False)
    inventory: WalInventory | None = field(default=None, repr=False)


def run_verify(args: VerifySettings, report: Report) -> None:
    """Check the backups and WAL ``args`` select; print the report; raise ``IntegrityError``
    (exit 15) naming the count and the first problem when anything does not check out."""
    layout = layout_of(args)
    storage = open_store(args)
    try:
        manifests = _selected(storage, layout, args.name)
        checked = [_check_backup(storage, m, args.parallel, read=not args.deep)
                   for m in manifests]  # fmt: skip
        backups = [check for check, _ in checked]
        if args.name is None:
            backups += _unreadable(storage, layout, {m.name for m in manifests})
        if not backups:
            raise BackupNotFound(
                f"nothing to verify: no backups in {layout.describe_backups_root(storage.url)}"
            )
        now = datetime.now(UTC)
        pinned = {m.name for m in manifests if pinned_until(storage, layout, m.name, now)}
        archive = WalArchive(storage, layout, keys_from(args, None))
        wal = _check_wal(storage, layout, archive, manifests, pinned)
    finally:
        storage.close()
    if args.deep:
        whole = [(m, a) for m, (_, sound) in zip(manifests, checked, strict=True) for a in sound]
        _add_deep(backups, wal, check_deep(args, whole, _wal_to_read(wal), layout.wal_prefix))
    (_print_json if args.json else _print_text)(backups, wal, report)
    problems = [p for b in backups for p in b.problems] + wal.problems
    if args.name is None:
        _record(args, layout, VerifyResult(
            finished=datetime.now(UTC), ok=not problems, deep=args.deep,
            backups_checked=len(backups), problems=len(problems)))
    if problems:
        raise IntegrityError(
            f"verify found {len(problems)} problem(s), the first: {problems[0]}"
        )


def _record(args: VerifySettings, layout: Layout, result: VerifyResult) -> None:
    """Record the outcome of a run over every backup where ``info`` reads it (the
    ``cloud_dump_verify_*`` metrics). A run over one backup says nothing of the others, so it
    records nothing; credentials that may only read make this a warning, not a failure."""
    storage = open_store(args)
    try:
        storage.put(layout.verify_result_key(), result.to_json())
    except CloudDumpError as exc:
        log.warning("could not record the result for `cloud-dump info`: %s", exc)
    finally:
        storage.close()


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


def _check_backup(
    storage: Storage, manifest: BackupManifest, parallel: int, *, read: bool
) -> tuple[BackupCheck, list[ArchiveRecord]]:
    """The backup's objects against ``manifest.json``, each read back whole when ``read``
    (``--deep`` reads the archives itself); with the archives present at their recorded size."""
    check = BackupCheck(manifest.name)
    sound: list[ArchiveRecord] = []
    # Sizes from one LIST of the backup's prefix: a HEAD of a local object reads all of it.
    prefix = manifest.backup_manifest_key.rpartition("/")[0] + "/"
    sizes = {info.key: info.size for info in storage.list(prefix)}
    # An archive stored as several objects (format version 3): each on its own line.
    objects = [(o.key, o.size, o.sha256, a.largest_part)
               for a in manifest.archives for o in a.stored_objects]  # fmt: skip
    objects.append((manifest.backup_manifest_key, manifest.backup_manifest_size,
                    manifest.backup_manifest_sha256, 0))  # fmt: skip
    objects += _wrapped_key(manifest, check, sizes)
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
        archive = next((a for a in manifest.archives
                        if key in (o.key for o in a.stored_objects)), None)  # fmt: skip
        if archive is not None:
            if key == archive.stored_objects[-1].key and archive_present(archive, sizes):
                sound.append(archive)
            if not read:
                continue
        got, problem = _read_back(storage, key, size, sha256, part_size, parallel)
        check.bytes_read += got
        if problem is not None:
            check.problems.append(f"backup '{manifest.name}': {problem}")
    return check, sound


def archive_present(archive: ArchiveRecord, sizes: dict[str, int]) -> bool:
    """Whether every object of ``archive`` is listed at its recorded size."""
    return all(sizes.get(o.key) == o.size for o in archive.stored_objects)


def _wrapped_key(
    manifest: BackupManifest, check: BackupCheck, sizes: dict[str, int]
) -> list[tuple[str, int, str, int]]:
    """The passphrase-wrapped key as one more object to read back, when ``manifest.json``
    records its size and SHA-256 (format version 2). Of an older manifest only its presence
    is checked, and a note says so."""
    encryption = manifest.encryption
    key = encryption.wrapped_identity_key if encryption else None
    if encryption is None or key is None:
        return []
    size, sha256 = encryption.wrapped_identity_size, encryption.wrapped_identity_sha256
    if size is not None and sha256 is not None:
        return [(key, size, sha256, 0)]
    check.objects += 1
    if key not in sizes:
        check.problems.append(
            f"backup '{manifest.name}': its passphrase-wrapped key '{key}' is missing"
        )
    else:
        check.notes.append(
            f"backup '{manifest.name}': its passphrase-wrapped key '{key}' is not checked: "
            "manifest.json (written by an older cloud-dump) records no size or sha256 for it"
        )
    return []


def _wal_to_read(wal: WalCheck) -> dict[str, list[str]]:
    if wal.needed is None or wal.inventory is None:
        return {}  # the archive could not be listed: named already
    return wal_to_read(wal.needed.segments, wal.inventory.segments, wal.inventory.segment_size)


def _add_deep(backups: list[BackupCheck], wal: WalCheck, found: DeepFindings) -> None:
    for check in backups:
        # A damaged wrapped key is found by both: said once.
        check.problems += [p for p in found.backup_problems.get(check.name, [])
                           if p not in check.problems]  # fmt: skip
        check.bytes_read += found.bytes_read.get(check.name, 0)
        check.files_checked = found.files.get(check.name, 0)
        check.file_bytes_checked = found.file_bytes.get(check.name, 0)
    wal.problems += found.wal_problems
    wal.segments_read = found.wal_segments
    wal.bytes_read = found.wal_bytes


def _read_back(
    storage: Storage, key: str, size: int, sha256: str, part_size: int, parallel: int
) -> tuple[int, IntegrityError | None]:
    """Read ``key`` whole, checking its SHA-256: the bytes read, and the ``IntegrityError``
    naming it when it does not check (the bytes read then too: all of them for a mismatched
    SHA-256, which is known only at the end)."""
    reader = RangedReader(storage, key, size, range_bytes=range_size_for(part_size),
                          parallel=parallel, sha256=sha256)  # fmt: skip
    with reader:
        try:
            while reader.read(1 << 20):
                pass
        except IntegrityError as exc:
            return reader.bytes_read, exc
        return reader.bytes_read, None


def _check_wal(
    storage: Storage,
    layout: Layout,
    archive: WalArchive,
    manifests: list[BackupManifest],
    pinned: set[str],
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
        if manifest.name in pinned:
            continue
        start = Segment.parse(manifest.start_wal_file, segment_size)
        starts[start.timeline] = min(starts.get(start.timeline, start.number), start.number)
    needed = needed_wal(archive, inventory, manifests, pinned)
    wal.needed, wal.inventory, wal.notes = needed, inventory, needed.notes
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
    carried = first_backup_end((m for m in manifests if m.name not in pinned), segment_size)
    for timeline in sorted(needed.segments):
        present = inventory.segments.get(timeline, set()) | inventory.partials.get(timeline, set())
        missing = set(needed.segments[timeline]) - present
        if carried is not None and carried[0] == Segment(timeline, min(missing, default=-1)):
            # Needed by that backup alone, which has its own copy: wal-fetch lets PostgreSQL
            # read it from pg_wal when it is whole, as a backup's last segment is when it was
            # taken on a primary (the backup's end switches WAL); on a standby it may not be.
            missing.discard(carried[0].number)
            wal.notes.append(
                f"{inventory.name(timeline, carried[0].number)} is not archived: backup "
                f"'{carried[1]}', the oldest, carries it, and a restore of it replays past its "
                "end with its own copy (whole when it was taken on a primary, not always on a "
                "standby)"
            )
        for gap_start, gap_end in _runs(missing):
            gap = _run(inventory, timeline, gap_start, gap_end)
            wal.problems.append(f"WAL gap on timeline {timeline}: {gap} missing")
    wal.problems += needed.problems
    if not timelines and not inventory.histories and manifests:
        # Each backup carries the WAL that makes it consistent (BASE_BACKUP's WAL option), so
        # it still restores, to its own end: not a problem, but worth saying.
        wal.notes.append(
            f"no WAL is archived at '{wal.location}': each backup restores to its own end, "
            "with the WAL inside it; recovery past it needs archive_command (wal-push)"
        )
    return wal


def _runs(numbers: set[int]) -> list[tuple[int, int]]:
    """``numbers`` as runs of consecutive numbers, ``(first, last)``, in order."""
    runs: list[tuple[int, int]] = []
    for number in sorted(numbers):
        if runs and runs[-1][1] == number - 1:
            runs[-1] = (runs[-1][0], number)
        else:
            runs.append((number, number))
    return runs


def _run(inventory: WalInventory, timeline: int, start: int, end: int) -> str:
    count = end - start + 1
    if count == 1:
        return f"segment {inventory.name(timeline, start)}"
    return (f"segments {inventory.name(timeline, start)} .. {inventory.name(timeline, end)} "
            f"({count} segments)")  # fmt: skip


def _print_text(backups: list[BackupCheck], wal: WalCheck, out: Callable[[str], None]) -> None:
    for check in backups:
        verdict = "OK" if not check.problems else f"{len(check.problems)} problem(s)"
        deep = "" if check.files_checked is None else (
            f", {check.files_checked:,} files ({human_size(check.file_bytes_checked or 0)}) "
            "checked against backup_manifest")
        out(f"backup '{check.name}': {verdict} ({check.objects} objects, "
            f"{human_size(check.bytes_read)} read back{deep})")  # fmt: skip
        for note in check.notes:
            out(f"  note: {note}")
        for problem in check.problems:
            out(f"  {problem}")
    verdict = "OK" if not wal.problems else f"{len(wal.problems)} problem(s)"
    deep = "" if wal.segments_read is None else (
        f" ({wal.segments_read} segment{'' if wal.segments_read == 1 else 's'}, "
        f"{human_size(wal.bytes_read or 0)} read back)")
    out(f"WAL archive '{wal.location}': {verdict}{deep}")
    for timeline, facts in sorted(wal.timelines.items()):
        out(f"  timeline {timeline}: {facts['first']} .. {facts['newest']} "
            f"({facts['segments']} segment{'' if facts['segments'] == 1 else 's'})")  # fmt: skip
    for note in wal.notes:
        out(f"  note: {note}")
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
                "problems": wal.problems, "notes": wal.notes,
                "segments_read": wal.segments_read, "bytes_read": wal.bytes_read},
    }, indent=2))  # fmt: skip
