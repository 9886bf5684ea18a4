"""The ``cloud-dump`` entry point, with the one answer that must not wait for the full CLI.

Under load most archive_command calls are for a file the WAL pusher already stored: the
answer is a spool marker, and the call's whole cost is starting Python. Importing argparse,
logging, pathlib and the CLI's parser would double that, so this module answers
``wal-push PATH NAME [flags]`` for a file with a marker using ``os`` and ``sys`` alone, and
hands every other command line to ``coordinator.cli.main`` unchanged.

It answers only when it is sure: the exact form ``wal-push PATH NAME`` followed by flags it
knows (an abbreviated or unknown flag, ``--help``, or anything odd goes to the full CLI), and a
marker for the same archive location the full CLI would compute (``walspool.archive_location``
and ``Spool.is_confirmed``, which tests/test_wal_push.py holds this module to). Anything else,
including any error, falls through to the full CLI, which then decides and reports.
"""

from __future__ import annotations

import os
import sys

# Every option wal-push accepts (tests compare this with the parser), and which take a value.
WAL_PUSH_VALUE_FLAGS = frozenset({
    "--compression", "--recipient-key", "--passphrase-file", "--passphrase",
    "--look-ahead", "--timeout", "--wal-prefix", "--spool-dir", "--storage", "--s3-endpoint",
    "--s3-region", "--s3-max-parts", "--storage-max-attempts", "--broker", "--result-backend",
    "--staging-url", "--cluster", "--config", "--log-level",
})  # fmt: skip
WAL_PUSH_SWITCHES = frozenset({
    "--compress", "--encrypt", "--s3-path-style", "--no-s3-path-style",
})  # fmt: skip
# The spool's marker directory, and the archive location a marker names: defined here, where
# only os is loaded, and used by coordinator.walspool.
MARKER_DIR = "archived"


def archive_location(storage_url: str | None, cluster: str | None, wal_prefix: str | None) -> str:
    """A one-line name of the archive a push goes to (no credentials: URLs carry none)."""
    return f"{storage_url or '-'}|{cluster or '-'}|{(wal_prefix or 'wal_archive').strip('/')}"


_LOCATION = {
    "--storage": "CLOUD_DUMP_STORAGE",
    "--cluster": "CLOUD_DUMP_CLUSTER",
    "--wal-prefix": "CLOUD_DUMP_WAL_PREFIX",
    "--spool-dir": "CLOUD_DUMP_SPOOL_DIR",
}


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["wal-push"]:
        try:
            if wal_push_already_archived(argv[1:]):
                return 0
        except Exception:  # noqa: S110 - the full CLI decides and reports
            pass
    from coordinator.cli import main as full_main

    return full_main(argv)


def wal_push_already_archived(args: list[str]) -> bool:
    """Whether ``wal-push`` with these arguments has a confirmation marker to answer from."""
    if len(args) < 2 or args[0].startswith("-") or args[1].startswith("-"):
        return False
    path, name = args[0], args[1]
    if "/" in name or name in ("", ".", "..") or len(name) > 64:
        return False
    flags: dict[str, str] = {}
    rest = args[2:]
    i = 0
    while i < len(rest):
        flag, sep, value = rest[i].partition("=")
        if flag in WAL_PUSH_SWITCHES and not sep:
            i += 1
            continue
        if flag not in WAL_PUSH_VALUE_FLAGS:
            return False  # positional, abbreviation, --help, a typo: not for this path
        if not sep:
            if i + 1 >= len(rest):
                return False
            value = rest[i + 1]
            i += 1
        flags[flag] = value
        i += 1
    from coordinator.configfile import load_config_file

    load_config_file(args)
    settings = {flag: flags.get(flag) or os.environ.get(env) for flag, env in _LOCATION.items()}
    location = archive_location(
        settings["--storage"], settings["--cluster"], settings["--wal-prefix"]
    )
    spool = settings["--spool-dir"] or os.path.join(os.path.dirname(path), "cloud-dump")
    try:
        with open(os.path.join(spool, MARKER_DIR, name)) as f:
            text = f.read()
    except OSError:
        return False
    # The same comparison as Spool.is_confirmed.
    return text.strip().partition(" ")[2] == location
