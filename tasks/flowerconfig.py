"""Flower's configuration file: ``celery -A tasks.app flower --conf=tasks/flowerconfig.py``.

Flower executes this file (tornado's ``parse_config_file``, after it has read its ``FLOWER_*``
variables and command line) and takes the options it assigns: the address and credentials
``tasks.flowerauth`` decides, and the columns of the tasks page. A set-up Flower must not start
with ends here, before it listens: one line on stderr, exit 3. Not meant to be imported.
"""

from __future__ import annotations

import os
import sys

from tornado.options import options

from storage.errors import ConfigError
from tasks.flowerauth import TASKS_COLUMNS, flower_access

if any(arg.startswith("--basic-auth") for arg in sys.argv):
    # Every local user can read a process's command line (ps, /proc/<pid>/cmdline).
    sys.stderr.write("flower: warning: --basic-auth on the command line is visible to every "
                     "user in 'ps': use FLOWER_BASIC_AUTH_FILE or FLOWER_BASIC_AUTH\n")

try:
    _access = flower_access(os.environ, options.address, options.basic_auth)
except ConfigError as exc:
    sys.stderr.write(f"flower: error: {exc}\n")
    raise SystemExit(exc.exit_code) from None

address = _access.address
basic_auth = _access.basic_auth
tasks_columns = TASKS_COLUMNS
