"""Reading the WAL archive as wal-push stored it, shared by wal-fetch, its prefetcher and restore.

``WalArchive`` finds, reads and verifies stored WAL files (decrypted with ``Keys``, decompressed,
checked against their recorded SHA-256 and, for segments, their page header). And whether a WAL
archive exists at a location at all: the line between "not archived" and "no archive".

PostgreSQL reads restore_command's exit 1 as "this file is not in the archive" and, at the end
of the archive, promotes. So exit 1 may only be given for an archive that exists: a location
with no archive at all (a ``file://`` directory that is not there, an S3 prefix with a typo, a
wrong ``--cluster``) is an infrastructure failure, and recovery must stop instead of promoting
early with part of the data. ``restore`` with a recovery target asks the same question before it
writes anything.

An archive exists when its identity object (``cloud-dump-archive.json``, written by the first
``wal-push``) is there or, for archives written by the seed tool, which has no identity object,
when any object lies under the WAL prefix.

``WalArchive.check_keys`` proves, before a restore downloads anything, that ``Keys`` will
decrypt the WAL recovery reads: a copy whose every ``wal-fetch`` fails would be found out only at
``pg_ctl start``, after the whole restore.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO, NamedTuple, Protocol, cast

from coordinator.codecs import decompress_wal
from storage.base import Storage, sha256_hex
from storage.errors import (
    ConfigError,
    DecryptionFailed,
    IntegrityError,
    ObjectNotFound,
    WalArchiveNotFound,
)
from storage.layout import (
    ENCRYPTED_SUFFIX,
    WAL_ARCHIVE_INFO_NAME,
    Layout,
    compression_of_suffix,
    compression_suffix,
)
from storage.layout import WAL_ARCHIVE_INFO_NAME as ARCHIVE_INFO_NAME
from storage.layout import WAL_RAW_SHA256 as RAW_SHA256
from storage.walnames import is_segment, kind_of, log_prefix, next_log_prefix

if TYPE_CHECKING:
    from storage.base import Storage


def wal_archive_exists(storage: Storage, layout: Layout) -> bool:
    """Whether any WAL archive is stored under ``layout.wal_root``.

    One HEAD, and one LIST only when the identity object is absent. Storage errors propagate
    (an unreachable store is not an absent archive).
    """
    try:
        storage.head(layout.wal_root + WAL_ARCHIVE_INFO_NAME)
        return True
    except ObjectNotFound:
        pass
    return next(iter(storage.list(layout.wal_root)), None) is not None


def require_wal_archive(storage: Storage, layout: Layout, *, immediate: bool = False) -> None:
    """Raise ``WalArchiveNotFound`` naming the location unless a WAL archive exists there.

    ``immediate``: asked for ``--recovery-target immediate``, which an operator may give
    for "just the backup"; the message then says that this needs no target at all.
    """
    if not wal_archive_exists(storage, layout):
        hint = (
            "; --recovery-target immediate runs archive recovery, which reads the archive: "
            "a copy of the backup alone needs no target (restore without one; the WAL inside "
            "the backup makes it consistent)" if immediate else ""
        )
        raise WalArchiveNotFound(
            f"no WAL archive at '{storage.url.rstrip('/')}/{layout.wal_root}': nothing was ever "
            "archived there (check --storage, --cluster and --wal-prefix, and that "
            f"archive_command pushes there){hint}"
        )

# --- reading the archive -------------------------------------------------------------------------


class StoredWal(NamedTuple):
    key: str
    compression: str
    encrypted: bool


class WalArchive:
    """Reads WAL files as wal-push stored them: ``<wal_root><name>[.zst|.gz|.lz4][.age]``."""

    def __init__(self, storage: Storage, layout: Layout, keys: Keys) -> None:
        self._storage = storage
        self._layout = layout
        self._keys = keys

    @property
    def location(self) -> str:
        """The archive in full, storage URL included, for messages."""
        return f"{self._storage.url.rstrip('/')}/{self._layout.wal_root}"

    def find(self, file_name: str) -> StoredWal | None:
        """Where ``file_name`` is stored, or None when it is not archived (one LIST)."""
        prefix = self._layout.wal_root + file_name
        for info in self._storage.list(prefix):
            # The prefix also matches "<segment>.partial" and "<segment>.<offset>.backup".
            stored = _stored(info.key, info.key[len(prefix):])
            if stored is not None:
                return stored
        return None

    def list_segments(self, prefix: str) -> dict[str, StoredWal]:
        """Every segment stored under ``prefix`` (timeline and log, 16 hex digits: 256 segments
        of 16 MiB), from one LIST instead of one per segment."""
        root = self._layout.wal_root
        found: dict[str, StoredWal] = {}
        for info in self._storage.list(root + prefix):
            name = info.key[len(root):len(root) + 24]
            stored = _stored(info.key, info.key[len(root) + 24:])
            if stored is not None and is_segment(name):
                found.setdefault(name, stored)  # the first in key order, as find() takes
        return found

    def later_segment(self, name: str) -> str | None:
        """A stored segment after segment ``name`` on its timeline, in its log or the next one
        (at most two LISTs); None when there is none there.

        Segment names sort in WAL order within a timeline, and a log (the middle 8 hex digits)
        holds every segment size's whole run, so two prefixes cover the next 4 GiB of WAL.
        """
        for prefix in (log_prefix(name), next_log_prefix(name)):
            later = sorted(n for n in self.list_segments(prefix) if n > name)
            if later:
                return later[0]
        return None

    def require(self) -> None:
        """Raise ``WalArchiveNotFound`` unless an archive exists here: asked only before
        answering "not archived", which PostgreSQL takes for the end of the archive."""
        require_wal_archive(self._storage, self._layout)

    def read(self, stored: StoredWal) -> tuple[bytes, str]:
        """The original bytes of ``stored`` and their SHA-256, verified against raw-sha256."""
        key = stored.key
        expected = (self._storage.head(key).metadata or {}).get(RAW_SHA256)
        if not expected:
            raise IntegrityError(f"archived WAL '{key}' has no {RAW_SHA256} metadata")
        data = self._storage.get(key)
        if stored.encrypted:
            data = self._keys.decrypt(data, key, self)
        plain = decompress_wal(data, stored.compression, f"archived WAL '{key}'")
        actual = sha256_hex(plain)
        if actual != expected:
            raise IntegrityError(
                f"archived WAL '{key}' does not match its recorded sha256 "
                f"(expected {expected}, got {actual})"
            )
        _check_segment_header(plain[:SEGMENT_HEADER_BYTES], len(plain), stored)
        return plain, actual

    def copy(self, stored: StoredWal, out: IO[bytes]) -> tuple[int, str]:
        """Write the original bytes of ``stored`` to ``out`` and return their size and SHA-256,
        verified as ``read`` verifies them, in ``COPY_CHUNK_BYTES`` chunks: the object is
        streamed from one GET (its metadata comes with it) through decryption, decompression
        and hashing, and is never whole in memory.

        ``out`` must be an empty file open for writing; after an error it holds part of the
        data or wrong data, and the caller discards it. Raises as ``read`` does.
        """
        identities = self._keys.identities(self) if stored.encrypted else None
        try:
            return self._copy(stored, out, identities)
        except IntegrityError as exc:
            failed = exc.__cause__
            if not isinstance(failed, DecryptionFailed) or identities is None:
                raise
            identities = self._keys.refreshed_after(self, identities)
            if identities is None:
                raise failed from None  # a wrong key, as ``read`` reports it
        out.seek(0)
        out.truncate()
        return self._copy(stored, out, identities)

    def _copy(
        self, stored: StoredWal, out: IO[bytes], identities: list[str] | None
    ) -> tuple[int, str]:
        from coordinator.codecs import open_plaintext

        key = stored.key
        stream = self._storage.open_stream(key)
        try:
            expected = stream.metadata.get(RAW_SHA256)
            if not expected:
                raise IntegrityError(f"archived WAL '{key}' has no {RAW_SHA256} metadata")
            plain = open_plaintext(cast(BinaryIO, stream), stored.compression,
                                   identities=identities, what=f"archived WAL '{key}'")  # fmt: skip
            # Closed on every exit: a decrypting reader stops its thread, a decompressor
            # frees its context, rather than waiting for the garbage collector.
            with contextlib.closing(plain):
                digest = hashlib.sha256()
                head = b""
                size = 0
                while chunk := plain.read(COPY_CHUNK_BYTES):
                    if len(head) < SEGMENT_HEADER_BYTES:
                        head += chunk[: SEGMENT_HEADER_BYTES - len(head)]
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        finally:
            stream.close()
        actual = digest.hexdigest()
        if actual != expected:
            raise IntegrityError(
                f"archived WAL '{key}' does not match its recorded sha256 "
                f"(expected {expected}, got {actual})"
            )
        _check_segment_header(head, size, stored)
        return size, actual

    def read_info(self) -> dict[str, object]:
        key = self._layout.wal_root + ARCHIVE_INFO_NAME
        try:
            info = json.loads(self._storage.get(key))
        except ValueError as exc:
            raise IntegrityError(f"archive info '{key}' is not valid JSON") from exc
        if not isinstance(info, dict) or info.get("format") != 1:
            raise IntegrityError(f"archive info '{key}' has an unknown format")
        return info

    def get(self, key: str) -> bytes:
        return self._storage.get(key)

    def check_keys(self, first: str, hint: Callable[[str], str]) -> None:
        """Refuse (``DecryptionFailed``) keys that would not decrypt the WAL recovery reads
        from segment ``first`` on (a backup's first segment), before anything is downloaded.

        Passphrase mode (the archive's description says so): identity files must hold the
        archive's own key (its public key is recorded: no object is read), else the passphrase
        must open the wrapped key (one scrypt, ~1.7 s; remembered by ``Keys``, so the history
        files read next cost none). Otherwise the first archived segment recovery reads (``first``
        or the next one stored after it on its timeline) is tried: when it is encrypted, its age
        header must open with the identity files (the first ``HEADER_PROBE_BYTES`` read). Nothing
        to read (no such segment, or not encrypted) is nothing to refuse.

        ``hint(mode)`` ("passphrase" or "recipients") says which keys to give, for the message.
        ``ConfigError`` for a key file or passphrase file that cannot be read, ``IntegrityError``
        for a damaged age header.
        """
        from coordinator.crypto import header_opens, read_identities

        encryption = self._described_encryption()
        if encryption.get("mode") == "passphrase":
            self._keys.check_passphrase_mode(self, encryption, hint("passphrase"))
            return
        stored = self.find(first)
        if stored is None:
            later = self.later_segment(first)
            stored = None if later is None else self.find(later)
        if stored is None or not stored.encrypted:
            return
        what = f"archived WAL '{stored.key}'"
        if not self._keys.identity_paths:
            raise DecryptionFailed(
                f"{what} is encrypted to age recipients and no identity was given: "
                f"{hint('recipients')}"
            )
        identities = read_identities(self._keys.identity_paths)
        try:
            probe = self._storage.get_range(stored.key, 0, HEADER_PROBE_BYTES)
            # A header of hundreds of stanzas: the whole object, which must hold all of it.
            if not header_opens(probe, identities, what) and not header_opens(
                self._storage.get(stored.key), identities, what
            ):
                raise IntegrityError(f"{what} is damaged: it ends inside its age header")
        except DecryptionFailed as exc:
            raise DecryptionFailed(f"{exc}: {hint('recipients')}") from exc

    def _described_encryption(self) -> dict[str, object]:
        """The archive's description of its encryption; empty without one (the seed's
        archives have no description, and encrypt to recipients)."""
        try:
            encryption = self.read_info().get("encryption")
        except ObjectNotFound:
            return {}
        return encryption if isinstance(encryption, dict) else {}


# Enough for an age header of some hundred recipient stanzas (~90 bytes each): one small GET.
HEADER_PROBE_BYTES = 16 * 1024
# What ``WalArchive.copy`` holds of a file at a time: large enough that per-chunk Python work
# is noise next to the decoders' and the hash's, small enough to stay out of the process's RSS.
COPY_CHUNK_BYTES = 256 * 1024
# A segment's long page header (``coordinator.walheader.LONG_HEADER_BYTES``), all the header
# check reads; not imported from there: the served path's imports stay lean.
SEGMENT_HEADER_BYTES = 40


def _stored(key: str, suffix: str) -> StoredWal | None:
    """``key`` as a stored WAL file if ``suffix`` (what follows the name) is wal-push's."""
    compression = compression_of_suffix(suffix.removesuffix(ENCRYPTED_SUFFIX))
    if compression is None:
        return None
    return StoredWal(key, compression, suffix.endswith(ENCRYPTED_SUFFIX))


def _check_segment_header(head: bytes, size: int, stored: StoredWal) -> None:
    """Refuse a segment whose first page says it is another segment (``head``: the file's
    first ``SEGMENT_HEADER_BYTES`` or all of it when shorter; ``size``: its length).

    PostgreSQL would read its "unexpected pageaddr" as the end of WAL and, in archive recovery,
    promote early. wal-push refuses such files since it checks headers; this catches what an
    older version, another tool or a hand copy stored. Data without a long page header is left
    to PostgreSQL: cloud-dump's wal-push never stored any.
    """
    from coordinator.walheader import LONG_HEADER_BYTES, XLP_LONG_HEADER, segment_address_mismatch

    name = stored.key.rpartition("/")[2]
    name = name.removesuffix(ENCRYPTED_SUFFIX) if stored.encrypted else name
    name = name.removesuffix(compression_suffix(stored.compression))
    if kind_of(name) not in ("segment", "partial") or len(head) < LONG_HEADER_BYTES:
        return
    # A long page header whose segment size is the file's own (a power of two): anything else
    # is not a segment cloud-dump's wal-push would have stored, and is left to PostgreSQL.
    seg_size = int.from_bytes(head[32:36], "little")
    info = int.from_bytes(head[2:4], "little")
    if not info & XLP_LONG_HEADER or seg_size != size or seg_size & (seg_size - 1):
        return
    mismatch = segment_address_mismatch(head, name)
    if mismatch is not None:
        raise IntegrityError(
            f"archived WAL '{stored.key}' {mismatch}: not handing PostgreSQL another segment "
            "under this name"
        )


# --- decryption keys -----------------------------------------------------------------------------


class IdentityCache(Protocol):
    """Where ``Keys`` keeps an unwrapped identity between calls: wal-fetch's spool."""

    def cache_identity(self, identity: str) -> None: ...

    def cached_identity(self) -> str | None: ...


class Keys:
    """The identities that decrypt the archive, resolved at most once per process.

    ``identity_paths``: recipient mode (``--identity-key``). Otherwise passphrase mode: the
    identity cached in the spool, or the archive's wrapped identity unwrapped with the passphrase
    (``passphrase`` is called only then, so an unencrypted archive needs no passphrase file).
    Without a spool (a call run by hand outside ``pg_wal``) nothing is cached.
    """

    def __init__(
        self, identity_paths: list[Path], passphrase: Callable[[], str | None],
        spool: IdentityCache | None,
    ) -> None:
        self.identity_paths = identity_paths
        self.passphrase = passphrase
        self.spool = spool
        self._identities: list[str] | None = None
        self._failure: Exception | None = None  # one wrong passphrase costs one scrypt
        self._lock = threading.Lock()

    def decrypt(self, data: bytes, key: str, archive: WalArchive) -> bytes:
        from coordinator.crypto import decrypt_bytes

        what = f"archived WAL '{key}'"
        identities = self.identities(archive)
        try:
            return decrypt_bytes(data, identities, what)
        except DecryptionFailed:
            refreshed = self.refreshed_after(archive, identities)
            if refreshed is None:
                raise
        return decrypt_bytes(data, refreshed, what)

    def identities(self, archive: WalArchive) -> list[str]:
        """The age identities to decrypt ``archive``'s WAL with (resolved once)."""
        return self._resolve(archive, refresh=False)

    def refreshed_after(self, archive: WalArchive, failed: list[str]) -> list[str] | None:
        """Identities to try again after ``failed`` did not decrypt: the passphrase-wrapped key
        unwrapped afresh when ``failed`` was the cached one, which may belong to an archive
        since recreated; None when there is nothing else to try."""
        if self.identity_paths or self._cached() not in failed:
            return None
        return self._resolve(archive, refresh=True)

    def _resolve(self, archive: WalArchive, *, refresh: bool) -> list[str]:
        with self._lock:  # the prefetcher's threads share one unwrap (scrypt costs ~1.7 s)
            if self._failure is not None:
                raise self._failure
            if self._identities is not None and not refresh:
                return self._identities
            try:
                self._identities = self._load(archive, refresh)
            except (ConfigError, DecryptionFailed) as exc:
                self._failure = exc
                raise
            return self._identities

    def check_passphrase_mode(
        self, archive: WalArchive, encryption: dict[str, object], hint: str
    ) -> None:
        """For ``WalArchive.check_keys``: the archive encrypts to its own key, described by
        ``encryption`` (its ``recipient``, and where the key is stored passphrase-wrapped)."""
        from coordinator.crypto import public_keys

        key = encryption.get("wrapped_identity_key")
        recipient = encryption.get("recipient")
        if self.identity_paths:
            if recipient in public_keys(self.identity_paths):
                return
            raise DecryptionFailed(
                f"no identity given is the WAL archive's own key (public key {recipient}, "
                f"stored passphrase-wrapped at '{key}'), which its WAL is encrypted to: {hint}"
            )
        if self.passphrase() is None:
            raise DecryptionFailed(
                f"the WAL archive is encrypted with a passphrase (its key '{key}') and none "
                f"was given: {hint}"
            )
        try:
            self._resolve(archive, refresh=False)
        except DecryptionFailed as exc:
            raise DecryptionFailed(
                f"the passphrase given does not open the WAL archive's key '{key}': {hint}"
            ) from exc

    def _load(self, archive: WalArchive, refresh: bool) -> list[str]:
        from coordinator.crypto import passphrase_identity, read_identities

        if self.identity_paths:
            return read_identities(self.identity_paths)
        cached = None if refresh else self._cached()
        if cached is not None:
            return [cached]
        encryption = archive.read_info().get("encryption")
        if not isinstance(encryption, dict):
            encryption = {}  # encrypted WAL in an archive that records no passphrase
        key = encryption.get("wrapped_identity_key")
        identity = passphrase_identity(
            "the WAL archive", encryption.get("mode"), key if isinstance(key, str) else None,
            self.passphrase, archive.get,
        )  # fmt: skip
        if self.spool is not None:
            self.spool.cache_identity(identity)
        return [identity]

    def _cached(self) -> str | None:
        return None if self.spool is None else self.spool.cached_identity()
