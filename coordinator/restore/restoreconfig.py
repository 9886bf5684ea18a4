"""Where a restore config file goes and how one is recognised: its name, beside PGDATA.

``<PGDATA's name>.cloud-dump-restore.conf`` in PGDATA's parent, one per copy; the settings
wal-fetch reads when the recovering server runs restore_command.
"""

from __future__ import annotations

import os
from pathlib import Path

# The default restore config of PGDATA ``.../NAME`` is ``.../NAME.cloud-dump-restore.conf``;
# versions before it used this name alone, one per parent directory.
RESTORE_CONFIG_NAME = "cloud-dump-restore.conf"


def default_restore_config(pgdata: Path) -> Path:
    """``<PGDATA's parent>/<PGDATA's name>.cloud-dump-restore.conf``: one per copy."""
    path = absolute_path(pgdata)
    return path.parent / f"{path.name}.{RESTORE_CONFIG_NAME}"


def is_restore_config_name(name: str) -> bool:
    """Whether ``name`` is the name restore gives a restore config file by default (this
    version's, ``<PGDATA's name>.cloud-dump-restore.conf``, or earlier versions')."""
    return name == RESTORE_CONFIG_NAME or name.endswith("." + RESTORE_CONFIG_NAME)


def absolute_path(path: Path) -> Path:
    return Path(os.path.normpath(path.absolute()))  # ".." resolved, symbolic links kept
