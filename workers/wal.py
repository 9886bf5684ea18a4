"""The units of work of WAL archiving: open the archive, push one WAL file, idempotently.

Plain functions, like ``workers.backup``: storage and stage come in as arguments, requests and
results are small pydantic models (facts only: keys, sizes, checksums, a staged-payload
reference, public keys; never WAL bytes or secrets).

An archive (``<wal_root>``, e.g. ``wal_archive/``) holds:

    <wal_root>cloud-dump-archive.json        WalArchiveInfo: whose WAL this is, how it is
                                             encrypted; created by the first push
    <wal_root>cloud-dump-archive-key.age     passphrase mode only: the archive's X25519
                                             identity, age-scrypt wrapped; metadata
                                             {"recipient": "age1..."}
    <wal_root><file name><.zst|.gz|.lz4|><.age|>
                                             one object per WAL file, with metadata
                                             {"raw-sha256": hex of the original file,
                                              "system-identifier": decimal}

A WAL file is stored once: whatever compression or encryption a later push uses, a file name
that already has an object is answered by comparing the original file's SHA-256 with the
stored ``raw-sha256``. Equal: success, nothing written. Different: ``WalConflict``, nothing
written — the archive is the copy a restore relies on, and a ``.history`` file overwritten by
another timeline's would send recovery down the wrong timeline.
"""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from storage.base import Storage, sha256_hex
from storage.errors import ChecksumMismatch, ConfigError, ObjectExists, ObjectNotFound, WalConflict
from storage.layout import WAL_ARCHIVE_INFO_NAME, WAL_OBJECT_SUFFIXES, WAL_RAW_SHA256
from storage.walnames import kind_of
from workers.location import StorageBound
from workers.staging import Stage

log = logging.getLogger(__name__)

ARCHIVE_INFO_NAME = WAL_ARCHIVE_INFO_NAME
ARCHIVE_KEY_NAME = "cloud-dump-archive-key.age"
ARCHIVE_FORMAT = 1
# Object metadata keys (lower case: S3 lower-cases them anyway).
RAW_SHA256 = WAL_RAW_SHA256
SYSTEM_IDENTIFIER = "system-identifier"
RECIPIENT = "recipient"


class WalEncryption(BaseModel):
    """Passphrase mode: WAL is encrypted to ``recipient``, whose identity is stored
    passphrase-wrapped at ``wrapped_identity_key`` (a storage key)."""

    mode: Literal["passphrase"] = "passphrase"
    recipient: str
    wrapped_identity_key: str


class WalArchiveInfo(BaseModel):
    """``cloud-dump-archive.json``: the identity of a WAL archive."""

    format: int = ARCHIVE_FORMAT
    # Decimal, as pg_control_system() shows it (JSON numbers lose precision above 2**53).
    system_identifier: str
    encryption: WalEncryption | None = None


class PushWalRequest(StorageBound):
    key: str
    file_name: str
    stored_size: int
    stored_sha256: str
    raw_sha256: str
    # None when it cannot be known (a .history file without a readable pg_control).
    system_identifier: str | None
    archive_info_key: str
    ref: str

    def facts(self) -> dict[str, object]:
        return {"wal": self.file_name, "bytes": self.stored_size}


class PushWalResult(BaseModel):
    key: str
    status: Literal["stored", "already-archived"]
    archive: WalArchiveInfo | None = None


class OpenWalArchiveRequest(StorageBound):
    """Read (and create if needed) the archive's identity; optionally set up passphrase
    encryption with the proposed recipient, whose wrapped identity is staged at ``ref``."""

    archive_info_key: str
    system_identifier: str | None
    recipient: str | None = None
    wrapped_identity_key: str | None = None
    wrapped_identity_ref: str | None = None
    # The wrapped identity (age-scrypt ciphertext, as stored) comes back so that the caller
    # can check that its passphrase opens it before encrypting anything to its recipient.
    want_wrapped_identity: bool = False
    # A timeline whose newest whole segment in the archive the caller wants to know (backup:
    # is another server writing this timeline here?).
    newest_on_timeline: int | None = None

    def facts(self) -> dict[str, object]:
        facts: dict[str, object] = {"wal_archive": self.archive_info_key.rpartition("/")[0]}
        if self.recipient is not None:
            facts["encryption"] = "passphrase"
        return facts


class OpenWalArchiveResult(BaseModel):
    archive: WalArchiveInfo | None
    wrapped_identity_b64: str | None = None
    newest_segment: str | None = None  # on ``newest_on_timeline``; None: none archived


def wal_root_of(key: str) -> str:
    """The archive prefix (ending in "/") of a WAL object key."""
    root, sep, _ = key.rpartition("/")
    if not sep:
        raise ConfigError(f"WAL key '{key}' has no archive prefix")
    return root + "/"


def push_wal(storage: Storage, stage: Stage, request: PushWalRequest) -> PushWalResult:
    """Store one staged WAL file, unless the archive already has it.

    Safe to re-run at any time, also after the stage was emptied: an already-archived file is
    recognised before the staged bytes are read.
    """
    root = wal_root_of(request.key)
    named = root + request.file_name
    if not request.key.startswith(named) or request.key[len(named) :] not in WAL_OBJECT_SUFFIXES:
        raise ConfigError(f"WAL key '{request.key}' does not name '{request.file_name}'")
    archive = ensure_archive(storage, request.archive_info_key, request.system_identifier)
    existing = _check_archived(storage, root, request.file_name, request.raw_sha256)
    if existing is not None:
        return PushWalResult(key=existing, status="already-archived", archive=archive)
    data = stage.get(request.ref)
    if len(data) != request.stored_size or sha256_hex(data) != request.stored_sha256:
        raise ChecksumMismatch(f"staged WAL file '{request.file_name}' does not match its checksum")
    metadata = {RAW_SHA256: request.raw_sha256}
    if request.system_identifier is not None:
        metadata[SYSTEM_IDENTIFIER] = request.system_identifier
    try:
        storage.put(
            request.key, data, if_absent=True, metadata=metadata, sha256=request.stored_sha256
        )
    except ObjectExists:
        # Another push of the same file won the race: same content is fine, else a conflict.
        existing = _check_archived(storage, root, request.file_name, request.raw_sha256)
        if existing is None:
            raise
        return PushWalResult(key=existing, status="already-archived", archive=archive)
    log.info("archived WAL file '%s' as '%s'", request.file_name, request.key)
    return PushWalResult(key=request.key, status="stored", archive=archive)


def ensure_archive(
    storage: Storage, info_key: str, system_identifier: str | None
) -> WalArchiveInfo | None:
    """The archive's identity, created by the first push that knows its system identifier.

    Raises ``WalConflict`` when the archive belongs to another cluster. None only when the
    archive has no identity yet and ``system_identifier`` is unknown.
    """
    archive = read_archive_info(storage, info_key)
    if archive is None:
        if system_identifier is None:
            return None
        archive = WalArchiveInfo(system_identifier=system_identifier)
        try:
            storage.put(info_key, archive.model_dump_json().encode(), if_absent=True)
        except ObjectExists:
            archive = read_archive_info(storage, info_key)
            if archive is None:
                raise
    if system_identifier is not None and archive.system_identifier != system_identifier:
        raise WalConflict(
            f"WAL of system {system_identifier} cannot go into the archive of system "
            f"{archive.system_identifier} at '{wal_root_of(info_key)}'"
        )
    return archive


def read_archive_info(storage: Storage, info_key: str) -> WalArchiveInfo | None:
    try:
        raw = storage.get(info_key)
    except ObjectNotFound:
        return None
    try:
        return WalArchiveInfo.model_validate_json(raw)
    except ValidationError as exc:
        raise WalConflict(
            f"'{info_key}' is not a cloud-dump archive description: not touching this archive"
        ) from exc


def open_wal_archive(
    storage: Storage, stage: Stage, request: OpenWalArchiveRequest
) -> OpenWalArchiveResult:
    """The archive's identity, with passphrase encryption set up if asked and not yet there.

    The wrapped identity object is created first and only if absent, and carries its recipient
    as metadata: it decides which of two racing first pushes wins, and the json (rewritten to
    mention it) is derived from it, so every racer writes the same json.
    """
    newest = (None if request.newest_on_timeline is None
              else newest_segment(storage, wal_root_of(request.archive_info_key),
                                  request.newest_on_timeline))  # fmt: skip
    archive = ensure_archive(storage, request.archive_info_key, request.system_identifier)
    if archive is None:
        if request.recipient is None:
            return OpenWalArchiveResult(archive=None, newest_segment=newest)
        raise ConfigError(
            "cannot set up WAL encryption before the archive knows its system identifier: "
            "push a WAL segment first"
        )
    if request.recipient is not None and archive.encryption is None:
        archive = _add_encryption(storage, stage, request, archive)
    wrapped = None
    if request.want_wrapped_identity and archive.encryption is not None:
        raw = storage.get(archive.encryption.wrapped_identity_key)
        wrapped = base64.b64encode(raw).decode()
    return OpenWalArchiveResult(archive=archive, wrapped_identity_b64=wrapped,
                                newest_segment=newest)


def newest_segment(storage: Storage, root: str, timeline: int) -> str | None:
    """The highest whole segment of ``timeline`` stored under the WAL archive ``root`` (one
    LIST of that timeline's names), or None."""
    prefix = f"{timeline:08X}"
    newest = None
    for info in storage.list(root + prefix):
        name = info.key[len(root):]
        for suffix in sorted(WAL_OBJECT_SUFFIXES, key=len, reverse=True):
            if name.endswith(suffix):
                name = name[: len(name) - len(suffix)]
                break
        if kind_of(name) == "segment" and (newest is None or name > newest):
            newest = name
    return newest


def _add_encryption(
    storage: Storage, stage: Stage, request: OpenWalArchiveRequest, archive: WalArchiveInfo
) -> WalArchiveInfo:
    if request.wrapped_identity_key is None or request.wrapped_identity_ref is None:
        raise ConfigError("a proposed WAL recipient needs its wrapped identity")
    key = request.wrapped_identity_key
    # ObjectExists: set up by another push (or an earlier run of this one); its key wins.
    with contextlib.suppress(ObjectExists):
        storage.put(
            key,
            stage.get(request.wrapped_identity_ref),
            if_absent=True,
            metadata={RECIPIENT: str(request.recipient)},
        )
    recipient = (storage.head(key).metadata or {}).get(RECIPIENT)
    if not recipient:
        raise WalConflict(f"'{key}' has no recipient metadata: not touching this archive")
    archive = archive.model_copy(
        update={"encryption": WalEncryption(recipient=recipient, wrapped_identity_key=key)}
    )
    storage.put(request.archive_info_key, archive.model_dump_json().encode())
    return archive


def _check_archived(storage: Storage, root: str, file_name: str, raw_sha256: str) -> str | None:
    """The key already holding ``file_name`` with this content, None if none holds it.

    Raises ``WalConflict`` when it is archived with other content (or without the metadata
    that would tell: then it cannot be proven the same, so it is not overwritten either).
    """
    prefix = root + file_name
    candidates = [
        info.key for info in storage.list(prefix) if info.key[len(prefix) :] in WAL_OBJECT_SUFFIXES
    ]
    for key in candidates:
        if (storage.head(key).metadata or {}).get(RAW_SHA256) == raw_sha256:
            return key
    if candidates:
        raise WalConflict(
            f"WAL file '{file_name}' is already archived with different content at "
            f"'{candidates[0]}': not overwritten"
        )
    return None


# The WAL archive's units of work by Celery task name (``tasks/wal.py`` registers each under
# it), for a coordinator that runs them in its own threads (``coordinator.runner``).
UNITS: dict[str, Callable[[Storage, Stage, Any], Any]] = {
    "cloud_dump.push_wal": push_wal,
    "cloud_dump.open_wal_archive": open_wal_archive,
}
