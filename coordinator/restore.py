"""Plain restore of one backup into an empty PGDATA (and its tablespace directories).

Order of work, so that every refusal happens before the disk is touched:

1. ``manifest.json`` (missing → ``BackupNotFound``), the decryption inputs (missing →
   ``ConfigError``; a wrong passphrase or identity → ``DecryptionFailed``, proven on the small
   ``backup_manifest`` object), PostgreSQL's ``backup_manifest`` itself, and every target
   directory (absent or empty, else ``TargetNotEmpty``).
2. Per archive: ``RangedReader`` → age → decompression → ``extract_archive``; the base archive
   into PGDATA, each tablespace archive into its recorded or remapped location.
3. Every file checked against ``backup_manifest``; the manifest is left in PGDATA, as
   ``pg_basebackup`` does in plain format. No ``recovery.signal``: the WAL in the base archive
   makes the copy consistent on its own.

Failure handling (the choice, and why): files are extracted in place, not into a sibling
directory renamed at the end, because a rename cannot cover tablespaces living on other file
systems, nor a PGDATA that is a mount point. Instead ``global/pg_control`` is written under a
temporary name and renamed into place only after everything is verified and synced: PostgreSQL
refuses to start a directory without it, so a restore interrupted at any moment, even by SIGKILL,
never leaves a PGDATA that looks usable. On an exception, what this run created is removed: the
directories it created (from the topmost one it made), or the contents of target directories that
existed, which were empty when checked. Nothing else is ever deleted.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from coordinator.crypto import decrypt_bytes, read_identities, unwrap_identity
from coordinator.extract import (
    ExtractResult,
    FileFacts,
    extract_archive,
    load_backup_manifest,
    manifest_algorithm,
    rewrite_tablespace_map,
    verify_against_manifest,
)
from coordinator.fetch import RangedReader, open_plaintext, range_size_for
from storage.base import Storage, sha256_hex
from storage.errors import (
    BackupNotFound,
    ConfigError,
    IntegrityError,
    ObjectNotFound,
    PermanentStorageError,
    TargetNotEmpty,
)
from storage.layout import Layout
from storage.manifest import ArchiveRecord, BackupManifest

PG_CONTROL = "global/pg_control"
TABLESPACE_MAP = "tablespace_map"
BACKUP_MANIFEST = "backup_manifest"
_DIR_MODE = 0o700


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


@dataclass(frozen=True)
class TargetPlan:
    pgdata: Path
    tablespaces: dict[str, Path]  # oid → directory this restore puts the tablespace in


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
) -> RestoreSummary:
    """Restore backup ``name`` into ``pgdata`` (see the module docstring for the guarantees).

    ``before_startable`` is called with the plan once every file is written and verified, just
    before ``global/pg_control`` makes the directory startable: what it writes (recovery
    settings, signal files) is in place before the server could ever start, and is undone with
    the rest if it raises.
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
    created = _CreatedPaths()
    try:
        for path in (plan.pgdata, *plan.tablespaces.values()):
            created.prepare(path)
        results = [run.restore(archive, plan) for archive in _base_first(manifest.archives)]
        observed: dict[str, FileFacts] = {}
        for result in results:
            observed.update(result.files)
        verify_against_manifest(pg_manifest, observed)
        _complete_pgdata(plan, pg_manifest, results, before_startable)
    except BaseException:
        created.undo()
        raise
    return RestoreSummary(
        backup=name,
        pgdata=plan.pgdata,
        bytes_fetched=run.bytes_fetched + manifest.backup_manifest_size,
        bytes_written=sum(r.bytes_written for r in results) + len(pg_manifest),
        files_verified=len(entries),
        seconds=time.monotonic() - started,
    )


# --- step 1: everything checked before the disk is touched ---------------------------------------


def read_manifest(storage: Storage, layout: Layout, name: str) -> BackupManifest:
    key = layout.manifest_key(name)
    try:
        data = storage.get(key)
    except ObjectNotFound:
        raise BackupNotFound(f"backup '{name}' not found in {storage.url}") from None
    try:
        manifest = BackupManifest.from_json(data, key)
    except PermanentStorageError as exc:
        raise IntegrityError(str(exc)) from exc
    if manifest.name != name:
        raise IntegrityError(f"manifest '{key}' describes backup '{manifest.name}', not '{name}'")
    return manifest


def resolve_identities(
    storage: Storage,
    manifest: BackupManifest,
    identity_paths: Sequence[Path],
    passphrase: str | None,
) -> list[str] | None:
    """The age identities that decrypt the backup; None when it is not encrypted."""
    encryption = manifest.encryption
    if encryption is None:
        return None
    if identity_paths:
        # Also right for passphrase mode: the unwrapped key may have been saved to a file.
        return read_identities(identity_paths)
    if encryption.mode == "recipients":
        raise ConfigError(
            f"backup '{manifest.name}' is encrypted to age recipients: "
            "an identity file that matches one of them is needed"
        )
    if passphrase is None:
        raise ConfigError(f"backup '{manifest.name}' is encrypted with a passphrase: none given")
    if encryption.wrapped_identity_key is None:
        raise IntegrityError(f"backup '{manifest.name}' records no wrapped key for its passphrase")
    wrapped = _get_object(storage, manifest.name, encryption.wrapped_identity_key)
    return [unwrap_identity(wrapped, passphrase)]


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


def plan_targets(
    manifest: BackupManifest, pgdata: Path, tablespace_mapping: Mapping[str, str]
) -> TargetPlan:
    """Where each archive goes; ``TargetNotEmpty``/``ConfigError`` before anything is written."""
    mapping = _normalized_mapping(tablespace_mapping)
    unused = set(mapping)
    tablespaces: dict[str, Path] = {}
    for archive in manifest.archives:
        if archive.tablespace_oid is None:
            continue
        if not archive.tablespace_location:
            raise IntegrityError(
                f"backup '{manifest.name}' records no location for tablespace "
                f"{archive.tablespace_oid}"
            )
        old = os.path.normpath(archive.tablespace_location)
        unused.discard(old)
        tablespaces[str(archive.tablespace_oid)] = Path(mapping.get(old, old))
    if unused:
        raise ConfigError(
            "tablespace mapping names no tablespace of backup "
            f"'{manifest.name}': {', '.join(sorted(unused))}"
        )
    plan = TargetPlan(pgdata.absolute(), tablespaces)
    _check_distinct(plan)
    for path in (plan.pgdata, *tablespaces.values()):
        _check_empty(path)
    return plan


def _normalized_mapping(tablespace_mapping: Mapping[str, str]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for old, new in tablespace_mapping.items():
        if not (Path(old).is_absolute() and Path(new).is_absolute()):
            raise ConfigError(f"tablespace mapping '{old}={new}' must use absolute paths")
        mapping[os.path.normpath(old)] = os.path.normpath(new)
    return mapping


def _check_distinct(plan: TargetPlan) -> None:
    paths = [plan.pgdata, *plan.tablespaces.values()]
    for i, one in enumerate(paths):
        for other in paths[i + 1 :]:
            if one == other or one.is_relative_to(other) or other.is_relative_to(one):
                raise ConfigError(f"restore targets '{one}' and '{other}' overlap")


def _check_empty(path: Path) -> None:
    if not path.exists():
        if path.is_symlink():
            raise TargetNotEmpty(f"restore target '{path}' is a dangling symbolic link")
        return
    if not path.is_dir():
        raise TargetNotEmpty(f"restore target '{path}' exists and is not a directory")
    with os.scandir(path) as entries:
        if next(entries, None) is not None:
            raise TargetNotEmpty(f"restore target '{path}' is not empty")


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
        what = f"archive '{archive.key}'"
        reader = RangedReader(
            self.storage,
            archive.key,
            archive.stored_size,
            range_bytes=range_size_for(max((p.size for p in archive.parts), default=0)),
            parallel=self.parallel,
            sha256=archive.sha256,
            backup=self.manifest.name,
            on_bytes=lambda n: self._fetched(archive.name, n),
        )
        with contextlib.closing(reader):
            identities = self.identities if archive.encrypted else None
            plain = open_plaintext(
                cast(BinaryIO, reader), archive.compression, identities=identities, what=what
            )
            result = extract_archive(
                cast(BinaryIO, plain),
                target,
                tablespace_links=plan.tablespaces if base else None,
                algorithm=self.algorithm,
                manifest_prefix="" if base else f"pg_tblspc/{archive.tablespace_oid}/",
                held_back=(PG_CONTROL,) if base else (),
                what=what,
            )
            plain.drain()
            reader.drain()  # the object's sha256 is checked at its end
        return result

    def _fetched(self, archive: str, n: int) -> None:
        self.bytes_fetched += n
        if self.progress is not None:
            self.progress(RestoreProgress(archive, self.bytes_fetched, self.manifest.stored_size))


def _base_first(archives: Sequence[ArchiveRecord]) -> list[ArchiveRecord]:
    return sorted(archives, key=lambda a: (a.tablespace_oid is not None, a.tablespace_oid or 0))


# --- step 3: completing PGDATA --------------------------------------------------------------------


def _complete_pgdata(
    plan: TargetPlan,
    pg_manifest: bytes,
    results: Sequence[ExtractResult],
    before_startable: Callable[[TargetPlan], None] | None,
) -> None:
    held_back = {name: path for r in results for name, path in r.held_back.items()}
    if PG_CONTROL not in held_back:
        raise IntegrityError(f"the base archive has no '{PG_CONTROL}'")
    _write_file(plan.pgdata / BACKUP_MANIFEST, pg_manifest)
    _point_tablespaces(plan)
    if before_startable is not None:
        before_startable(plan)
    # Everything durable before pg_control makes the directory startable.
    os.sync()
    for name, path in held_back.items():
        path.rename(plan.pgdata / name)
    _fsync_dir(plan.pgdata / "global")
    plan.pgdata.chmod(_DIR_MODE)


def _point_tablespaces(plan: TargetPlan) -> None:
    """pg_tblspc/<oid> links to the restored locations, and a tablespace_map that agrees.

    A tar-format backup carries a tablespace_map instead of links; PostgreSQL recreates the links
    from it at startup, so it must name the new locations when tablespaces were remapped.
    """
    tblspc = plan.pgdata / "pg_tblspc"
    tblspc.mkdir(mode=_DIR_MODE, exist_ok=True)
    for oid, location in plan.tablespaces.items():
        link = tblspc / oid
        if link.is_symlink():
            continue  # re-pointed during extraction
        if link.is_dir():
            link.rmdir()  # an empty placeholder; fails (as it should) if it holds anything
        link.symlink_to(location)
    map_path = plan.pgdata / TABLESPACE_MAP
    if map_path.exists():
        _write_file(map_path, rewrite_tablespace_map(map_path.read_bytes(), plan.tablespaces))


def _write_file(path: Path, data: bytes) -> None:
    temp = path.with_name(path.name + ".cloud-dump-tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    temp.replace(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _CreatedPaths:
    """Target directories this run made or filled, and how to take them back on failure."""

    def __init__(self) -> None:
        self._created: list[Path] = []  # topmost directory this run created
        self._filled: list[Path] = []  # existed (empty) before this run

    def prepare(self, path: Path) -> None:
        if path.exists():
            self._filled.append(path)
            return
        top = path
        while not top.parent.exists():
            top = top.parent
        path.mkdir(mode=_DIR_MODE, parents=True)
        self._created.append(top)

    def undo(self) -> None:
        for top in self._created:
            _remove_tree(top)
        for path in self._filled:
            with contextlib.suppress(FileNotFoundError):
                for child in path.iterdir():
                    _remove_tree(child)


def _remove_tree(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)  # never follows the tablespace links inside
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
