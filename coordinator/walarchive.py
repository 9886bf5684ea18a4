"""Whether a WAL archive exists at a location: the line between "not archived" and "no archive".

PostgreSQL reads restore_command's exit 1 as "this file is not in the archive" and, at the end
of the archive, promotes. So exit 1 may only be given for an archive that exists: a location
with no archive at all (a ``file://`` directory that is not there, an S3 prefix with a typo, a
wrong ``--cluster``) is an infrastructure failure, and recovery must stop instead of promoting
early with part of the data. ``restore`` with a recovery target asks the same question before it
writes anything.

An archive exists when its identity object (``cloud-dump-archive.json``, written by the first
``wal-push``) is there or, for archives written by the seed tool, which has no identity object,
when any object lies under the WAL prefix.
"""

from __future__ import annotations

from storage.base import Storage
from storage.errors import ObjectNotFound, WalArchiveNotFound
from storage.layout import WAL_ARCHIVE_INFO_NAME, Layout


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
