"""``manifest.json``: the record of one backup, written last (DESIGN.md §5).

A backup exists once its manifest exists. The manifest names every stored object of the backup
with its size and SHA-256 and, per archive, the parts it was uploaded in, so that restore can
fetch in parallel and verify what it fetched. It holds no secret: encryption is described by
public keys, or by the key of a passphrase-wrapped identity.

Versioned: readers accept the ``format_version`` numbers in ``READ_VERSIONS`` and refuse what they
do not know. A writer records the lowest version that holds what it writes (``version_for``), so
that older cloud-dump versions keep reading every manifest they can:

- 1: the first format;
- 2: a passphrase backup's wrapped key recorded with its size and SHA-256
  (``EncryptionInfo.wrapped_identity_size``, ``wrapped_identity_sha256``). Version 1 readers
  refuse unknown fields, so of such a manifest they say "written by a newer version?" rather
  than fail on a field's name; every other manifest is still written as version 1, without
  the fields;
- 3: an archive stored as more than one object (``ArchiveRecord.objects``): a store takes at most
  ``--s3-max-parts`` parts per object, so a longer archive continues in another object rather
  than in larger parts. Every other manifest is written as before, without the field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from storage.base import sha256_hex
from storage.errors import IntegrityError, PermanentStorageError
from storage.layout import CompressedBy as CompressedBy
from storage.layout import Compression as Compression

FORMAT_VERSION = 3  # the newest this version reads and writes
READ_VERSIONS = (1, 2, 3)


class _Model(BaseModel):
    # Unknown fields are kept out: a newer writer's extra data must not be silently dropped
    # on a round trip by an older reader, so older readers refuse instead (format_version).
    model_config = ConfigDict(extra="forbid", frozen=True)


class PartRecord(_Model):
    number: int = Field(ge=1)
    size: int = Field(ge=0)
    sha256: str


class StoredObject(_Model):
    """One object of an archive stored as several: ``key``, its ``size`` in bytes, its SHA-256
    (hex), and how many of the archive's ``parts`` it holds (the next ones after the previous
    object's)."""

    key: str
    size: int = Field(ge=0)
    sha256: str
    parts: int = Field(ge=1)


class ArchiveRecord(_Model):
    """One stored tablespace archive: ``base`` (PGDATA) or a tablespace oid.

    ``stored_size`` and ``sha256`` are of the whole stored stream; ``parts`` are numbered from 1
    across it. Stored as one object (almost always) it is the object at ``key`` and ``objects``
    is empty; as several, ``objects`` lists them in order, the first at ``key``, and the stream
    is their concatenation (``stored_objects``).
    """

    name: str
    key: str
    tablespace_oid: int | None = None
    # Where the tablespace lived on the server; restore puts it there unless remapped.
    tablespace_location: str | None = None
    compression: Compression
    compressed_by: CompressedBy
    encrypted: bool
    stored_size: int = Field(ge=0)
    sha256: str
    parts: list[PartRecord]
    objects: list[StoredObject] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _leave_out_single_object(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Readers of versions 1 and 2 refuse the field even when empty: an archive of one
        # object is written as they know it.
        data: dict[str, Any] = handler(self)
        if not data.get("objects"):
            data.pop("objects", None)
        return data

    @property
    def stored_objects(self) -> list[StoredObject]:
        """The objects holding the stored stream, in order (one for most archives)."""
        if self.objects:
            return list(self.objects)
        parts = max(len(self.parts), 1)
        return [StoredObject(key=self.key, size=self.stored_size, sha256=self.sha256,
                             parts=parts)]  # fmt: skip

    @property
    def largest_part(self) -> int:
        """Bytes of the largest part (0 when none is recorded): sizes ranged reads."""
        return max((p.size for p in self.parts), default=0)


class EncryptionInfo(_Model):
    """How the backup's objects are encrypted with age.

    ``recipients``: the X25519 public keys the data was encrypted to (restore needs a matching
    identity). ``passphrase``: the data was encrypted to a fresh X25519 identity, stored
    passphrase-encrypted at ``wrapped_identity_key`` (``age -d`` reads it with the passphrase),
    an object of ``wrapped_identity_size`` bytes with SHA-256 ``wrapped_identity_sha256`` (hex;
    both None in manifests of format version 1, which did not record them).
    """

    mode: Literal["recipients", "passphrase"]
    recipients: list[str] = Field(default_factory=list)
    wrapped_identity_key: str | None = None
    wrapped_identity_size: int | None = Field(default=None, ge=0)
    wrapped_identity_sha256: str | None = None

    @model_serializer(mode="wrap")
    def _leave_out_unrecorded(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Version 1 readers refuse these fields even when null: left out, a manifest that does
        # not record the checksum stays readable by them.
        data: dict[str, Any] = handler(self)
        for name in ("wrapped_identity_size", "wrapped_identity_sha256"):
            if data.get(name) is None:
                data.pop(name, None)
        return data

    @property
    def wrapped_identity_recorded(self) -> bool:
        """Whether the wrapped key's size and SHA-256 are recorded (format version 2)."""
        return self.wrapped_identity_size is not None and self.wrapped_identity_sha256 is not None

    def check_wrapped_identity(self, data: bytes) -> None:
        """Raise ``IntegrityError`` naming the wrapped key when ``data`` (its stored bytes) is
        not of its recorded size and SHA-256; nothing to check when none is recorded."""
        key, size, sha256 = (self.wrapped_identity_key, self.wrapped_identity_size,
                             self.wrapped_identity_sha256)  # fmt: skip
        if key is not None and size is not None and sha256 is not None:
            check_stored(data, key, size, sha256)


class BackupManifest(_Model):
    format_version: Literal[1, 2, 3] = 1
    name: str
    cluster: str | None = None
    tool_version: str
    pg_version: str
    pg_version_num: int
    system_identifier: str
    timeline: int
    start_lsn: str
    end_lsn: str
    start_wal_file: str
    end_wal_file: str
    start_time: datetime
    end_time: datetime
    compression: Compression
    compression_level: int | None = None
    encryption: EncryptionInfo | None = None
    archives: list[ArchiveRecord]
    backup_manifest_key: str
    backup_manifest_size: int
    backup_manifest_sha256: str

    @property
    def encrypted(self) -> bool:
        return self.encryption is not None

    @property
    def stored_size(self) -> int:
        return sum(a.stored_size for a in self.archives) + self.backup_manifest_size

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes, key: str) -> BackupManifest:
        """The manifest stored at ``key``; ``PermanentStorageError`` saying in one line what is
        wrong with it (not JSON, not an object, another format version, the first field that
        does not validate), never the bytes themselves."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise PermanentStorageError(f"manifest '{key}' {_what_is_wrong(exc)}") from exc


def version_for(
    encryption: EncryptionInfo | None, archives: list[ArchiveRecord] | None = None
) -> Literal[1, 2, 3]:
    """The lowest format version that records ``encryption`` and ``archives``: what a writer
    puts in ``format_version`` (see the module docstring)."""
    if any(a.objects for a in archives or []):
        return 3
    if encryption is not None and (
        encryption.wrapped_identity_size is not None
        or encryption.wrapped_identity_sha256 is not None
    ):
        return 2
    return 1


def check_stored(data: bytes, key: str, size: int, sha256: str) -> None:
    """Raise ``IntegrityError`` naming ``key`` when ``data``, the object read from it, is not
    ``size`` bytes with SHA-256 ``sha256`` (hex), as ``manifest.json`` records."""
    if len(data) != size:
        raise IntegrityError(f"object '{key}' is {len(data)} bytes, manifest.json records {size}")
    actual = sha256_hex(data)
    if actual != sha256.lower():
        raise IntegrityError(f"object '{key}' does not match its recorded sha256 "
                             f"(expected {sha256}, got {actual})")  # fmt: skip


def _what_is_wrong(exc: ValidationError) -> str:
    """``exc``'s first error as the rest of a sentence starting with the manifest's key."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    kind, where, message = first["type"], first["loc"], first["msg"]
    if kind == "json_invalid":
        return f"is not valid JSON ({message.removeprefix('Invalid JSON: ')})"
    if not where:
        return "is not a JSON object"
    if where == ("format_version",):
        return (f"has a format_version this cloud-dump does not read (it reads "
                f"{_listed(READ_VERSIONS)}): written by a newer "
                "version?")  # fmt: skip
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in where)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return (f"is not a valid cloud-dump manifest: field '{field.lstrip('.')}': "
            f"{message[:1].lower()}{message[1:]}{more}")  # fmt: skip


def _listed(numbers: tuple[int, ...]) -> str:
    """``1, 2 and 3``."""
    *head, last = map(str, numbers)
    return f"{', '.join(head)} and {last}" if head else last
