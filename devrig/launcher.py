"""The ``cloud-dump`` that PostgreSQL runs as archive_command and restore_command.

Those commands run as the postgres OS user, so the venv must be usable by that user: `make
setup` builds it from Debian's interpreter for this reason. A venv that postgres cannot run
fails the test with the reason instead of working around it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from devrig.services import VENV_BIN


def postgres_cloud_dump() -> Path:
    executable = VENV_BIN / "cloud-dump"
    done = subprocess.run(["runuser", "-u", "postgres", "--", str(executable), "--help"],
                          capture_output=True, text=True, cwd="/", check=False)
    if done.returncode != 0:
        pytest.fail(f"the postgres user cannot run {executable} ({done.stderr.strip()[:200]}): "
                    "run `make setup`, which builds the venv from /usr/bin/python3", pytrace=False)
    return executable
