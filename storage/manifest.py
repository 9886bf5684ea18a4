"""``manifest.json``: the record of one backup, written last (DESIGN.md §5).

A backup exists once its manifest exists. The manifest names every stored object of the backup
with its size and SHA-256 and, per archive, the parts it was uploaded in, so that restore can
fetch in parallel and verify what it fetched. It holds no secret: encryption is described by
public keys, or by the key of a passphrase-wrapped identity.

Versioned: readers accept ``format_version`` 1 and refuse what they do not know.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storage.errors import PermanentStorageError
from storage.layout import CompressedBy as CompressedBy
from storage.layout import Compression as Compression

FORMAT_VERSION = 1


class _Model(BaseModel):
    # Unknown fields are kept out: a newer writer's extra data must not be silently dropped
    # on a round trip by an older reader, so older readers refuse instead (format_version).
    model_config = ConfigDict(extra="forbid", frozen=True)


class PartRecord(_Model):
    number: int = Field(ge=1)
    size: int = Field(ge=0)
    sha256: str


class ArchiveRecord(_Model):
    """One stored tablespace archive: ``base`` (PGDATA) or a tablespace oid."""

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


class EncryptionInfo(_Model):
    """How the backup's objects are encrypted with age.

    ``recipients``: the X25519 public keys the data was encrypted to (restore needs a matching
    identity). ``passphrase``: the data was encrypted to a fresh X25519 identity, stored
    passphrase-encrypted at ``wrapped_identity_key`` (``age -d`` reads it with the passphrase).
    """

    mode: Literal["recipients", "passphrase"]
    recipients: list[str] = Field(default_factory=list)
    wrapped_identity_key: str | None = None


class BackupManifest(_Model):
    format_version: Literal[1] = 1
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
                f"{FORMAT_VERSION}): written by a newer version?")  # fmt: skip
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in where)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return (f"is not a valid cloud-dump manifest: field '{field.lstrip('.')}': "
            f"{message[:1].lower()}{message[1:]}{more}")  # fmt: skip
