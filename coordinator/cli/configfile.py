"""``--config FILE``: KEY=VALUE settings loaded into the environment before anything else.

Precedence, in the full CLI and in ``coordinator.cli.fastpath`` alike: a flag on the command line,
then the config file, then the environment the process inherited. A file named with
``--config`` is a deliberate choice; an inherited environment often is not (a server started
from a shell that had ``CLOUD_DUMP_STORAGE`` set would otherwise archive to, or recover from,
that storage instead of the one its archive_command/restore_command names).

Standard library only, and not even pathlib: the wal-push fast path (``coordinator.cli.fastpath``)
reads the config file too, on every archive_command call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def load_config_file(argv: Sequence[str]) -> None:
    """Load ``--config FILE`` (or ``CLOUD_DUMP_CONFIG``) into the environment.

    KEY=VALUE lines, as a systemd EnvironmentFile: ``#`` comments, optional ``export`` and
    quotes. The file's values replace variables inherited from the environment; flags win
    over both (their defaults are read from the environment afterwards). This is how
    archive_command and restore_command get their settings and credentials without a secret
    on the command line (``ps``) or in postgresql.auto.conf.
    """
    path = os.environ.get("CLOUD_DUMP_CONFIG")
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    if not path:
        return
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        from storage.errors import ConfigError

        raise ConfigError(f"cannot read config file '{path}': {exc.strerror}") from exc
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key.replace("_", "").isalnum():
            from storage.errors import ConfigError

            raise ConfigError(f"config file '{path}' line {number}: expected KEY=VALUE")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        os.environ[key] = value
