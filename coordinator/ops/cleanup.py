"""``cloud-dump cleanup``: remove what backups whose coordinator died left in the store.

A backup claims its name first (``backup.claim``), then opens multipart uploads and stores
objects under ``<name>/``, and writes ``manifest.json`` last. A coordinator that is SIGKILLed or
loses its host leaves the claim, which blocks the name, and uploads, which a store such as S3
bills for until they are aborted. For each backup prefix (one LIST of the backups root and one
of its multipart uploads):

- **complete** (``manifest.json``): uploads still open under it are strays (finalize aborts
  them; a killed finalize may not have) and are aborted; a claim beside the manifest (a late
  heartbeat's) is removed. The backup itself is never touched.
- **claimed, no manifest**: a running backup rewrites ``heartbeat_at`` in its claim every
  ``heartbeat_every_s`` seconds (``coordinator.backup.heartbeat``). The backup is dead when its
  last sign of life (the heartbeat, or the start for a claim written before heartbeats) is
  older than ``--older-than`` and than three heartbeat periods: then its uploads are aborted and
  its objects removed, claim last (``workers.backup.abort_backup``, as a failed run does it).
  A backup that is alive is never touched, however long it has run.
- **no claim, no manifest**: what an interrupted abort left. Nothing running owns it (a backup
  claims its name before it stores anything, and the claim is looked for again just before),
  so it is removed whatever its age; a prefix holding anything that is not a backup's file, or
  a pin (``keep.json``), is left alone and named.

Ages are read on this host's clock against the times the coordinators wrote: hosts whose clocks
differ by more than a heartbeat period should keep ``--older-than`` well above it (the default,
24 h, is).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from coordinator.settings import CleanupSettings, Report, layout_of, open_store
from storage.base import MultipartUpload, Storage
from storage.errors import ConfigError, UploadNotFound
from storage.layout import BACKUP_MANIFEST_NAME, KEEP_NAME, MANIFEST_NAME, Layout
from workers.backup import (
    CLAIM_NAME,
    WRAPPED_KEY_NAME,
    AbortRequest,
    BackupRef,
    abort_backup,
    read_claim,
)
from workers.diagnostics import PING_PREFIX

log = logging.getLogger(__name__)

# A claim is dead once this many heartbeat periods passed without one.
MISSED_HEARTBEATS = 3
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_AGE_S = 36500 * 86400.0  # a hundred years: beyond it, dates overflow
# What a backup stores under its prefix (storage.layout, workers.backup).
_BACKUP_FILE = re.compile(
    rf"({re.escape(MANIFEST_NAME)}|{re.escape(CLAIM_NAME)}|{re.escape(WRAPPED_KEY_NAME)}"
    rf"|{re.escape(KEEP_NAME)}"
    rf"|{re.escape(BACKUP_MANIFEST_NAME)}(\.age)?|[0-9A-Za-z_]+\.tar(\.(zst|gz|lz4))?(\.age)?(\.[0-9]{{4,}})?)"
)


def parse_age(text: str, flag: str = "--older-than") -> timedelta:
    """``30m``, ``24h``, ``7d``, ``90s`` as a duration; ``0`` alone may go without a unit.
    ``ConfigError`` naming ``flag`` otherwise: a bare number is refused, as it would be read
    as seconds where an operator may well mean days (``--recovery-window 14``)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or (not match[2] and float(match[1]) != 0):
        raise ConfigError(
            f"{flag} '{text}' is not an age: expected a number with its unit, s, m, h or d "
            "(90s, 30m, 24h, 7d)"
        )
    seconds = float(match[1]) * _UNITS[match[2]]
    if seconds > MAX_AGE_S:
        raise ConfigError(f"{flag} '{text}' is out of range: at most 36500d")
    return timedelta(seconds=seconds)


@dataclass
class Prefix:
    """What the store holds under one backup name."""

    name: str
    keys: list[str] = field(default_factory=list)
    uploads: list[MultipartUpload] = field(default_factory=list)
    has_manifest: bool = False
    has_claim: bool = False


def run_cleanup(args: CleanupSettings, report: Report) -> None:
    """Find and (unless ``--dry-run``) remove the debris; one line per action on ``report``."""
    older_than = parse_age(args.older_than)
    layout = layout_of(args)
    storage = open_store(args)
    try:
        actions = cleanup(storage, layout, older_than, datetime.now(UTC), dry_run=args.dry_run)
    finally:
        storage.close()
    for line in actions:
        if args.dry_run:
            line = "(dry run) would " + line.replace("removed", "remove", 1).replace(
                "aborted", "abort", 1)
        report(line)
    if not actions:
        report(f"nothing to clean up in {layout.describe_backups_root(storage.url)}")


def cleanup(
    storage: Storage, layout: Layout, older_than: timedelta, now: datetime, *, dry_run: bool
) -> list[str]:
    """What was (``dry_run``: would be) removed, one phrase each."""
    actions: list[str] = []
    for prefix in backup_prefixes(storage, layout).values():
        if prefix.has_manifest:
            actions += _strays(storage, layout, prefix, dry_run)
        elif prefix.has_claim:
            actions += _dead_run(storage, layout, prefix, older_than, now, dry_run)
        elif prefix.keys or prefix.uploads:
            actions += _leftovers(storage, layout, prefix, dry_run)
    return actions


def backup_prefixes(storage: Storage, layout: Layout) -> dict[str, Prefix]:
    root = layout.backups_root
    skipped = (layout.wal_root, PING_PREFIX)
    found: dict[str, Prefix] = {}

    def prefix_of(key: str) -> Prefix | None:
        if any(key.startswith(s) for s in skipped):
            return None
        name, sep, _ = key[len(root):].partition("/")
        if not sep or not name:
            return None
        return found.setdefault(name, Prefix(name))

    for info in storage.list(root):
        prefix = prefix_of(info.key)
        if prefix is None:
            continue
        prefix.keys.append(info.key)
        leaf = info.key[len(root) + len(prefix.name) + 1:]
        prefix.has_manifest |= leaf == MANIFEST_NAME
        prefix.has_claim |= leaf == CLAIM_NAME
    for upload in storage.list_multipart_uploads(root):
        prefix = prefix_of(upload.key)
        if prefix is not None:
            prefix.uploads.append(upload)
    return found


def _strays(storage: Storage, layout: Layout, prefix: Prefix, dry_run: bool) -> list[str]:
    actions = []
    for upload in prefix.uploads:
        if not dry_run:
            with contextlib.suppress(UploadNotFound):
                storage.abort_multipart(upload.key, upload.upload_id)
        actions.append(f"aborted stray upload {upload.upload_id} of '{upload.key}' beside the "
                       f"complete backup '{prefix.name}'")  # fmt: skip
    if prefix.has_claim:
        claim_key = layout.backup_prefix(prefix.name) + CLAIM_NAME
        if not dry_run:
            storage.delete(claim_key)
        actions.append(f"removed the stray claim '{claim_key}' of the complete backup "
                       f"'{prefix.name}'")  # fmt: skip
    return actions


def _dead_run(
    storage: Storage,
    layout: Layout,
    prefix: Prefix,
    older_than: timedelta,
    now: datetime,
    dry_run: bool,
) -> list[str]:
    claim_key = layout.backup_prefix(prefix.name) + CLAIM_NAME
    claim = read_claim(storage, claim_key)
    if claim is None:
        return []  # finalized or removed since the LIST
    last, every = _last_sign_of_life(claim)
    if last is None:
        log.warning("backup '%s': its claim records no start time; left alone", prefix.name)
        return []
    silent = now - last
    limit = older_than
    if every is not None:
        limit = max(limit, timedelta(seconds=every * MISSED_HEARTBEATS))
    if silent <= limit:
        log.info("backup '%s' (run %s) left alone: its last sign of life was %.0f s ago, "
                 "within %.0f s (--older-than, or three heartbeat periods)", prefix.name,
                 claim.get("run_id", "?"), silent.total_seconds(),
                 limit.total_seconds())  # fmt: skip
        return []
    what = (f"the claim, {len(prefix.keys) - 1} object(s) and {len(prefix.uploads)} upload(s) "
            f"of backup '{prefix.name}' (run {claim.get('run_id', '?')} on "
            f"{claim.get('host', '?')}, started {claim.get('started_at', '?')}, silent for "
            f"{_age(silent)})")  # fmt: skip
    if not dry_run:
        backup = BackupRef(name=prefix.name, cluster=layout.cluster)
        abort_backup(storage, AbortRequest(backup=backup, run_id=str(claim.get("run_id")),
                                           uploads=[]))  # fmt: skip
    return [f"removed {what}"]


def foreign_objects(layout: Layout, prefix: Prefix) -> list[str]:
    """The keys under ``prefix`` that are not files a backup stores."""
    base = layout.backup_prefix(prefix.name)
    return [k for k in prefix.keys if not _BACKUP_FILE.fullmatch(k[len(base):])]


def _leftovers(storage: Storage, layout: Layout, prefix: Prefix, dry_run: bool) -> list[str]:
    base = layout.backup_prefix(prefix.name)
    foreign = foreign_objects(layout, prefix)
    if foreign:
        log.warning("'%s' holds objects that are not a backup's (%s): left alone", base,
                    ", ".join(foreign[:3]))  # fmt: skip
        return []
    if base + KEEP_NAME in prefix.keys:
        # A pin says someone wants this backup: without its manifest it is not restorable as
        # it is, but what it holds may still be worth recovering by hand.
        log.warning("'%s' is pinned (%s) but has no %s: left alone; release it with "
                    "'cloud-dump keep %s --release' to let cleanup remove it", base, KEEP_NAME,
                    MANIFEST_NAME, prefix.name)  # fmt: skip
        return []
    if not dry_run:
        if read_claim(storage, base + CLAIM_NAME) is not None:
            return []  # a new run claimed the name since the LIST: it owns the prefix now
        for upload in prefix.uploads:
            with contextlib.suppress(UploadNotFound):
                storage.abort_multipart(upload.key, upload.upload_id)
        storage.delete_many(prefix.keys)
    return [f"removed {len(prefix.keys)} object(s) and {len(prefix.uploads)} upload(s) of the "
            f"unclaimed, incomplete backup '{prefix.name}'"]  # fmt: skip


def _last_sign_of_life(claim: dict[str, object]) -> tuple[datetime | None, float | None]:
    """The claim's newest time (heartbeat, else start) and its heartbeat period, if any."""
    every = claim.get("heartbeat_every_s")
    period = float(every) if isinstance(every, int | float) else None
    for name in ("heartbeat_at", "started_at"):
        text = claim.get(name)
        if isinstance(text, str):
            with contextlib.suppress(ValueError):
                when = datetime.fromisoformat(text)
                return (when if when.tzinfo else when.replace(tzinfo=UTC)), period
    return None, period


def _age(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
