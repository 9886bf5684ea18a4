"""Where a WAL command keeps its spool: ``<pg_wal>/cloud-dump`` or ``--spool-dir``.

Shared by wal-push and wal-fetch, and loaded by the fast path: standard library ``os`` only.
"""

from __future__ import annotations

import os


def wal_spool_dir(wal_path: str, spool_dir: str | None) -> str | None:
    """The spool of a WAL command for ``wal_path`` (``%p``); None: it has none.

    ``--spool-dir`` when given; otherwise ``<pg_wal>/cloud-dump`` when ``%p`` is in a
    directory named ``pg_wal`` (PostgreSQL runs the command in the data directory with
    ``%p`` = ``pg_wal/NAME``). Run by hand on a file elsewhere, a command creates nothing.
    """
    if spool_dir:
        return spool_dir
    # Not realpath(): pg_wal may be a symbolic link (initdb --waldir), its name is what counts.
    parent = os.path.dirname(os.path.abspath(wal_path))
    if os.path.basename(parent) == "pg_wal" and os.path.isdir(parent):
        return os.path.join(parent, "cloud-dump")
    return None
