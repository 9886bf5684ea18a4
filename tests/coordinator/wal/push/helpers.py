"""Shared by the wal-push test modules of this package."""

from __future__ import annotations

from storage.base import Storage


def stored(storage: Storage, prefix: str = "wal_archive/") -> dict[str, str]:
    """Every object under ``prefix`` with its etag: equal before and after means unchanged."""
    return {info.key: info.etag for info in storage.list(prefix)}
