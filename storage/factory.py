"""Opening a store: ``open_storage(url, options)`` is the only place that names a backend;
``storage_url(url)`` says where a URL points without opening it.

Backends are imported lazily so that a command using local storage never pays for boto3.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

from storage.base import MIN_CONFIGURABLE_PART_COUNT, S3_MAX_PART_COUNT, Storage
from storage.errors import ConfigError


@dataclass(frozen=True)
class StorageOptions:
    """How to reach a store. Credentials are never here: boto3's standard chain supplies them."""

    s3_endpoint: str | None = None
    s3_region: str | None = None
    # None means: path-style when a custom endpoint is given (MinIO, moto, most gateways),
    # virtual-hosted style on AWS.
    s3_path_style: bool | None = None
    max_part_count: int = S3_MAX_PART_COUNT
    max_attempts: int = 5
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not MIN_CONFIGURABLE_PART_COUNT <= self.max_part_count <= S3_MAX_PART_COUNT:
            raise ConfigError(
                f"max part count {self.max_part_count} is outside "
                f"{MIN_CONFIGURABLE_PART_COUNT}..{S3_MAX_PART_COUNT}"
            )
        if self.max_attempts < 1:
            raise ConfigError("storage max attempts must be at least 1")


def open_storage(url: str, options: StorageOptions | None = None) -> Storage:
    """Open the store that ``url`` names: ``s3://bucket[/prefix]`` or ``file:///path``."""
    options = options or StorageOptions()
    scheme, where, prefix = _parse(url)
    if scheme == "s3":
        from storage.s3 import S3Storage

        return S3Storage(where, prefix, options)
    from storage.local import LocalStorage

    return LocalStorage(where, options)


def storage_url(url: str) -> str:
    """The location ``url`` names, spelt as the opened store's ``Storage.url`` would spell it.

    Without opening anything (no client, no import of a backend, no credentials): a
    coordinator that hands the work to workers compares this with the workers' ``Storage.url``.
    Only the location counts, never the endpoint: one store may be reached through several.
    """
    scheme, where, prefix = _parse(url)
    if scheme == "s3":
        return f"s3://{where}/{prefix}" if prefix else f"s3://{where}"
    return local_url(where)


def local_url(root_path: str) -> str:
    """``Storage.url`` of the local store rooted at ``root_path`` (trailing "/" and "//" folded,
    as ``pathlib`` does; symbolic links are not resolved: another host may see another path)."""
    return f"file://{PurePosixPath(root_path)}"


def _parse(url: str) -> tuple[str, str, str]:
    """("s3", bucket, prefix) or ("file", absolute root path, "")."""
    # A comment after the value in a config file ("s3://b/pg # prod") would otherwise become a
    # prefix "pg # prod" (urlsplit even drops what follows '#'), and the archive a new one.
    odd = next((c for c in url if c.isspace() or c in "#?"), None)
    if odd is not None:
        shown = "whitespace" if odd.isspace() else f"'{odd}'"
        raise ConfigError(
            f"storage URL '{url}' contains {shown}: storage URLs take no spaces, query or "
            "fragment (a comment after the value? config files take comments on lines of "
            "their own)"
        )
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ConfigError(f"storage URL '{url}' names no bucket")
        return "s3", parts.netloc, parts.path.strip("/")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ConfigError(f"storage URL '{url}' must be file:///absolute/path")
        return "file", unquote(parts.path), ""
    raise ConfigError(
        f"unsupported storage URL '{url}': expected s3://bucket[/prefix] or file:///path"
    )
