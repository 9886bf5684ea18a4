"""The ``cloud-dump`` entry point, with the two answers that must not wait for the full CLI.

PostgreSQL starts one process per WAL file. Under load, most archive_command calls are for a
file the WAL pusher already stored (the answer is a spool marker), and most restore_command
calls are for a segment the prefetcher already spooled (the answer is a rename). Either way the
call's cost is mostly starting Python, and importing argparse, logging and the CLI's parser
would double it. So this module answers

- ``wal-push PATH NAME [flags]`` for a file with a confirmation marker that names this very
  file (one ``stat``), with ``os`` and ``sys`` alone;
- ``wal-fetch NAME PATH [flags]`` for a spooled segment when no prefetcher needs starting, with
  ``coordinator.walfetch``'s spool (no argparse, no storage client);

and hands every other command line to ``coordinator.cli.main`` unchanged.

It answers only when it is sure: the exact form ``COMMAND ARG ARG`` followed by flags it knows
(an abbreviated or unknown flag, ``--help``, or anything odd goes to the full CLI; tests hold the
flag sets to the parser's), settings resolved as the CLI resolves them (flag, then ``--config``
file, then environment: ``coordinator.configfile``), and an error before the answer falls
through to the full CLI, which then decides and reports. A combination the full CLI refuses
(``--cluster`` with a ``--wal-prefix``: ``storage.layout``) is never answered here.
"""

from __future__ import annotations

import os
import sys

# The options of wal-push and wal-fetch (tests compare these with the parser): which take a
# value, which do not.
_COMMON_VALUE_FLAGS = frozenset({
    "--wal-prefix", "--spool-dir", "--storage", "--s3-endpoint", "--s3-region", "--s3-max-parts",
    "--storage-max-attempts", "--broker", "--result-backend", "--staging-url", "--cluster",
    "--config", "--log-level", "--passphrase-file", "--passphrase",
})  # fmt: skip
WAL_PUSH_VALUE_FLAGS = _COMMON_VALUE_FLAGS | {
    "--compression", "--recipient-key", "--look-ahead", "--timeout",
}  # fmt: skip
WAL_PUSH_SWITCHES = frozenset({"--compress", "--encrypt", "--s3-path-style", "--no-s3-path-style"})
WAL_FETCH_VALUE_FLAGS = _COMMON_VALUE_FLAGS | {"--identity-key", "--prefetch"}
WAL_FETCH_SWITCHES = frozenset({"--allow-partial", "--s3-path-style", "--no-s3-path-style"})
DEFAULT_PREFETCH = 8

# The spool's marker directory, the marker's format and the archive location it names: defined
# here, where only os is loaded, and used by coordinator.walspool.
MARKER_DIR = "archived"
# A marker is "<format> <raw sha256> <file identity> <location>". Markers of another format
# (the first one had no identity) answer for nothing.
MARKER_FORMAT = "2"
_MARKER_FIELDS = 8  # format, sha256, the five identity numbers, location

_ENV = {
    "--storage": "CLOUD_DUMP_STORAGE",
    "--cluster": "CLOUD_DUMP_CLUSTER",
    "--wal-prefix": "CLOUD_DUMP_WAL_PREFIX",
    "--spool-dir": "CLOUD_DUMP_SPOOL_DIR",
    "--prefetch": "CLOUD_DUMP_WAL_PREFETCH",
}


def archive_location(storage_url: str | None, cluster: str | None, wal_prefix: str | None) -> str:
    """A one-line name of the archive a push goes to (no credentials: URLs carry none)."""
    return f"{storage_url or '-'}|{cluster or '-'}|{(wal_prefix or 'wal_archive').strip('/')}"


def file_identity(st: os.stat_result) -> str:
    """What tells one file at a path from another: size, device, inode, mtime and ctime (ns).

    Writing into the file changes its mtime, replacing it (a rename, a copy) its inode or ctime.
    """
    return f"{st.st_size} {st.st_dev} {st.st_ino} {st.st_mtime_ns} {st.st_ctime_ns}"


def marker_text(raw_sha256: str, identity: str, location: str) -> str:
    """A confirmation marker: storage holds the file of ``identity`` (as read) at ``location``."""
    return f"{MARKER_FORMAT} {raw_sha256} {identity} {location}\n"


def marker_answers(text: str, path: str, location: str) -> bool:
    """Whether marker ``text`` confirms the file now at ``path`` for this archive location.

    Only for the very file that was read and pushed: one ``stat``, no hashing (this is the
    path of every already-archived call). Any difference sends the call down the full path,
    where the worker compares content and refuses different bytes (exit 17).
    """
    fields = text.rstrip("\n").split(" ", _MARKER_FIELDS - 1)
    if len(fields) != _MARKER_FIELDS or fields[0] != MARKER_FORMAT or fields[-1] != location:
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    return " ".join(fields[2:-1]) == file_identity(st)


def wal_spool_dir(wal_path: str, spool_dir: str | None) -> str | None:
    """The spool of a WAL command for ``wal_path`` (``%p``); None: it has none.

    ``--spool-dir`` when given; otherwise ``<pg_wal>/cloud-dump`` when ``%p`` is in a
    directory named ``pg_wal`` (PostgreSQL runs the command in the data directory with
    ``%p`` = ``pg_wal/NAME``). Run by hand on a file elsewhere, a command creates nothing.
    """
    if spool_dir:
        return spool_dir
    # Not realpath(): pg_wal may be a symbolic link (initdb --waldir), its name is what counts.
    parent = os.path.dirname(os.path.abspath(wal_path))
    if os.path.basename(parent) == "pg_wal" and os.path.isdir(parent):
        return os.path.join(parent, "cloud-dump")
    return None


def main() -> int:
    argv = sys.argv[1:]
    answers = {"wal-push": wal_push_already_archived, "wal-fetch": wal_fetch_from_spool}
    answer = answers.get(argv[0]) if argv else None
    if answer is not None:
        try:
            if answer(argv[1:]):
                return 0
        except Exception:  # noqa: S110 - the full CLI decides and reports
            pass
    try:
        from coordinator.cli import main as full_main

        code = full_main(argv)
    except BaseException as exc:
        if answer is not wal_fetch_from_spool:
            raise
        code = _wal_fetch_broke(exc)
    if answer is not None:
        leave(code)
    return code


def _wal_fetch_broke(exc: BaseException) -> int:
    """The status of a wal-fetch whose full CLI could not even map its error (a broken
    installation: an import failing). Python's own exit status would be 1, which PostgreSQL
    takes for the end of the archive: promotion with part of the data."""
    print(f"cloud-dump: error: unexpected {type(exc).__name__}: {exc} (a broken installation? "
          "report it)", file=sys.stderr)
    from coordinator.exitcodes import ExitCode

    return int(ExitCode.WAL_FETCH_FAILED)


def leave(code: int) -> None:
    """Exit at once, skipping the interpreter's teardown.

    PostgreSQL waits for this process to exit, once per WAL file, and tearing down an
    interpreter that loaded Celery or boto3 takes 100-200 ms. Everything a WAL command does is
    finished when it returns (stored, renamed, or handed to a detached helper).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def wal_push_already_archived(args: list[str]) -> bool:
    """Whether ``wal-push`` with these arguments has a confirmation marker to answer from."""
    parsed = _parse(args, WAL_PUSH_VALUE_FLAGS, WAL_PUSH_SWITCHES)
    if parsed is None:
        return False
    (path, name), settings = parsed
    if "/" in name or name in ("", ".", ".."):
        return False
    location = archive_location(
        settings["--storage"], settings["--cluster"], settings["--wal-prefix"]
    )
    spool = wal_spool_dir(path, settings["--spool-dir"])
    if spool is None:
        return False
    try:
        with open(os.path.join(spool, MARKER_DIR, name)) as f:
            text = f.read()
    except OSError:
        return False
    return marker_answers(text, path, location)  # as Spool.is_confirmed


def wal_fetch_from_spool(args: list[str]) -> bool:
    """Serve ``wal-fetch`` from the spool if it can be done without the full CLI; True if done.

    False leaves everything as it was, except a spooled file found unfit, which is discarded
    with a warning as the full CLI would (the full CLI then fetches it directly).
    """
    parsed = _parse(args, WAL_FETCH_VALUE_FLAGS, WAL_FETCH_SWITCHES)
    if parsed is None:
        return False
    (name, path), settings = parsed
    if not settings["--storage"]:
        return False  # the full CLI says what is missing
    from coordinator.walfetch import archive_source, serve_without_cli

    source = archive_source(settings["--storage"], settings["--cluster"], settings["--wal-prefix"])
    prefetch = int(settings["--prefetch"] or DEFAULT_PREFETCH)
    return serve_without_cli(
        name, path, spool_dir=settings["--spool-dir"], source=source, prefetch=prefetch
    )


def _parse(
    args: list[str], value_flags: frozenset[str], switches: frozenset[str]
) -> tuple[tuple[str, str], dict[str, str | None]] | None:
    """The two positional arguments and the settings that decide the answer; None when the
    command line is not of the simple form this module answers for."""
    if len(args) < 2 or args[0].startswith("-") or args[1].startswith("-"):
        return None
    flags: dict[str, str] = {}
    rest = args[2:]
    i = 0
    while i < len(rest):
        flag, sep, value = rest[i].partition("=")
        if flag in switches and not sep:
            i += 1
            continue
        if flag not in value_flags:
            return None  # positional, abbreviation, --help, a typo: not for this path
        if not sep:
            if i + 1 >= len(rest):
                return None
            value = rest[i + 1]
            i += 1
        flags[flag] = value
        i += 1
    from coordinator.configfile import load_config_file

    load_config_file(args)  # the file's values replace the environment's, as in the full CLI
    settings = {flag: flags.get(flag) or os.environ.get(env) or None for flag, env in _ENV.items()}
    prefix = settings["--wal-prefix"]
    if settings["--cluster"] and prefix and prefix.strip("/") != "wal_archive":
        return None  # refused by the full CLI (storage.layout.Layout)
    from coordinator.limits import acceptable

    command = "wal-push" if value_flags is WAL_PUSH_VALUE_FLAGS else "wal-fetch"
    if not acceptable(command, value_flags, flags):
        return None  # a number out of range: the full CLI names it (exit 3, or 200)
    return (args[0], args[1]), settings
