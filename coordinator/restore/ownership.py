"""Who owns what a restore writes, when it runs as root.

PostgreSQL refuses to run as root and to use a data directory it does not own, and
``restore_command`` runs as the server's OS user: a restore run by root must hand everything it
writes to that user. As pgBackRest does, the user is the owner of PGDATA when it exists (an
empty directory prepared for the server), else of the directory it goes into (the nearest
existing parent), looked at before anything is created; or the one ``--owner USER[:GROUP]``
names. When that is root, the files stay root's, with a warning: the copy cannot start until
they are given to the server's user. ``resolve_owner`` decides before anything is downloaded;
its warning is said by ``announce`` once nothing refused the restore (a target that is not
empty is the error to read then, not a warning about owners); ``give_to`` changes the owner of
whole trees without following links.

Not run as root, nothing changes owner: files are the invoking user's, and ``--owner`` may only
name that user (only root can give files away).
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from storage.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int
    name: str
    # Said by ``announce`` once the restore goes ahead: the copy cannot start as it is.
    warning: str | None = None


_ROOT_HINT = ("PostgreSQL cannot run as root: give them to the server's OS user before "
              "starting it (chown -R), or restore with --owner USER")


def resolve_owner(requested: str | None, pgdata: Path) -> Owner | None:
    """The owner restored files get; None when they keep the owner the process gives them
    (not run as root).

    Raises ``ConfigError`` for an unknown user or group, and for ``--owner`` naming another
    user when not root. Leaving the files to root is done (a copy may be restored to be looked
    at, or chowned later) but said clearly (``announce``), since PostgreSQL cannot run as root.
    """
    if os.geteuid() != 0:
        if requested is not None and _parse(requested).uid != os.geteuid():
            raise ConfigError(
                f"--owner '{requested}': only root can give restored files to another user"
            )
        return None
    if requested is not None:
        owner = _parse(requested)
        if owner.uid != 0:
            return owner
        warning = f"--owner '{requested}' leaves the restored files to root, and {_ROOT_HINT}"
        return Owner(owner.uid, owner.gid, owner.name, warning)
    # PGDATA itself when it exists: an operator who prepared it for the server (often inside
    # a directory of root's, such as /var/lib/postgresql/15) made that choice already.
    source = pgdata if pgdata.is_dir() else nearest_existing_parent(pgdata)
    stat = source.stat()
    if stat.st_uid != 0:
        return Owner(stat.st_uid, stat.st_gid, _user_name(stat.st_uid))
    what = "into" if source == pgdata else "under"
    warning = (f"restoring as root {what} '{source}', which root owns: the restored files are "
               f"root's, and {_ROOT_HINT}")
    return Owner(0, stat.st_gid, "root", warning)


def announce(owner: Owner | None) -> None:
    """Say ``owner``'s warning, if it has one: called once nothing refused the restore."""
    if owner is not None and owner.warning:
        log.warning("%s", owner.warning)


def nearest_existing_parent(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def give_to(owner: Owner, trees: Iterable[Path], single: Iterable[Path] = ()) -> None:
    """Make ``owner`` the owner of every entry of ``trees`` and of each path in ``single``.

    Symbolic links are changed themselves, never followed (pg_tblspc links point at tablespaces
    that are walked as trees of their own). Missing paths are skipped.
    """
    for tree in trees:
        for directory, dir_names, file_names in os.walk(tree):
            _chown(owner, Path(directory))
            for name in (*dir_names, *file_names):
                _chown(owner, Path(directory) / name)
    for path in single:
        _chown(owner, path)


def _chown(owner: Owner, path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.chown(path, owner.uid, owner.gid, follow_symlinks=False)


def _parse(requested: str) -> Owner:
    user, _, group = requested.partition(":")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"--owner '{requested}': no user '{user}' on this host") from None
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"--owner '{requested}': no group '{group}' on this host") from None
    return Owner(entry.pw_uid, gid, entry.pw_name)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
