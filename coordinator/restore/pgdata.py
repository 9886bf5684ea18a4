"""Finishing a restored data directory once every archive is extracted and verified.

What PostgreSQL will find when it starts: tablespace links and ``tablespace_map`` naming where
this restore put each tablespace (in-place tablespaces stay directories inside PGDATA), the
modes of PGDATA and the tablespace directories, and a ``pg_control`` whose checkpoint is
invalidated (``coordinator.restore.pgcontrol``). Every write names its file if it fails.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from coordinator.restore.extract import rewrite_tablespace_map
from coordinator.restore.pgcontrol import control_version, invalidate_checkpoint
from storage.fsutil import fsync_dir as fsync_dir  # run.py's import of it, for now
from storage.fsutil import naming, write_atomically

log = logging.getLogger(__name__)

TABLESPACE_MAP = "tablespace_map"
_GROUP_READ_SEARCH = 0o050


@dataclass(frozen=True)
class DataModes:
    """Modes of PGDATA (and tablespace directories) and of the files restore writes itself."""

    directory: int
    file: int


def data_modes(global_dir_mode: int | None) -> DataModes:
    """0750/0640 when the backed-up cluster allowed group access (its ``global`` directory
    carried group read and search), else 0700/0600: the two modes PostgreSQL accepts for
    PGDATA, and what it gives every directory and file in it.
    """
    if global_dir_mode is not None and global_dir_mode & _GROUP_READ_SEARCH == _GROUP_READ_SEARCH:
        return DataModes(0o750, 0o640)
    return DataModes(0o700, 0o600)


def point_tablespaces(
    pgdata: Path,
    tablespaces: Mapping[str, Path],
    in_place: Collection[str],
    modes: DataModes,
) -> bytes | None:
    """pg_tblspc/<oid> links to the restored locations, and a tablespace_map that agrees.

    A tar-format backup carries a tablespace_map instead of links; PostgreSQL recreates the links
    from it at startup, so it must name the new locations when tablespaces were remapped. Returns
    the new tablespace_map when its content changed, else None.
    """
    tblspc = pgdata / "pg_tblspc"
    tblspc.mkdir(mode=modes.directory, exist_ok=True)
    for oid, location in tablespaces.items():
        if oid in in_place:
            continue  # a directory already, filled by its archive
        link = tblspc / oid
        if link.is_symlink():
            continue  # re-pointed during extraction
        if link.is_dir():
            link.rmdir()  # an empty placeholder; fails (as it should) if it holds anything
        link.symlink_to(location)
    map_path = pgdata / TABLESPACE_MAP
    if not map_path.exists():
        return None
    original = map_path.read_bytes()
    outside = {oid: path for oid, path in tablespaces.items() if oid not in in_place}
    rewritten = rewrite_tablespace_map(original, outside, in_place)
    if rewritten == original:
        return None
    write_file(map_path, rewritten, modes.file)
    return rewritten


def invalidate_control_file(path: Path, backup: str) -> bytes | None:
    """Rewrite the restored pg_control at ``path`` with its checkpoint invalidated.

    Returns the new content, or None (with a warning) when the file is left as it was.
    """
    original = path.read_bytes()
    changed = invalidate_checkpoint(original)
    if changed is None:
        log.warning(
            "global/pg_control of backup '%s' (pg_control_version %d) has a layout this version "
            "of cloud-dump does not know: left unchanged, so the copy would start without its "
            "backup_label, missing data, if that file were deleted",
            backup, control_version(original),
        )  # fmt: skip
        return None
    write_file(path, changed, path.stat().st_mode & 0o777)
    return changed


def set_modes(directories: Collection[Path], modes: DataModes) -> None:
    for directory in directories:
        with naming(directory):
            directory.chmod(modes.directory)


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` atomically, with exactly ``mode`` (``DataModes.file``, or
    the mode the restored file had), never through a symbolic link; raises ``OSError`` naming
    ``path``.

    Not fsynced: restore syncs once (``CreatedPaths.sync``) before it makes the directory startable.
    """
    write_atomically(path, data, mode=mode, sync=False)
