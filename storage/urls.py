"""Storage URLs: ``s3://bucket[/prefix]`` and ``file:///path``, parsed and compared without
opening a store (no client, no backend import, no credentials)."""

from __future__ import annotations

from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

from storage.errors import ConfigError


def storage_url(url: str) -> str:
    """The location ``url`` names, spelt as the opened store's ``Storage.url`` would spell it.

    Without opening anything (no client, no import of a backend, no credentials): a
    coordinator that hands the work to workers compares this with the workers' ``Storage.url``.
    Only the location counts, never the endpoint: one store may be reached through several.
    """
    scheme, where, prefix = parse_storage_url(url)
    if scheme == "s3":
        return f"s3://{where}/{prefix}" if prefix else f"s3://{where}"
    return local_url(where)


def local_url(root_path: str) -> str:
    """``Storage.url`` of the local store rooted at ``root_path`` (trailing "/" and "//" folded,
    as ``pathlib`` does; symbolic links are not resolved: another host may see another path)."""
    return f"file://{PurePosixPath(root_path)}"


def parse_storage_url(url: str) -> tuple[str, str, str]:
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
