"""What ``cloud-dump info`` reports, read from the store: the backups, the restorable window of
each timeline (``coordinator.ops.infowindow``, whose docstring defines it), the WAL archive's
state per timeline, stored bytes by kind, what running or killed backups hold, and verify's last
result; every part of that which could not be read; and backups of diverging histories
(``coordinator.catalog.find_divergence``), which restore without ``--name`` and expire refuse.

Read-only, from one LIST of the location, one of its open multipart uploads (and one request
per upload for its size), one of the WAL archive, the backups' manifests, pins and claims, the
archive's history files, verify's last result and the newest archived segment(s).

Monitoring needs an answer even when part of the store cannot be read: each part is read on
its own, and one that fails is recorded as a ``Problem`` (its kind, the error) while the rest
is still read. Only a store that cannot be listed (unreachable, access denied, not there) ends
the reading early: every later request would fail the same way, or wait out the same retries.

Stored bytes, by kind: ``backups`` (the prefixes of complete backups), ``wal`` (the WAL
archive), ``incomplete`` (the objects and open multipart uploads of backups that have no
manifest: running, killed, pinned, or an interrupted removal; and uploads left open beside a
complete backup, whose finalize was killed) and ``other`` (anything else under the location).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from coordinator.catalog import (
    WalInventory,
    find_backups,
    find_divergence,
    pinned_until,
    read_wal_inventory,
    segment_size_of,
    timeline_starts,
    wal_file_name,
)
from coordinator.history import History, parse_history
from coordinator.ops.cleanup import MISSED_HEARTBEATS, Prefix, foreign_objects
from coordinator.ops.inforeport import (
    PROBLEM_KINDS,
    BackupInfo,
    Incomplete,
    Info,
    Problem,
    TimelineWal,
)
from coordinator.ops.infowindow import Reach, gaps, windows
from coordinator.settings import InfoSettings, keys_from, layout_of, open_store
from coordinator.walarchive import WalArchive
from storage.base import Storage
from storage.errors import (
    BackupNotFound,
    CloudDumpError,
    ConfigError,
    ObjectNotFound,
    TransientStorageError,
    UploadNotFound,
)
from storage.layout import KEEP_NAME, MANIFEST_NAME, Layout
from storage.manifest import BackupManifest
from storage.verifyresult import VerifyResult
from storage.walnames import DEFAULT_SEGMENT_SIZE, Segment, is_segment, segment_number
from workers.backup import CLAIM_NAME, read_claim
from workers.diagnostics import PING_PREFIX


class _Unreachable(Exception):
    """Raised by ``_problem`` once the store cannot be listed: reading stops there."""


def read_info(args: InfoSettings) -> Info:
    """Everything ``info`` reports for the location ``args`` name, with what could not be read
    in ``problems``. Raises only for bad settings (``ConfigError``)."""
    layout = layout_of(args)
    storage = open_store(args)
    url = storage.url.rstrip("/")
    info = Info(f"{url}/{layout.backups_root}", f"{url}/{layout.wal_root}", layout.cluster,
                datetime.now(UTC))  # fmt: skip
    try:
        _read_all(storage, layout, WalArchive(storage, layout, keys_from(args, None)), info)
    except _Unreachable:
        pass
    finally:
        storage.close()
    info.problems.sort(key=lambda p: PROBLEM_KINDS.index(p.kind))
    return info


def _problem(info: Info, kind: str, effect: str, error: CloudDumpError) -> None:
    info.problems.append(Problem(kind, effect, error))
    if kind == "storage" or isinstance(error, TransientStorageError):
        raise _Unreachable from error  # every later request would fail, or wait, the same way


def _read_all(storage: Storage, layout: Layout, archive: WalArchive, info: Info) -> None:
    manifests: list[BackupManifest] = []
    try:
        manifests = find_backups(storage, layout)
        info.backups = [BackupInfo(m, pinned_until(storage, layout, m.name, info.now))
                        for m in manifests]  # fmt: skip
    except CloudDumpError as exc:
        _problem(info, "storage", "the backups could not be listed", exc)
    if info.backups == []:
        _problem(
            info,
            "no_backups",
            "nothing to restore",
            BackupNotFound(f"no backups in {layout.describe_backups_root(storage.url)}"),
        )
    try:
        _read_listing(storage, layout, manifests, info)
    except CloudDumpError as exc:
        _problem(info, "storage", "the stored bytes could not be counted", exc)
    try:
        info.verify = _read_verify_result(storage, layout)
    except CloudDumpError as exc:
        _problem(info, "verify_result", "verify's last result is left out", exc)
    size = segment_size_of(manifests[0]) if manifests else DEFAULT_SEGMENT_SIZE
    try:
        inventory = read_wal_inventory(storage, layout, size)
    except CloudDumpError as exc:
        _problem(info, "storage", "the WAL archive could not be listed", exc)
        return
    _find_divergence(manifests, inventory, info)
    _read_wal(archive, inventory, manifests, info)


def _find_divergence(manifests: list[BackupManifest], inventory: WalInventory, info: Info) -> None:
    """A problem when the backups, pinned ones included, are of diverging histories: the same
    test, on the same facts, as restore's choice of a backup and expire's refusal
    (``coordinator.ops.expire._refuse_diverging``), so that info fails where they will."""
    divergence = find_divergence(manifests, timeline_starts(manifests, inventory))
    if divergence is None:
        return
    _problem(
        info,
        "diverging_histories",
        "restore without --name and every expire refuse this store",
        ConfigError(
            f"{divergence.describe()}; keep one history per location: remove the other's "
            "backups with 'cloud-dump delete --name' (after 'cloud-dump keep NAME --release' "
            "for a pinned one), and back copies up under another --cluster"
        ),
    )


def _read_wal(
    archive: WalArchive, inventory: WalInventory, manifests: list[BackupManifest], info: Info
) -> None:
    info.timelines = sorted(set(inventory.segments) | set(inventory.partials))
    pinned = {b.manifest.name for b in info.backups or [] if b.pinned is not None}
    info.gaps, info.pinned_gaps = gaps(inventory, [m for m in manifests if m.name not in pinned],
                                       [m for m in manifests if m.name in pinned])  # fmt: skip
    histories, unread = _histories(archive, inventory, info)
    _mark_switched_away(info, histories, inventory.segment_size)
    info.windows, reach = windows(archive, inventory, histories, manifests, unread)
    for window in info.windows:
        if window.error is not None:
            effect = (
                f"the window of timeline {window.timeline} ends before '{window.unreadable}'"
                if window.latest
                else f"the end of the window of timeline {window.timeline} is unknown"
            )
            _problem(info, "wal_segment", effect, window.error)
    info.backups = [_placed(b, reach, unread) for b in info.backups or []]


def _placed(backup: BackupInfo, reach: Reach, unread: set[int]) -> BackupInfo:
    if backup.manifest.timeline in unread:
        return backup  # its timeline's path is unknown: nothing to say
    return BackupInfo(backup.manifest, backup.pinned, backup.manifest.name in reach.in_window,
                      reach.replays_to.get(backup.manifest.name))  # fmt: skip


def _histories(
    archive: WalArchive, inventory: WalInventory, info: Info
) -> tuple[dict[int, History], set[int]]:
    """The history files read, and the timelines whose file could not be: their windows are
    left out, as their path is unknown."""
    found, unread = {}, set()
    for timeline in sorted(inventory.histories):
        name = f"{timeline:08X}.history"
        try:
            stored = archive.find(name)
            if stored is not None:
                data, _ = archive.read(stored)
                found[timeline] = parse_history(timeline, data.decode("utf-8", "replace"))
        except CloudDumpError as exc:
            unread.add(timeline)
            effect = f"'{name}' could not be read: the window of timeline {timeline} is left out"
            _problem(info, "wal_history", effect, exc)
    return found, unread


def _mark_switched_away(info: Info, histories: dict[int, History], segment_size: int) -> None:
    forks: dict[int, int] = {}
    for history in histories.values():
        for switch in history.switches:
            number = segment_number(switch.lsn, segment_size)
            forks[switch.timeline] = max(forks.get(switch.timeline, number), number)
    info.wal = [
        TimelineWal(t.timeline, t.newest_segment, t.modified,
                    t.timeline in forks and Segment.parse(t.newest_segment, segment_size).number
                    <= forks[t.timeline])
        for t in info.wal
    ]  # fmt: skip


def _read_listing(
    storage: Storage, layout: Layout, manifests: list[BackupManifest], info: Info
) -> None:
    """Stored bytes by kind, incomplete backups, and the newest segment of each timeline with
    its last-modified time (one LIST of the cluster's prefix, or of the whole location in the
    flat layout; one of the open uploads under the backups root)."""
    scope = f"{layout.cluster}/" if layout.cluster else ""
    root = layout.backups_root
    complete = {m.name for m in manifests}
    totals = {"backups": 0, "wal": 0, "incomplete": 0, "other": 0}
    prefixes: dict[str, Prefix] = {}
    sizes: dict[str, int] = {}
    newest: dict[int, tuple[str, float | None]] = {}
    for item in storage.list(scope):
        if item.key.startswith(layout.wal_root):
            totals["wal"] += item.size
            name = wal_file_name(item.key[len(layout.wal_root) :])
            if name is not None and is_segment(name):
                timeline = int(name[:8], 16)
                if timeline not in newest or name > newest[timeline][0]:
                    newest[timeline] = (name, item.modified_s)
            continue
        name = _backup_name(layout, item.key)
        if name in complete:
            totals["backups"] += item.size
        elif name is not None:
            prefixes.setdefault(name, Prefix(name)).keys.append(item.key)
            sizes[item.key] = item.size
        else:
            totals["other"] += item.size
    info.wal = [TimelineWal(t, n, None if m is None else datetime.fromtimestamp(m, UTC))
                for t, (n, m) in sorted(newest.items())]  # fmt: skip
    for upload in storage.list_multipart_uploads(root):
        name = _backup_name(layout, upload.key)
        if name is not None:
            prefixes.setdefault(name, Prefix(name)).uploads.append(upload)
    info.stored_bytes = totals
    _read_incomplete(storage, layout, prefixes, sizes, complete, info)


def _backup_name(layout: Layout, key: str) -> str | None:
    """The backup prefix ``key`` lies in, or None (the WAL archive, check's pings, a key
    directly in the backups root)."""
    root = layout.backups_root
    if not key.startswith(root) or key.startswith((layout.wal_root, PING_PREFIX)):
        return None
    name, sep, _ = key[len(root) :].partition("/")
    return name if sep and name else None


def _read_incomplete(
    storage: Storage,
    layout: Layout,
    prefixes: dict[str, Prefix],
    sizes: dict[str, int],
    complete: set[str],
    info: Info,
) -> None:
    assert info.stored_bytes is not None
    for name, prefix in sorted(prefixes.items()):
        if name not in complete and foreign_objects(layout, prefix):
            info.stored_bytes["other"] += sum(sizes[k] for k in prefix.keys)
            continue  # not a backup's: cleanup leaves it alone, and so does this count
        stored = sum(sizes.get(k, 0) for k in prefix.keys)
        for upload in prefix.uploads:
            try:
                stored += storage.uploaded_bytes(upload.key, upload.upload_id)
            except UploadNotFound:
                continue  # completed or aborted since the LIST
        info.stored_bytes["incomplete"] += stored
        incomplete = Incomplete(name, "stray uploads", len(prefix.keys), len(prefix.uploads),
                                stored)  # fmt: skip
        if any(k.endswith("/" + MANIFEST_NAME) for k in prefix.keys):
            incomplete = replace(incomplete, state="unreadable manifest")
        elif name not in complete:
            incomplete = _claimed(storage, layout, prefix, incomplete, info.now)
        info.incomplete.append(incomplete)


def _claimed(
    storage: Storage, layout: Layout, prefix: Prefix, found: Incomplete, now: datetime
) -> Incomplete:
    """``found`` with what the prefix's claim says: who runs it and whether it is alive, by
    the rule ``cleanup`` removes a run by (its last sign of life older than three heartbeat
    periods); without a claim, ``pinned`` or ``unclaimed`` by whether it holds a pin."""
    base = layout.backup_prefix(prefix.name)
    claim = read_claim(storage, base + CLAIM_NAME)
    if claim is None:
        # cleanup's rule (``cleanup._leftovers``): a pin keeps even a prefix with no manifest.
        return replace(found, state="pinned" if base + KEEP_NAME in prefix.keys else "unclaimed")
    last = _time(claim.get("heartbeat_at")) or _time(claim.get("started_at"))
    every = claim.get("heartbeat_every_s")
    alive = (last is not None and isinstance(every, int | float)
             and (now - last).total_seconds() <= every * MISSED_HEARTBEATS)  # fmt: skip
    return replace(found, state="running" if alive else "silent", run_id=_text(claim, "run_id"),
                   host=_text(claim, "host"), started_at=_text(claim, "started_at"),
                   last_sign_of_life=last)  # fmt: skip


def _text(claim: dict[str, object], key: str) -> str | None:
    value = claim.get(key)
    return None if value is None else str(value)


def _time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _read_verify_result(storage: Storage, layout: Layout) -> VerifyResult | None:
    key = layout.verify_result_key()
    try:
        return VerifyResult.from_json(storage.get(key), key)
    except ObjectNotFound:
        return None
