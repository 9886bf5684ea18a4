"""Where a restore writes: the target directories, checked before anything is written, and
taken back if the restore fails.

``plan_targets`` decides where each archive of a backup goes (PGDATA, each tablespace at its
recorded location or where ``--tablespace-mapping`` says) and refuses, before the disk is
touched, targets that overlap or are not empty. A tablespace location is never resolved against
the current directory: the relative location ``pg_tblspc/<oid>`` of an in-place tablespace
(PostgreSQL 16+) means that directory inside the new PGDATA; any other relative location is
refused. ``CreatedPaths`` records what a run made or filled, to undo it and to hand it over.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from coordinator.restore.extract import naming
from storage.errors import ConfigError, IntegrityError, TargetNotEmpty
from storage.manifest import BackupManifest

DIR_MODE = 0o700
_TBLSPC_DIR = "pg_tblspc"


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
    if not path.exists():
        if path.is_symlink():
            raise TargetNotEmpty(f"restore target '{path}' is a dangling symbolic link")
        return
    if not path.is_dir():
        raise TargetNotEmpty(f"restore target '{path}' exists and is not a directory")
    with os.scandir(path) as entries:
        if next(entries, None) is not None:
            raise TargetNotEmpty(f"restore target '{path}' is not empty")


class CreatedPaths:
    """Target directories this run made or filled, and how to take them back on failure."""

    def __init__(self) -> None:
        self._created: list[Path] = []  # topmost directory this run created
        self._filled: list[Path] = []  # existed (empty) before this run
        self.directories: list[Path] = []  # every directory this run created, parents first

    def prepare(self, path: Path) -> None:
        if path.exists():
            self._filled.append(path)
            return
        chain = [path]
        while not chain[-1].parent.exists():
            chain.append(chain[-1].parent)
        with naming(path):
            path.mkdir(mode=DIR_MODE, parents=True)
        self._created.append(chain[-1])
        self.directories.extend(reversed(chain))

    def undo(self) -> None:
        for top in self._created:
            _remove_tree(top)
        for path in self._filled:
            with contextlib.suppress(FileNotFoundError):
                for child in path.iterdir():
                    _remove_tree(child)


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)  # never follows the tablespace links inside
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
