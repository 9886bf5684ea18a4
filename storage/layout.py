"""Where things live in a store: the seed's flat and ``--cluster`` key layouts, in one place.

Flat (no cluster)::

    <name>/manifest.json
    <name>/base.tar.zst[.age]            <name>/<oid>.tar.zst[.age]
    <name>/base.tar.zst[.age].0002 ...   (an archive longer than --s3-max-parts parts)
    <name>/backup_manifest[.age]
    <wal_prefix>/<segment>.zst[.age]     (wal_prefix defaults to "wal_archive")

Cluster ``C``::

    C/backup/<name>/...                  C/wal_archive/<segment>...

A WAL prefix other than the default is refused with a cluster (the seed's ``--wal-prefix`` is
"flat layout only"), rather than silently ignored.

Keys are relative to the storage URL's prefix, which the backend applies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from storage.errors import ConfigError

# The compressions by name, and the suffix each gives a stored object's key (after ``.tar`` for a
# backup archive, after the file name for WAL): the seed tool's layout and PostgreSQL's own
# archive names (``base.tar.zst``, ``.tar.gz``, ``.tar.lz4``), so never to change. This is the
# part of the compression registry that storage and the workers need; levels, compressors and
# decoders are ``coordinator.codecs``'.
Compression = Literal["zstd", "gzip", "lz4", "none"]
COMPRESSION_SUFFIXES: dict[Compression, str] = {
    "zstd": ".zst",
    "gzip": ".gz",
    "lz4": ".lz4",
    "none": "",
}
COMPRESSIONS: tuple[Compression, ...] = tuple(COMPRESSION_SUFFIXES)
# Who compressed a backup archive (its manifest record): PostgreSQL, cloud-dump, or nobody.
CompressedBy = Literal["server", "client", "none"]
ENCRYPTED_SUFFIX = ".age"
# Every suffix a stored WAL object's key may carry after the file name: a compression's, then
# ``.age`` when encrypted ("", ".zst", ".zst.age", ..., ".age").
WAL_OBJECT_SUFFIXES = frozenset(
    c + e for c in COMPRESSION_SUFFIXES.values() for e in ("", ENCRYPTED_SUFFIX)
)
DEFAULT_WAL_PREFIX = "wal_archive"
# In a WAL archive: the archive's identity (workers.wal.WalArchiveInfo), and the metadata key of
# each WAL object holding the SHA-256 of the original file (wal-push writes it, wal-fetch checks).
WAL_ARCHIVE_INFO_NAME = "cloud-dump-archive.json"
WAL_RAW_SHA256 = "raw-sha256"
# What ``restore --name`` takes for "the newest backup", so no backup may be called so.
LATEST_NAME = "latest"
MANIFEST_NAME = "manifest.json"
# A pinned backup's pin (``cloud-dump keep``): {"until": ISO time or null, "pinned_at": ...}.
KEEP_NAME = "keep.json"
BACKUP_MANIFEST_NAME = "backup_manifest"
# The last outcome of ``cloud-dump verify`` (storage.verifyresult), a file directly in the
# backups root: never under a backup's prefix, so no listing takes it for a backup.
VERIFY_RESULT_NAME = "cloud-dump-verify.json"

# Backup and cluster names become key segments: keep them to a portable, unambiguous set.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid backup or cluster name, else raise ``ConfigError``."""
    if not _NAME_RE.fullmatch(value) or ".." in value:
        raise ConfigError(
            f"invalid {kind} name '{value}': use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return value


def compression_named(compression: str) -> Compression:
    """``compression`` as a ``Compression``; ``ConfigError`` naming the choices if unknown."""
    for known in COMPRESSIONS:
        if known == compression:
            return known
    raise ConfigError(f"unknown compression '{compression}': use one of {', '.join(COMPRESSIONS)}")


def compression_suffix(compression: str) -> str:
    """The key suffix of ``compression`` (".zst", ".gz", ".lz4", "" for "none");
    ``ConfigError`` naming the choices if unknown."""
    return COMPRESSION_SUFFIXES[compression_named(compression)]


def compression_of_suffix(suffix: str) -> Compression | None:
    """The compression whose key suffix is exactly ``suffix`` ("" is "none"), None if none is."""
    for name, known in COMPRESSION_SUFFIXES.items():
        if known == suffix:
            return name
    return None


@dataclass(frozen=True)
class Layout:
    """Key layout for one store: flat when ``cluster`` is None, cluster layout otherwise."""

    cluster: str | None = None
    wal_prefix: str = DEFAULT_WAL_PREFIX

    def __post_init__(self) -> None:
        if self.cluster is not None:
            validate_name("cluster", self.cluster)
        segments = self.wal_prefix.strip("/").split("/")
        if any(s in ("", ".", "..") for s in segments):
            raise ConfigError(f"invalid WAL prefix '{self.wal_prefix}'")
        # The seed documents --wal-prefix as "flat layout only" and --cluster as deriving the
        # WAL prefix: a prefix given with a cluster would be ignored, so a push, fetch or
        # restore would use another archive than the one the operator named.
        if self.cluster is not None and self.wal_prefix.strip("/") != DEFAULT_WAL_PREFIX:
            raise ConfigError(
                f"WAL prefix '{self.wal_prefix}' cannot be used with cluster '{self.cluster}': "
                f"the cluster layout keeps its WAL in '{self.cluster}/{DEFAULT_WAL_PREFIX}/' "
                "(--wal-prefix and CLOUD_DUMP_WAL_PREFIX are for the flat layout only)"
            )

    @property
    def backups_root(self) -> str:
        """Prefix under which every backup directory lives ("" in the flat layout)."""
        return f"{self.cluster}/backup/" if self.cluster else ""

    @property
    def wal_root(self) -> str:
        """Prefix of the WAL archive, ending in "/"."""
        if self.cluster:
            return f"{self.cluster}/wal_archive/"
        return self.wal_prefix.strip("/") + "/"

    def describe_backups_root(self, storage_url: str) -> str:
        """Where this layout's backups are looked for, in full, for messages: the storage URL
        with the backups root, and the layout (a mistyped or forgotten cluster shows)."""
        where = f"'{storage_url.rstrip('/')}/{self.backups_root}'"
        if self.cluster:
            return f"{where} (cluster '{self.cluster}')"
        return f"{where} (flat layout: no cluster)"

    def backup_prefix(self, name: str) -> str:
        validate_name("backup", name)
        # In the flat layout a backup named like the WAL prefix would share its directory.
        if self.cluster is None and name == self.wal_root.split("/")[0]:
            raise ConfigError(f"backup name '{name}' is reserved for the WAL archive")
        if name == VERIFY_RESULT_NAME:  # a local store cannot hold a file and a directory so named
            raise ConfigError(f"backup name '{name}' is reserved for verify's result")
        return f"{self.backups_root}{name}/"

    def verify_result_key(self) -> str:
        """Where ``cloud-dump verify`` records its last outcome: beside the backups, in their
        root (``cloud-dump-verify.json``, or ``<cluster>/backup/cloud-dump-verify.json``)."""
        return self.backups_root + VERIFY_RESULT_NAME

    def manifest_key(self, name: str) -> str:
        return self.backup_prefix(name) + MANIFEST_NAME

    def backup_manifest_key(self, name: str, *, encrypted: bool) -> str:
        return self.backup_prefix(name) + BACKUP_MANIFEST_NAME + _enc(encrypted)

    def archive_key(self, name: str, archive: str, compression: str, *, encrypted: bool) -> str:
        """Key of one tablespace archive: ``archive`` is "base" or a tablespace oid."""
        if archive != "base" and not archive.isdigit():
            raise ValueError(f"invalid archive name '{archive}'")
        return (
            f"{self.backup_prefix(name)}{archive}.tar"
            f"{compression_suffix(compression)}{_enc(encrypted)}"
        )

    @staticmethod
    def archive_object_key(archive_key: str, index: int) -> str:
        """Key of object ``index`` (from 0) of an archive stored as several objects: the first
        at ``archive_key``, then ``<archive_key>.0002``, ``.0003``... (``cat`` them in order for
        the stored stream)."""
        if index < 0:
            raise ValueError(f"invalid object index {index}")
        return archive_key if index == 0 else f"{archive_key}.{index + 1:04d}"

    @staticmethod
    def is_later_object(key: str) -> bool:
        """Whether ``key`` is an archive's object after its first (``archive_object_key``)."""
        return _LATER_OBJECT.search(key) is not None

    def wal_key(self, file_name: str, compression: str, *, encrypted: bool) -> str:
        return f"{self.wal_root}{file_name}{compression_suffix(compression)}{_enc(encrypted)}"


_LATER_OBJECT = re.compile(r"\.tar[.a-z0-9]*\.[0-9]{4,}$")


def _enc(encrypted: bool) -> str:
    return ENCRYPTED_SUFFIX if encrypted else ""
