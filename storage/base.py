"""The Storage protocol: the one interface every other package uses to reach object storage.

Contract (checked for every backend by ``tests/storage/test_contract.py``):

- Keys are ``/``-separated relative paths (no leading ``/``, no empty, ``.`` or ``..`` segment);
  a backend's URL prefix is applied inside the backend, callers never see it.
- ``get``/``get_range``/``head`` of a missing key raise ``ObjectNotFound``; ``delete`` of a missing
  key succeeds (deletes are idempotent, as on S3).
- ``delete_many(keys)`` deletes each key as ``delete`` would, a missing one included, in as few
  requests as the store allows; it returns only when every key is gone, and otherwise raises a
  ``StorageError`` naming a key that is not (a partial failure is never success). The keys of
  one call go in no particular order: what must go first is deleted before, on its own.
- ``open_stream(key)`` reads one object from its start in chunks, with its metadata (as
  ``head`` gives it): nothing of it is held in memory beyond the chunk asked for. A read that
  breaks off raises a ``StorageError`` (not retried: the caller starts again); the caller closes
  the stream.
- ``get_range(key, start, length)`` returns ``min(length, size - start)`` bytes, ``b""`` when
  ``start >= size``; it never raises for a range past the end.
- ``put(..., if_absent=True)`` creates the object only if the key is free and raises
  ``ObjectExists`` otherwise, atomically: two racing writers cannot both succeed.
- ``put(..., metadata=...)`` stores a few short string facts with the object, atomically with
  it (keys lower case ``[a-z0-9-]``, values printable ASCII); ``head`` returns them (``{}``
  when there are none). ``list`` does not (``metadata`` is None there).
- A write is visible whole or not at all: no reader ever sees a partial object.
- Multipart: ``upload_part`` may be called from any process for an upload created in another;
  re-uploading a part number replaces it. ``complete_multipart`` takes the parts in order, and
  raises ``PartTooSmall`` if a part other than the last is under ``min_part_size_bytes``; the
  object appears only when it returns. ``abort_multipart`` discards the parts;
  ``list_multipart_uploads`` shows uploads created and neither completed nor aborted;
  ``uploaded_bytes`` the bytes of the parts one of them holds (``UploadNotFound`` once it is
  completed or aborted).
- Every failure is a ``StorageError``: ``TransientStorageError`` when retrying may help,
  ``PermanentStorageError`` otherwise. Backends retry transient failures internally (with
  backoff) before raising.

Callers ask a backend what it supports through ``capabilities``, never which backend it is.
"""

from __future__ import annotations

import builtins
import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

MiB = 1024 * 1024

# S3's limits (https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html). Some
# S3-compatible stores allow fewer parts (1,000 is common), hence the configurable count.
S3_MIN_PART_SIZE_BYTES = 5 * MiB
S3_MAX_PART_SIZE_BYTES = 5 * 1024 * MiB
S3_MAX_PART_COUNT = 10_000
# Any count works: an archive longer than that many parts continues in another object.
MIN_CONFIGURABLE_PART_COUNT = 1


@dataclass(frozen=True)
class Capabilities:
    """What a backend allows for multipart uploads."""

    min_part_size_bytes: int
    max_part_size_bytes: int
    max_part_count: int


@dataclass(frozen=True)
class ObjectInfo:
    """Metadata of a stored object.

    ``checksum_sha256`` is the hex SHA-256 of the whole object when the store knows it (objects
    written with ``put``), ``None`` otherwise (S3 keeps only a checksum of checksums for
    multipart objects). ``modified_s``: when the object was last written, seconds since the
    Unix epoch, as the store says (S3's LastModified, a local file's mtime); filled by ``list``.
    """

    key: str
    size: int
    etag: str
    checksum_sha256: str | None = None
    metadata: Mapping[str, str] | None = None
    modified_s: float | None = None


@dataclass(frozen=True)
class UploadedPart:
    """A part the store accepted; ``complete_multipart`` takes a list of these."""

    part_number: int
    etag: str
    size: int
    sha256: str


@dataclass(frozen=True)
class MultipartUpload:
    """A multipart upload in progress."""

    key: str
    upload_id: str


class PartBody(Protocol):
    """A part's bytes for ``upload_part`` without holding them whole (a worker reads a staged
    part from Redis in slices, ``workers.staging``).

    ``len()`` is the part's size in bytes; ``read`` hands them out in order (fewer than asked
    is fine, ``b""`` at the end); ``seek``/``tell`` as on a file (botocore measures a body and
    rewinds it to send it again). A body checks its bytes against the part's SHA-256 before it
    hands out the last of them and raises ``ChecksumMismatch`` instead: a store then never
    receives the whole part, so never keeps wrong bytes, even one that does not check the
    checksum sent with the part itself (moto does not).

    ``failure``: what the body raised while it was read, None until then. An HTTP stack may
    wrap it (awscrt's signer turns it into ``AwsCrtError``); the backend raises this instead.
    ``sha256``: the hex SHA-256 the body checks its bytes against; a backend given the same
    need not hash them again (the local one does not).
    """

    failure: Exception | None
    sha256: str

    def __len__(self) -> int: ...

    def read(self, size: int = -1, /) -> bytes: ...

    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def tell(self) -> int: ...


class ObjectStream(Protocol):
    """One stored object being read from its start (``Storage.open_stream``).

    ``read(size)`` returns up to ``size`` bytes (``b""`` at the end); ``metadata`` is what
    ``put`` stored with the object (``{}`` when nothing was); ``object_size`` the size of the
    whole object when the read was opened (S3: a ranged GET's ``Content-Range`` total), None
    when the store did not say.
    """

    @property
    def metadata(self) -> Mapping[str, str]: ...

    @property
    def object_size(self) -> int | None: ...

    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class Storage(Protocol):
    """Object storage as cloud-dump needs it. See the module docstring for the contract."""

    @property
    def url(self) -> str:
        """Where this storage points, without credentials (safe to log)."""
        ...

    @property
    def capabilities(self) -> Capabilities: ...

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        """Store ``data`` under ``key``. ``sha256``: the hex SHA-256 of ``data`` when the
        caller has just checked it (it saves the backend a pass over the bytes; the store
        still verifies it where it can); else the backend computes it."""
        ...

    def get(self, key: str) -> bytes: ...

    def open_stream(self, key: str) -> ObjectStream:
        """``key`` to read in chunks, from its start; ``ObjectNotFound`` when missing."""
        ...

    def open_range_stream(self, key: str, start: int, length: int) -> ObjectStream:
        """``get_range``'s bytes read in chunks, as ``open_stream`` reads an object (restore
        streams large ranges instead of holding them whole); ``ObjectNotFound`` when missing."""
        ...

    def get_range(self, key: str, start: int, length: int) -> bytes: ...

    def head(self, key: str) -> ObjectInfo: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``, in key order."""
        ...

    def delete(self, key: str) -> None: ...

    def delete_many(self, keys: Sequence[str]) -> None:
        """Delete every key of ``keys`` (any number; a missing key counts as deleted, as S3's
        DeleteObjects reports it), in no particular order. Every key is checked before anything
        is deleted (``ValueError`` for a malformed one). A key that could not be deleted raises
        ``PermanentStorageError`` or, when every failure may pass, ``StorageUnreachable``,
        naming it and how many failed; the other keys may or may not be gone then.
        """
        ...

    def create_multipart(self, key: str) -> str:
        """Start a multipart upload of ``key`` and return its upload id."""
        ...

    def upload_part(
        self,
        key: str,
        upload_id: str,
        part_number: int,
        data: bytes | PartBody,
        *,
        sha256: str,
        offset: int | None = None,
    ) -> UploadedPart:
        """Store part ``part_number`` (1-based); ``sha256`` is the hex digest of ``data``.

        ``data``: the bytes, or a ``PartBody`` read as they are sent. ``offset``: where the
        part will start in the completed object (bytes), when the caller knows it because
        every part before it has the same size; a store that can write the part there at once
        does (the local one: completing then moves no bytes), S3 ignores it. Completion takes
        the parts it is given either way. Raises ``ChecksumMismatch`` when the bytes do not
        match ``sha256`` (the store verifies it where it can; a backend that cannot sends it
        along for the store to check), and whatever a ``PartBody`` raises while it is read.
        """
        ...

    def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[UploadedPart]
    ) -> ObjectInfo: ...

    def abort_multipart(self, key: str, upload_id: str) -> None: ...

    # builtins.list: inside this class, ``list`` names the method above.
    def list_multipart_uploads(self, prefix: str) -> builtins.list[MultipartUpload]: ...

    def uploaded_bytes(self, key: str, upload_id: str) -> int:
        """Bytes of the parts uploaded so far to an upload in progress: what the store keeps,
        and bills for, until the upload is completed or aborted."""
        ...

    def close(self) -> None:
        """Release connections; the object must not be used afterwards."""
        ...


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``: the checksum format used across cloud-dump."""
    return hashlib.sha256(data).hexdigest()


_METADATA_KEY_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


def validate_metadata(metadata: Mapping[str, str]) -> Mapping[str, str]:
    """Return ``metadata`` if every backend can store it unchanged, else raise ``ValueError``.

    S3 lower-cases keys and limits headers to printable ASCII, so that is the common ground.
    """
    for key, value in metadata.items():
        if not _METADATA_KEY_RE.fullmatch(key):
            raise ValueError(f"invalid metadata key '{key}'")
        if len(value) > 1024 or not all(" " <= c <= "~" for c in value):
            raise ValueError(f"invalid metadata value for '{key}'")
    return metadata


def validate_key(key: str) -> str:
    """Return ``key`` if it is a well-formed relative key, else raise ``ValueError``.

    Both backends call this so that a key accepted by one is accepted by the other; the local
    backend relies on it to keep every path inside its root.
    """
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"invalid storage key '{key}'")
    segments = key.split("/")
    # A trailing "/" is never an object key; empty, "." and ".." segments could escape a root.
    if any(s in ("", ".", "..") for s in segments):
        raise ValueError(f"invalid storage key '{key}'")
    return key
