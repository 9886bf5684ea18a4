"""What wal-push does to a WAL file before a worker stores it: read, identify, compress, encrypt.

Shared by the foreground ``wal-push`` (``coordinator.wal.push.command``) and the detached WAL pusher
(``coordinator.wal.push.helper``). Also the archive's identity as the spool caches it: which
cluster's WAL the archive holds (a segment of another cluster is refused before anything is sent),
and in passphrase mode the public key WAL is encrypted to.

Encryption, as ``coordinator.settings.encryption_of`` resolves it: ``--recipient-key`` encrypts
to those public keys. With a passphrase, the archive gets its own X25519 identity, stored
passphrase-wrapped beside the WAL by the first encrypted push (``workers.wal``); every later push
encrypts to its public key, read from the spool's cached archive identity, so the ~1.7 s scrypt
cost is paid once per spool, not per segment.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from coordinator.settings import Encryption
    from coordinator.wal.push.spool import Spool
    from coordinator.wal.push.work import WalWork
    from storage.layout import Layout
    from workers.wal import PushWalRequest, WalArchiveInfo

log = logging.getLogger(__name__)


class RawWal(NamedTuple):
    """A WAL file as read from pg_wal."""

    file_name: str
    data: bytes
    raw_sha256: str
    system_identifier: str | None
    # Of the open file these bytes were read from (``coordinator.wal.push.marker.file_identity``):
    # what its confirmation marker records.
    identity: str


def read_wal(path: Path, file_name: str) -> RawWal:
    """The file, its identity and the system identifier of the cluster that wrote it.

    ``IntegrityError`` if the file changed while it was read: PostgreSQL never writes a file it
    marked ``.ready``, so a change means someone else is writing it, and neither those bytes
    nor a marker for them may stand for it.
    """
    import hashlib

    from coordinator.wal.push.marker import file_identity
    from storage.errors import IntegrityError
    from storage.walnames import wal_kind

    kind = wal_kind(file_name)
    with path.open("rb") as f:
        identity = file_identity(os.fstat(f.fileno()))
        data = f.read()
        after = os.fstat(f.fileno())
    if file_identity(after) != identity or len(data) != after.st_size:
        raise IntegrityError(f"WAL file '{file_name}' changed while it was being read: {path}")
    if kind in ("segment", "partial"):
        from coordinator.walheader import segment_address_mismatch, segment_system_identifier

        system_identifier: str | None = str(segment_system_identifier(data, file_name))
        if (mismatch := segment_address_mismatch(data, file_name)) is not None:
            raise IntegrityError(
                f"WAL file '{file_name}' {mismatch}: not archiving it under another segment's "
                "name"
            )
    else:
        # .history and .backup files have no page header: ask the data directory.
        system_identifier = _pg_control_system_identifier(path)
        if not data:
            raise IntegrityError(f"WAL file '{file_name}' is empty")
    return RawWal(file_name, data, hashlib.sha256(data).hexdigest(), system_identifier, identity)


def _pg_control_system_identifier(wal_path: Path) -> str | None:
    """The first field of ``global/pg_control``: of the data directory holding ``pg_wal``, or
    of the working directory (archive_command runs in PGDATA); None if neither is readable."""
    # absolute() is lexical: a pg_wal symlinked to another disk still leads back to PGDATA.
    data_dir = wal_path.absolute().parent.parent
    for candidate in (data_dir / "global" / "pg_control", Path("global/pg_control")):
        try:
            with candidate.open("rb") as f:
                head = f.read(8)
        except OSError:
            continue
        if len(head) == 8:
            return str(int.from_bytes(head, "little"))
    return None


def encode_wal(
    raw: RawWal, compression: str, recipients: list[str] | None, layout: Layout
) -> tuple[PushWalRequest, bytes]:
    """Compress (``coordinator.codecs.compress_wal``: levels and why there) and encrypt
    ``raw``: the ``push_wal`` request describing the result, and the result (its payload, to be
    staged under ``request.ref``). ``ConfigError`` naming the choices for an unknown
    ``compression``."""
    import hashlib
    import uuid

    from coordinator.codecs import compress_wal
    from workers.wal import ARCHIVE_INFO_NAME, PushWalRequest

    payload = compress_wal(raw.data, compression)
    if recipients:
        from coordinator.crypto import encrypt_bytes

        payload = encrypt_bytes(payload, recipients)
    request = PushWalRequest(
        key=layout.wal_key(raw.file_name, compression, encrypted=bool(recipients)),
        file_name=raw.file_name,
        stored_size=len(payload),
        stored_sha256=hashlib.sha256(payload).hexdigest(),
        raw_sha256=raw.raw_sha256,
        system_identifier=raw.system_identifier,
        archive_info_key=layout.wal_root + ARCHIVE_INFO_NAME,
        ref=f"wal-{raw.file_name}-{uuid.uuid4().hex}",
    )
    return request, payload


def recipients_for(
    encryption: Encryption | None, archive: WalArchiveInfo | None
) -> list[str] | None:
    """What to encrypt WAL to: the operator's recipients, or in passphrase mode the archive's
    own public key (``archive_for`` set it up); None for no encryption."""
    if encryption is None:
        return None
    if encryption.recipients:
        return encryption.recipients
    if encryption.passphrase:
        assert archive is not None and archive.encryption is not None  # set up by _archive_for
        return [archive.encryption.recipient]
    return None


def archive_for(
    work: WalWork,
    spool: Spool,
    location: str,
    layout: Layout,
    own: RawWal,
    encryption: Encryption | None,
) -> WalArchiveInfo | None:
    """The archive's identity: from the spool's cache, else (passphrase mode) from storage."""
    from storage.errors import WalConflict
    from workers.wal import WalArchiveInfo

    cached = spool.read_archive_cache(location)
    archive = WalArchiveInfo.model_validate_json(cached) if cached else None
    sysid = own.system_identifier
    if archive is not None and sysid is not None and archive.system_identifier != sysid:
        raise WalConflict(
            f"WAL of system {sysid} cannot go into the archive of system "
            f"{archive.system_identifier} at '{layout.wal_root}'"
        )
    passphrase = encryption.passphrase if encryption is not None else None
    if passphrase and (archive is None or archive.encryption is None):
        archive = open_passphrase_archive(work, layout, sysid, passphrase)
        spool.write_archive_cache(location, archive.model_dump_json())
    return archive


def open_passphrase_archive(
    work: WalWork, layout: Layout, sysid: str | None, passphrase: str
) -> WalArchiveInfo:
    """The archive with passphrase encryption set up, and proof that ``passphrase`` opens it.

    Costs one scrypt (~1.7 s): wrapping a new identity, or unwrapping the archive's to check
    it. Encrypting WAL to a key the operator's passphrase cannot open would make the archive
    useless, so a mismatch fails the push instead.
    """
    import base64
    import uuid

    from coordinator.crypto import generate_identity, wrap_identity
    from workers.wal import ARCHIVE_INFO_NAME, ARCHIVE_KEY_NAME, OpenWalArchiveRequest

    log.debug("opening the WAL archive's passphrase-wrapped key (one scrypt, ~1.7 s)")

    request = OpenWalArchiveRequest(
        archive_info_key=layout.wal_root + ARCHIVE_INFO_NAME,
        system_identifier=sysid,
        want_wrapped_identity=True,
    )
    result = work.open_archive(request)
    if result.archive is None or result.archive.encryption is None:
        identity, recipient = generate_identity()
        ref = f"wal-key-{uuid.uuid4().hex}"
        result = work.open_archive(
            request.model_copy(
                update={
                    "recipient": recipient,
                    "wrapped_identity_key": layout.wal_root + ARCHIVE_KEY_NAME,
                    "wrapped_identity_ref": ref,
                }
            ),
            {ref: wrap_identity(identity, passphrase)},
        )
        assert result.archive is not None and result.archive.encryption is not None
        if result.archive.encryption.recipient == recipient:
            return result.archive
    assert result.archive is not None and result.archive.encryption is not None
    if result.wrapped_identity_b64 is None:
        raise AssertionError("open_wal_archive returned no wrapped identity")
    _check_passphrase(
        base64.b64decode(result.wrapped_identity_b64),
        passphrase,
        result.archive.encryption.recipient,
        result.archive.encryption.wrapped_identity_key,
    )
    return result.archive


def _check_passphrase(wrapped: bytes, passphrase: str, recipient: str, key: str) -> None:
    from coordinator.crypto import decrypt_bytes, encrypt_bytes, unwrap_identity
    from storage.errors import DecryptionFailed

    try:
        identity = unwrap_identity(wrapped, passphrase)
        decrypt_bytes(encrypt_bytes(b"probe", [recipient]), [identity], f"'{key}'")
    except DecryptionFailed as exc:
        raise DecryptionFailed(
            f"the passphrase does not open the WAL archive's key '{key}': not pushing WAL "
            "that could not be decrypted"
        ) from exc


