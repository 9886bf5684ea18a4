"""Plain restore of one backup into an empty PGDATA (and its tablespace directories).

Order of work, so that every refusal happens before the disk is touched:

1. ``manifest.json`` (missing → ``BackupNotFound``), the decryption inputs (missing →
   ``ConfigError``; a wrong passphrase or identity → ``DecryptionFailed``, proven on the small
   ``backup_manifest`` object), PostgreSQL's ``backup_manifest`` itself, and every target
   directory (absent or empty, else ``TargetNotEmpty``).
2. Per archive: ``RangedReader`` (one per stored object: ``open_objects``) → age → decompression →
   ``extract_archive``; the base archive into PGDATA, each tablespace archive into its recorded
   or remapped location.
3. Every file checked against ``backup_manifest``; then ``coordinator.restore.pgdata`` finishes the
   directory: tablespace links and ``tablespace_map``, the modes the backed-up cluster had
   (0700, or 0750 with group access), ``global/pg_control`` made unusable without
   ``backup_label`` (``coordinator.restore.pgcontrol``), and the manifest left in PGDATA, as
   ``pg_basebackup`` does in plain format, updated for the files restore changed. No
   ``recovery.signal``: the WAL in the base archive makes the copy consistent on its own.
   Then ``before_startable`` (recovery settings), and, when run as root, the change of owner
   (``coordinator.restore.ownership``), both before ``pg_control`` makes the directory startable.

Where each archive goes, and what a failed run takes back, is ``coordinator.restore.targetdirs``:
tablespace locations are never resolved against the current directory, an in-place tablespace
(PostgreSQL 16+, recorded at ``pg_tblspc/<oid>``) is restored as that directory inside PGDATA.

Failure handling (the choice, and why): files are extracted in place, not into a sibling
directory renamed at the end, because a rename cannot cover tablespaces living on other file
systems, nor a PGDATA that is a mount point. Instead ``global/pg_control`` is written under a
temporary name and renamed into place only after everything is verified and synced: PostgreSQL
refuses to start a directory without it, so a restore interrupted at any moment, even by SIGKILL,
never leaves a PGDATA that looks usable. On an exception, what this run created is removed: the
directories it created (emptied of what it wrote, then removed up to the topmost one it made, each
only if nothing else is in it), or the contents of target directories that existed, which were
empty when checked. Nothing else is ever deleted.

Each target directory is held (an exclusive ``flock`` on it, see ``coordinator.restore.targetdirs``)
from before the emptiness check that counts until the restore ends: a second restore into the
same directory refuses (``TargetNotEmpty``) instead of mixing its files with the first's and then
removing them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from coordinator.catalog import read_manifest
from coordinator.codecs import open_plaintext
from coordinator.crypto import decrypt_bytes, passphrase_identity, read_identities
from coordinator.rangedread import naming_the_object, open_objects, range_size_for
from coordinator.restore.extract import ExtractResult, extract_archive, naming
from coordinator.restore.ownership import Owner, announce, give_to
from coordinator.restore.pgdata import (
    TABLESPACE_MAP,
    DataModes,
    data_modes,
    fsync_dir,
    invalidate_control_file,
    point_tablespaces,
    set_modes,
    write_file,
)
from coordinator.restore.pgmanifest import replace_entries
from coordinator.restore.targetdirs import DIR_MODE, CreatedPaths
from coordinator.restore.targetdirs import TargetPlan as TargetPlan
from coordinator.restore.targetdirs import plan_targets as plan_targets
from coordinator.tarwalk import (
    FileFacts,
    load_backup_manifest,
    manifest_algorithm,
    verify_against_manifest,
)
from storage.base import Storage, sha256_hex
from storage.errors import (
    DecryptionFailed,
    IntegrityError,
    ObjectNotFound,
)
from storage.layout import Layout
from storage.manifest import ArchiveRecord, BackupManifest

log = logging.getLogger(__name__)

PG_CONTROL = "global/pg_control"
BACKUP_MANIFEST = "backup_manifest"


@dataclass(frozen=True)
class RestoreSummary:
    backup: str
    pgdata: Path
    bytes_fetched: int
    bytes_written: int
    files_verified: int
    seconds: float


@dataclass(frozen=True)
class RestoreProgress:
    """Reported after each range is consumed: stored bytes fetched so far, out of the total."""

    archive: str
    bytes_fetched: int
    bytes_total: int


ProgressCallback = Callable[[RestoreProgress], None]


def restore_backup(
    storage: Storage,
    layout: Layout,
    name: str,
    pgdata: Path,
    *,
    identity_paths: Sequence[Path] = (),
    passphrase: str | None = None,
    tablespace_mapping: Mapping[str, str] | None = None,
    parallel: int = 4,
    progress: ProgressCallback | None = None,
    before_startable: Callable[[TargetPlan], None] | None = None,
    owner: Owner | None = None,
    owned_paths: Sequence[Path] = (),
) -> RestoreSummary:
    """Restore backup ``name`` into ``pgdata`` (see the module docstring for the guarantees).

    ``before_startable`` is called with the plan once every file is written and verified, just
    before ``global/pg_control`` makes the directory startable: what it writes (recovery
    settings, signal files) is in place before the server could ever start, and is undone with
    the rest if it raises. Then, with ``owner`` (see ``coordinator.restore.ownership``), everything
    the restore wrote, and each of ``owned_paths`` that exists (files ``before_startable`` wrote
    outside PGDATA), is given to that owner.
    """
    started = time.monotonic()
    manifest = read_manifest(storage, layout, name)
    identities = resolve_identities(storage, manifest, identity_paths, passphrase)
    pg_manifest = fetch_backup_manifest(storage, manifest, identities)
    entries = load_backup_manifest(pg_manifest)
    plan = plan_targets(manifest, pgdata, tablespace_mapping or {})
    run = _ArchiveRun(
        storage, manifest, identities, manifest_algorithm(entries), parallel, progress
    )
    created = CreatedPaths()
    try:
        for path in (plan.pgdata, *plan.outside().values()):
            created.prepare(path)
        announce(owner)  # a warning about owners, once nothing refused the restore
        results = [run.restore(archive, plan) for archive in _base_first(manifest.archives)]
        observed: dict[str, FileFacts] = {}
        for result in results:
            observed.update(result.files)
        verify_against_manifest(pg_manifest, observed)
        _complete_pgdata(name, plan, pg_manifest, results, before_startable)
        if owner is not None:
            # Before pg_control goes in place: the server may start from then on.
            give_to(owner, [plan.pgdata, *plan.outside().values()],
                    [*created.directories, *owned_paths])
            log.info("gave everything restored to %s", owner.name)
        _make_startable(plan, results, created)
    except BaseException:
        created.undo()  # while the targets are still held: nobody else has written in them
        raise
    finally:
        created.release()
    return RestoreSummary(
        backup=name,
        pgdata=plan.pgdata,
        bytes_fetched=run.bytes_fetched + manifest.backup_manifest_size,
        bytes_written=sum(r.bytes_written for r in results) + len(pg_manifest),
        files_verified=len(entries),
        seconds=time.monotonic() - started,
    )


def resolve_identities(
    storage: Storage,
    manifest: BackupManifest,
    identity_paths: Sequence[Path],
    passphrase: str | None,
) -> list[str] | None:
    """The age identities that decrypt the backup; None when it is not encrypted.

    A passphrase backup's wrapped key is checked against the size and SHA-256 its manifest
    records before the passphrase is tried on it: damage is ``IntegrityError`` naming the key
    (exit 15), and only a key that is whole can make the passphrase wrong
    (``DecryptionFailed``, exit 14).
    """
    encryption = manifest.encryption
    if encryption is None:
        return None
    if identity_paths:
        # Also right for passphrase mode: the unwrapped key may have been saved to a file.
        return read_identities(identity_paths)

    def read_wrapped(key: str) -> bytes:
        data = _get_object(storage, manifest.name, key)
        encryption.check_wrapped_identity(data)
        return data

    try:
        identity = passphrase_identity(
            f"backup '{manifest.name}'", encryption.mode, encryption.wrapped_identity_key,
            lambda: passphrase, read_wrapped,
        )  # fmt: skip
    except DecryptionFailed as exc:
        if encryption.wrapped_identity_recorded:
            raise
        raise DecryptionFailed(
            f"{exc} (or the key is damaged: this backup's manifest.json, written by an older "
            "cloud-dump, records no checksum of it)"
        ) from exc
    return [identity]


def fetch_backup_manifest(
    storage: Storage, manifest: BackupManifest, identities: Sequence[str] | None
) -> bytes:
    """PostgreSQL's backup_manifest, checked against manifest.json and decrypted.

    Decrypting it first proves the identities before any archive byte is written.
    """
    key = manifest.backup_manifest_key
    data = _get_object(storage, manifest.name, key)
    if (
        len(data) != manifest.backup_manifest_size
        or sha256_hex(data) != manifest.backup_manifest_sha256
    ):
        raise IntegrityError(f"object '{key}' does not match its recorded size and sha256")
    if identities is None:
        return data
    return decrypt_bytes(data, identities, f"backup '{manifest.name}' (object '{key}')")


def _get_object(storage: Storage, backup: str, key: str) -> bytes:
    try:
        return storage.get(key)
    except ObjectNotFound:
        raise IntegrityError(f"backup '{backup}' is missing object '{key}'") from None


# --- step 2: archives -----------------------------------------------------------------------------


class _ArchiveRun:
    """Fetches and extracts archives of one backup, counting the stored bytes it read."""

    def __init__(
        self,
        storage: Storage,
        manifest: BackupManifest,
        identities: Sequence[str] | None,
        algorithm: str | None,
        parallel: int,
        progress: ProgressCallback | None,
    ) -> None:
        self.storage = storage
        self.manifest = manifest
        self.identities = identities
        self.algorithm = algorithm
        self.parallel = parallel
        self.progress = progress
        self.bytes_fetched = 0

    def restore(self, archive: ArchiveRecord, plan: TargetPlan) -> ExtractResult:
        base = archive.tablespace_oid is None
        target = plan.pgdata if base else plan.tablespaces[str(archive.tablespace_oid)]
        if str(archive.tablespace_oid) in plan.in_place:
            # Inside PGDATA, under the pg_tblspc directory the base archive (first) made.
            with naming(target):
                target.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        what = f"archive '{archive.key}'"
        reader = open_objects(
            self.storage,
            archive.stored_objects,
            range_bytes=range_size_for(archive.largest_part),
            parallel=self.parallel,
            backup=self.manifest.name,
            on_bytes=lambda n: self._fetched(archive.name, n),
        )
        with contextlib.closing(reader), naming_the_object(reader):
            identities = self.identities if archive.encrypted else None
            plain = open_plaintext(
                cast(BinaryIO, reader), archive.compression, identities=identities, what=what
            )
            result = extract_archive(
                cast(BinaryIO, plain),
                target,
                tablespace_links=plan.outside() if base else None,
                algorithm=self.algorithm,
                manifest_prefix="" if base else f"pg_tblspc/{archive.tablespace_oid}/",
                held_back=(PG_CONTROL,) if base else (),
                what=what,
            )
            reader.drain()  # each object's sha256 is checked at its end
        return result

    def _fetched(self, archive: str, n: int) -> None:
        self.bytes_fetched += n
        if self.progress is not None:
            self.progress(RestoreProgress(archive, self.bytes_fetched, self.manifest.stored_size))


def _base_first(archives: Sequence[ArchiveRecord]) -> list[ArchiveRecord]:
    return sorted(archives, key=lambda a: (a.tablespace_oid is not None, a.tablespace_oid or 0))


# --- step 3: completing PGDATA --------------------------------------------------------------------


def _complete_pgdata(
    backup: str,
    plan: TargetPlan,
    pg_manifest: bytes,
    results: Sequence[ExtractResult],
    before_startable: Callable[[TargetPlan], None] | None,
) -> None:
    """Everything but the step that makes PGDATA startable (``_make_startable``)."""
    control = _held_back(results).get(PG_CONTROL)
    if control is None:
        raise IntegrityError(f"the base archive has no '{PG_CONTROL}'")
    modes = _modes_of(results)
    changed: dict[str, bytes] = {}
    new_control = invalidate_control_file(control, backup)
    if new_control is not None:
        changed[PG_CONTROL] = new_control
    new_map = point_tablespaces(plan.pgdata, plan.tablespaces, plan.in_place, modes)
    if new_map is not None:
        changed[TABLESPACE_MAP] = new_map
    # Left in PGDATA as pg_basebackup does, describing the files as restored: pg_verifybackup
    # still verifies the copy.
    manifest = replace_entries(pg_manifest, changed) if changed else pg_manifest
    write_file(plan.pgdata / BACKUP_MANIFEST, manifest, modes.file)
    set_modes([plan.pgdata, *plan.tablespaces.values()], modes)
    if before_startable is not None:
        before_startable(plan)


def _make_startable(
    plan: TargetPlan, results: Sequence[ExtractResult], created: CreatedPaths
) -> None:
    # Everything durable before pg_control makes the directory startable.
    created.sync()
    for name, path in _held_back(results).items():
        with naming(path):
            path.rename(plan.pgdata / name)
    fsync_dir(plan.pgdata / "global")


def _held_back(results: Sequence[ExtractResult]) -> dict[str, Path]:
    return {name: path for r in results for name, path in r.held_back.items()}


def _modes_of(results: Sequence[ExtractResult]) -> DataModes:
    """The modes the base archive's ``global`` directory implies for PGDATA and the rest."""
    return data_modes(next((r.global_dir_mode for r in results if r.global_dir_mode), None))
