"""The units of work of ``verify --deep``: read one tablespace archive, or a batch of archived
WAL segments, back to their contents, writing nothing.

- ``check_archive``: the archive is read as restore reads it (``coordinator.rangedread``,
  SHA-256 of the stored object checked at its end), decrypted, decompressed and walked as tar
  (``coordinator.tarwalk`` with the sink that discards); every file's size and checksum are
  compared with PostgreSQL's ``backup_manifest`` (whose own ``Manifest-Checksum`` is checked
  first), for the files this archive holds: ``pg_tblspc/<oid>/`` for a tablespace's, everything
  else for the base archive.
- ``check_wal``: each segment is read as wal-fetch reads it (``coordinator.walarchive``:
  decrypted, decompressed, SHA-256 of the original file, first page at the address its name
  says) and its system identifier compared with the backup's.

What is found wrong (damaged bytes, a file that differs, a key that does not decrypt, no key at
all) comes back as ``problems``, one message each; only a failure to reach the store raises.
Requests carry facts (keys, sizes, checksums, names), never a key or a passphrase: the
decryption keys are the caller's ``VerifyKeys`` (the coordinator's own options in its threads,
a worker's own environment on a worker, see ``tasks.verify``).

One unit reads at most ``ranges_in_flight`` ranges of the archive at once (64 MiB or more each,
``coordinator.rangedread``), and one WAL segment at a time.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from pydantic import BaseModel, Field

from coordinator.codecs import open_plaintext
from coordinator.crypto import decrypt_bytes, passphrase_identity, read_identities
from coordinator.rangedread import naming_the_object, open_objects, range_size_for
from coordinator.tarwalk import (
    DISCARD,
    ManifestEntry,
    load_backup_manifest,
    manifest_algorithm,
    manifest_problems,
    walk_tar,
)
from coordinator.walarchive import Keys, StoredWal, WalArchive
from coordinator.walheader import segment_system_identifier
from storage.base import Storage, sha256_hex
from storage.errors import ConfigError, DecryptionFailed, IntegrityError, ObjectNotFound
from storage.layout import Layout
from storage.manifest import StoredObject, check_stored
from storage.walnames import log_prefix
from workers.location import StorageBound
from workers.staging import Stage


class ArchiveCheckRequest(StorageBound):
    """One archive of one backup, and what ``manifest.json`` records of it and its backup."""

    backup: str
    key: str
    stored_size: int
    sha256: str
    part_size: int
    # Every object of an archive stored as several (``ArchiveRecord.objects``); empty: the one
    # object at ``key``.
    objects: list[StoredObject] = Field(default_factory=list)
    compression: str
    encrypted: bool
    tablespace_oid: int | None = None
    # Every tablespace archive of the backup: the base archive holds what is outside them.
    tablespace_oids: list[int] = Field(default_factory=list)
    backup_manifest_key: str
    backup_manifest_size: int
    backup_manifest_sha256: str
    encryption_mode: str | None = None  # "recipients" or "passphrase"; None: not encrypted
    wrapped_identity_key: str | None = None
    # What manifest.json records of the wrapped key (None: a manifest of format version 1).
    wrapped_identity_size: int | None = None
    wrapped_identity_sha256: str | None = None
    ranges_in_flight: int = 4

    def facts(self) -> dict[str, object]:
        return {"backup": self.backup, "archive": self.key, "bytes": self.stored_size}


class ArchiveCheckResult(BaseModel):
    key: str
    files: int = 0
    bytes_read: int = 0  # stored bytes read back
    bytes_checked: int = 0  # bytes of the files in the archive that backup_manifest lists
    problems: list[str] = Field(default_factory=list)


class WalCheckRequest(StorageBound):
    """Segments of one WAL archive to read back, and the system they must belong to."""

    cluster: str | None = None
    wal_prefix: str
    segments: list[str]
    system_identifier: str

    def facts(self) -> dict[str, object]:
        first, last = self.segments[0], self.segments[-1]
        return {"wal": f"{first}..{last}", "segments": len(self.segments)}


class WalCheckResult(BaseModel):
    segments: int = 0
    bytes_read: int = 0  # original bytes of the segments read
    problems: list[str] = Field(default_factory=list)


@dataclass
class VerifyKeys:
    """The keys a deep check decrypts with: identity files (``--identity-key``,
    ``CLOUD_DUMP_IDENTITY_KEY``) or a passphrase (called only when one is needed). ``holder``
    names whose keys they are, for the message when they are missing ("this command", "worker
    'w1@host'"); ``hint`` says where such a holder takes them from."""

    identity_paths: list[Path]
    passphrase: Callable[[], str | None]
    holder: str
    hint: str
    _backups: dict[str, list[str]] = field(default_factory=dict)
    _wal: Keys | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def for_backup(self, storage: Storage, request: ArchiveCheckRequest) -> list[str]:
        """The identities that decrypt ``request``'s backup; unwrapped at most once per
        wrapped key (scrypt costs ~2 s). ``ConfigError`` without a key that could."""
        cache_key = f"{request.encryption_mode}:{request.wrapped_identity_key}"
        with self._lock:
            if cache_key not in self._backups:
                self._backups[cache_key] = self._resolve_backup(storage, request)
            return self._backups[cache_key]

    def _resolve_backup(self, storage: Storage, request: ArchiveCheckRequest) -> list[str]:
        # Identity files and a passphrase may both be given, for a store holding backups of
        # both modes: a passphrase backup is opened with the passphrase when there is one.
        passphrase_mode = request.encryption_mode == "passphrase"
        if self.identity_paths and not (passphrase_mode and self.passphrase() is not None):
            return read_identities(self.identity_paths)

        def read_wrapped(key: str) -> bytes:
            # Damage is named as such (IntegrityError), before the passphrase is blamed.
            data = storage.get(key)
            size, sha256 = request.wrapped_identity_size, request.wrapped_identity_sha256
            if size is not None and sha256 is not None:
                check_stored(data, key, size, sha256)
            return data

        return [passphrase_identity(
            f"backup '{request.backup}'", request.encryption_mode, request.wrapped_identity_key,
            self.passphrase, read_wrapped,
        )]  # fmt: skip

    def for_wal(self) -> Keys:
        with self._lock:
            if self._wal is None:
                self._wal = Keys(self.identity_paths, self.passphrase, None)
            return self._wal

    def missing(self, exc: ConfigError) -> str:
        """The message for a key this holder does not have."""
        return f"{self.holder} cannot decrypt it: {exc} ({self.hint})"


def check_archive(
    storage: Storage, request: ArchiveCheckRequest, keys: VerifyKeys
) -> ArchiveCheckResult:
    """Read one archive to its end and compare its files with ``backup_manifest``."""
    result = ArchiveCheckResult(key=request.key)
    what = f"archive '{request.key}'"
    try:
        identities = None
        if request.encryption_mode is not None:
            try:
                identities = keys.for_backup(storage, request)
            except ConfigError as exc:
                result.problems.append(f"{what}: {keys.missing(exc)}")
                return result
        entries = _backup_manifest(storage, request, identities)
        objects = request.objects or [StoredObject(
            key=request.key, size=request.stored_size, sha256=request.sha256, parts=1)]
        reader = open_objects(
            storage, objects, range_bytes=range_size_for(request.part_size),
            parallel=max(1, request.ranges_in_flight), backup=request.backup,
        )  # fmt: skip
        with contextlib.closing(reader), naming_the_object(reader):
            try:
                plain = open_plaintext(
                    cast(BinaryIO, reader), request.compression,
                    identities=identities if request.encrypted else None, what=what,
                )  # fmt: skip
                walked = walk_tar(
                    cast(BinaryIO, plain), DISCARD, algorithm=manifest_algorithm(entries),
                    manifest_prefix=_prefix(request.tablespace_oid), what=what,
                )  # fmt: skip
                reader.drain()  # each stored object's sha256 is checked at its end
            finally:  # what was read, up to a failure too
                result.bytes_read = reader.bytes_read
        mine = [e for e in entries if _holds(request, e.path)]
        # Counted as checked: the files backup_manifest lists, as restore counts them. The WAL
        # base.tar carries (pg_wal/) is not listed: the object's SHA-256 covers it.
        listed = {e.path for e in mine}
        checked = [facts for path, facts in walked.files.items() if path in listed]
        result.files = len(checked)
        result.bytes_checked = sum(facts.size for facts in checked)
        problems = manifest_problems(mine, walked.files, verb="found in its archive")
        result.problems += [f"{what}: {problem}" for problem in problems]
    except (IntegrityError, DecryptionFailed) as exc:
        result.problems.append(str(exc))
    except ObjectNotFound as exc:  # the wrapped key, which the listing also names
        result.problems.append(f"{what}: {exc}")
    return result


def _backup_manifest(
    storage: Storage, request: ArchiveCheckRequest, identities: Sequence[str] | None
) -> list[ManifestEntry]:
    """PostgreSQL's backup_manifest of the backup: checked against manifest.json, decrypted,
    and its own Manifest-Checksum checked (``IntegrityError`` naming it)."""
    key = request.backup_manifest_key
    try:
        data = storage.get(key)
    except ObjectNotFound:
        raise IntegrityError(f"backup_manifest '{key}' is missing") from None
    if len(data) != request.backup_manifest_size or (
        sha256_hex(data) != request.backup_manifest_sha256
    ):
        raise IntegrityError(f"object '{key}' does not match its recorded size and sha256")
    if identities is not None:
        data = decrypt_bytes(data, identities, f"backup '{request.backup}' (object '{key}')")
    try:
        return load_backup_manifest(data)
    except IntegrityError as exc:
        raise IntegrityError(f"'{key}': {exc}") from exc


def _prefix(oid: int | None) -> str:
    return "" if oid is None else f"pg_tblspc/{oid}/"


def _holds(request: ArchiveCheckRequest, path: str) -> bool:
    """Whether ``path`` (a backup_manifest path) is in ``request``'s archive."""
    if request.tablespace_oid is not None:
        return path.startswith(_prefix(request.tablespace_oid))
    return not any(path.startswith(_prefix(oid)) for oid in request.tablespace_oids)


def check_wal(storage: Storage, request: WalCheckRequest, keys: VerifyKeys) -> WalCheckResult:
    """Read each segment of ``request`` back; a segment not archived is skipped (the caller
    names gaps from its listing)."""
    layout = Layout(cluster=request.cluster, wal_prefix=request.wal_prefix)
    archive = WalArchive(storage, layout, keys.for_wal())
    result = WalCheckResult()
    listed: dict[str, dict[str, StoredWal]] = {}
    for name in request.segments:
        prefix = log_prefix(name)
        if prefix not in listed:  # one LIST per log (256 segments of 16 MiB), not per segment
            listed[prefix] = archive.list_segments(prefix)
        stored = listed[prefix].get(name)
        if stored is None:
            continue
        problem = _check_segment(archive, stored, name, request.system_identifier, keys, result)
        if problem is not None:
            result.problems.append(problem)
    return result


def _check_segment(
    archive: WalArchive, stored: StoredWal, name: str, system: str, keys: VerifyKeys,
    result: WalCheckResult,
) -> str | None:
    try:
        plain, _ = archive.read(stored)
        sysid = segment_system_identifier(plain, name)
    except ConfigError as exc:
        return f"archived WAL '{stored.key}': {keys.missing(exc)}"
    except (IntegrityError, DecryptionFailed) as exc:
        return str(exc)
    except ObjectNotFound:
        return f"archived WAL '{stored.key}' vanished while verify read it"
    result.segments += 1
    result.bytes_read += len(plain)
    if str(sysid) != system:
        return (f"archived WAL '{stored.key}' belongs to system {sysid}, not to the backup's "
                f"system {system}")  # fmt: skip
    return None


def units(keys: VerifyKeys) -> dict[str, Callable[[Storage, Stage, Any], Any]]:
    """The deep check's units by Celery task name (``tasks/verify.py`` registers each), with
    ``keys`` to decrypt: for a coordinator running them in its own threads
    (``coordinator.runner.EmbeddedRunner``)."""
    return {
        "cloud_dump.verify_archive": lambda storage, _stage, request: check_archive(
            storage, request, keys
        ),
        "cloud_dump.verify_wal": lambda storage, _stage, request: check_wal(
            storage, request, keys
        ),
    }


# Without keys: the task names, for the test that holds units and registered tasks equal.
UNITS = units(VerifyKeys([], lambda: None, "nobody", "no keys"))
