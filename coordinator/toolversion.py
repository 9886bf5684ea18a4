"""The installed cloud-dump's version, for ``--version`` and for each backup's manifest."""

from __future__ import annotations

import functools


@functools.cache
def tool_version() -> str:
    """The installed distribution's version (pyproject.toml), or "unknown" when run from a
    source tree that was never installed.

    Looked up when first asked, not at import: ``importlib.metadata`` and the look-up cost
    every command ~25 ms that only ``--version`` and a backup's manifest need."""
    import importlib.metadata

    try:
        return importlib.metadata.version("cloud-dump")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
