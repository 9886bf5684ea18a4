"""Where a restore writes: the target directories, checked before anything is written, and
taken back if the restore fails.

``plan_targets`` decides where each archive of a backup goes (PGDATA, each tablespace at its
recorded location or where ``--tablespace-mapping`` says) and refuses, before the disk is
touched, targets that overlap or are not empty. A tablespace location is never resolved against
the current directory: the relative location ``pg_tblspc/<oid>`` of an in-place tablespace
(PostgreSQL 16+) means that directory inside the new PGDATA; any other relative location is
refused. ``CreatedPaths`` holds each target for one run, and records what the run made or
filled, to undo it and to hand it over.

Two restores into the same directory at once: each target is held with an exclusive ``flock``
on the directory itself, taken before the emptiness check that counts and kept until the restore
ends. The second restore refuses (``TargetNotEmpty``) having written and removed nothing; without
the lock both would pass the check, write into each other's files, and the failing one's cleanup
would gut the other's restore. The lock is on the directory, not a file in it: PostgreSQL wants
the directory empty, and the kernel drops the lock of a restore that dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from coordinator.restore.extract import PARTIAL_SUFFIX, naming
from storage.errors import ConfigError, IntegrityError, TargetNotEmpty
from storage.kernelsync import sync_filesystem
from storage.manifest import BackupManifest

DIR_MODE = 0o700
_TBLSPC_DIR = "pg_tblspc"
_PG_CONTROL = "global/pg_control"
# Written early by every restore into PGDATA, while global/pg_control comes last: with one and
# not the other, the directory is what an interrupted restore leaves.
_RESTORE_WRITES = ("PG_VERSION", "backup_label", f"{_PG_CONTROL}{PARTIAL_SUFFIX}")
# Times prepare looks again at a target that a failing restore removed while this one waited.
_PREPARE_ATTEMPTS = 3


@dataclass(frozen=True)
class TargetPlan:
    pgdata: Path
    tablespaces: dict[str, Path]  # oid → directory this restore puts the tablespace in
    # In-place tablespaces (PostgreSQL 16+, LOCATION ''): recorded at the relative location
    # pg_tblspc/<oid>, restored as that directory inside PGDATA instead of a link.
    in_place: frozenset[str] = frozenset()

    def outside(self) -> dict[str, Path]:
        """The tablespaces that live outside PGDATA, behind a pg_tblspc link."""
        return {oid: path for oid, path in self.tablespaces.items() if oid not in self.in_place}


def plan_targets(
    manifest: BackupManifest, pgdata: Path, tablespace_mapping: Mapping[str, str]
) -> TargetPlan:
    """Where each archive goes; ``TargetNotEmpty``/``ConfigError`` before anything is written.

    A location is never resolved against the current directory: the relative location
    ``pg_tblspc/<oid>`` of an in-place tablespace means that directory inside the new PGDATA,
    and any other relative location is refused.
    """
    mapping = _normalized_mapping(tablespace_mapping)
    unused = set(mapping)
    root = pgdata.absolute()
    tablespaces: dict[str, Path] = {}
    in_place: set[str] = set()
    for archive in manifest.archives:
        if archive.tablespace_oid is None:
            continue
        oid = str(archive.tablespace_oid)
        location = _recorded_location(manifest.name, oid, archive.tablespace_location)
        if location is None:
            in_place.add(oid)
            tablespaces[oid] = root / _TBLSPC_DIR / oid
            continue
        unused.discard(location)
        tablespaces[oid] = Path(mapping.get(location, location))
    if unused:
        raise ConfigError(
            "tablespace mapping names no tablespace of backup "
            f"'{manifest.name}': {', '.join(sorted(unused))}"
        )
    plan = TargetPlan(root, tablespaces, frozenset(in_place))
    _check_distinct(plan)
    for path in (plan.pgdata, *plan.outside().values()):
        _check_empty(path)
    return plan


def _recorded_location(backup: str, oid: str, location: str | None) -> str | None:
    """The normalised absolute location of tablespace ``oid``; None for an in-place one."""
    if not location:
        raise IntegrityError(f"backup '{backup}' records no location for tablespace {oid}")
    if Path(location).is_absolute():
        return os.path.normpath(location)
    if os.path.normpath(location) == f"{_TBLSPC_DIR}/{oid}":
        return None
    raise IntegrityError(
        f"backup '{backup}' records the relative location '{location}' for tablespace {oid}: "
        "refusing to guess what it is relative to"
    )


def _normalized_mapping(tablespace_mapping: Mapping[str, str]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for old, new in tablespace_mapping.items():
        if not (Path(old).is_absolute() and Path(new).is_absolute()):
            raise ConfigError(f"tablespace mapping '{old}={new}' must use absolute paths")
        mapping[os.path.normpath(old)] = os.path.normpath(new)
    return mapping


def _check_distinct(plan: TargetPlan) -> None:
    paths = [plan.pgdata, *plan.outside().values()]
    for i, one in enumerate(paths):
        for other in paths[i + 1 :]:
            if one == other or one.is_relative_to(other) or other.is_relative_to(one):
                raise ConfigError(f"restore targets '{one}' and '{other}' overlap")


def _check_empty(path: Path) -> None:
    """The first look, before anything is downloaded: refuse a target that exists and is not an
    empty directory. ``CreatedPaths.prepare`` looks again, under the lock: that decision counts."""
    if not path.exists():
        if path.is_symlink():
            raise TargetNotEmpty(f"restore target '{path}' is a dangling symbolic link")
        return
    if not path.is_dir():
        raise TargetNotEmpty(f"restore target '{path}' exists and is not a directory")
    if not _is_empty(path):
        raise _in_use(path) if _held_elsewhere(path) else _not_empty(path)


def _is_empty(directory: Path | int) -> bool:
    with os.scandir(directory) as entries:
        return next(entries, None) is None


def _not_empty(path: Path) -> TargetNotEmpty:
    if not (path / _PG_CONTROL).exists() and any((path / n).exists() for n in _RESTORE_WRITES):
        return TargetNotEmpty(
            f"restore target '{path}' is not empty: it looks like an interrupted restore "
            f"(no {_PG_CONTROL}); empty or remove it before restoring again"
        )
    return TargetNotEmpty(f"restore target '{path}' is not empty")


def _in_use(path: Path) -> TargetNotEmpty:
    return TargetNotEmpty(f"restore target '{path}' is in use: another restore is writing into it")


def _held_elsewhere(path: Path) -> bool:
    """Whether a running restore holds ``path``: says which refusal to give, decides nothing.

    A shared lock, let go at once: two restores looking at the same directory do not exclude
    each other, only one holding it does.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also lets go of the shared lock
    return False


@dataclass(frozen=True)
class _Held:
    path: Path
    fd: int  # holds the exclusive flock on ``path`` until closed
    made: list[Path]  # directories this run created for it: ``path`` first, topmost last


class CreatedPaths:
    """Target directories this run holds, and how to take back what it wrote on failure.

    ``prepare`` each target, ``undo`` on failure while still holding them, ``release`` once the
    restore ends whatever its outcome. ``undo`` removes only what is inside a directory this
    run holds, and a directory it made only once empty: never what another restore wrote.
    """

    def __init__(self) -> None:
        self._held: list[_Held] = []
        self.directories: list[Path] = []  # every directory this run created, parents first

    def prepare(self, path: Path) -> None:
        """Make ``path`` if missing and hold it until ``release``; ``TargetNotEmpty`` when
        another restore holds it or it is not empty under the lock, leaving nothing to undo."""
        fd, made = _hold(path)
        try:
            # Under the lock: a restore that held it before us may have written and finished.
            if not _is_empty(fd):
                raise _not_empty(path)
            # Said now, naming the target, rather than by the first write, after the download
            # began, naming whatever file or directory came first.
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        except BaseException:
            os.close(fd)
            raise
        self._held.append(_Held(path, fd, made))
        self.directories.extend(reversed(made))

    def undo(self) -> None:
        """Remove what this run wrote; before ``release``, so no other restore is writing."""
        for held in reversed(self._held):
            with contextlib.suppress(FileNotFoundError):
                for child in held.path.iterdir():
                    _remove_tree(child)
            for directory in held.made:
                try:
                    directory.rmdir()
                except OSError:
                    break  # not empty: a parent shared with another restore's target

    def sync(self) -> None:
        """Make everything on the targets' file systems durable, raising ``OSError`` naming a
        target when a write there failed since it was held: before this run wrote anything,
        so the check covers every file it wrote (``storage.kernelsync.sync_filesystem``)."""
        os.sync()  # also what ``before_startable`` wrote elsewhere; reports no error itself
        for held in self._held:
            with naming(held.path):
                sync_filesystem(held.fd)

    def release(self) -> None:
        """Let other restores have the targets: closing the descriptor drops the lock."""
        for held in self._held:
            os.close(held.fd)
        self._held.clear()


def _hold(path: Path) -> tuple[int, list[Path]]:
    """The descriptor holding ``path`` (made if missing), and the directories made for it."""
    for _ in range(_PREPARE_ATTEMPTS):
        made = _make_missing(path)
        fd = _lock(path)
        if fd is not None:
            return fd, made
    _check_empty(path)  # says what replaced the directory, if it can
    raise _in_use(path)


def _make_missing(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents: the ones this call created, ``path`` first.

    One that appears meanwhile (another restore's ``mkdir``) counts as existing: the lock, not
    who created it, decides who writes into it.
    """
    missing = []
    for directory in (path, *path.parents):
        if directory.exists() or directory.is_symlink():
            break
        missing.append(directory)
    made = []
    for directory in reversed(missing):
        try:
            with naming(directory):
                directory.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue
        made.append(directory)
    return made[::-1]


def _lock(path: Path) -> int | None:
    """A descriptor holding ``path`` exclusively; None when ``path`` is no longer the directory
    locked (a failing restore removed it while this one waited); ``TargetNotEmpty`` when
    another restore holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        opened, current = os.fstat(fd), path.stat()
    except BlockingIOError:
        os.close(fd)
        raise _in_use(path) from None
    except (FileNotFoundError, NotADirectoryError):
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    if (opened.st_dev, opened.st_ino) != (current.st_dev, current.st_ino):
        os.close(fd)
        return None
    return fd


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)  # never follows the tablespace links inside
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
