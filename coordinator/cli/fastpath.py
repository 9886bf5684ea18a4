"""The ``cloud-dump`` entry point, with the two answers that must not wait for the full CLI.

PostgreSQL starts one process per WAL file. Under load, most archive_command calls are for a
file the WAL pusher already stored (the answer is a spool marker), and most restore_command
calls are for a segment the prefetcher already spooled (the answer is a rename). Either way the
call's cost is mostly starting Python, and importing argparse, logging and the CLI's parser
would double it. So this module answers

- ``wal-push PATH NAME [flags]`` for a file with a confirmation marker that names this very
  file (one ``stat``), with ``os`` and ``sys`` alone; and, with a broker and look-ahead, for a
  file a running WAL pusher confirms while the call waits (``coordinator.wal.push.quickwait``);
- ``wal-fetch NAME PATH [flags]`` for a spooled segment when no prefetcher needs starting, with
  ``coordinator.wal.fetch.command``'s spool (no argparse, no storage client);

and hands every other command line to ``coordinator.cli.main.main`` unchanged.

It answers only when it is sure: the exact form ``COMMAND ARG ARG`` followed by flags it knows (an
abbreviated or unknown flag, ``--help``, or anything odd goes to the full CLI; both take their flags
from ``options.declared``), settings resolved as the CLI resolves them (flag, then ``--config``
file, then environment: ``coordinator.cli.configfile``), and an error before the answer falls
through to the full CLI, which then decides and reports; so does a config file with something to
warn about, as only the full CLI has logging to say it with. A combination the full CLI refuses
(``--cluster`` with a ``--wal-prefix``: ``storage.layout``) is never answered here.
"""

from __future__ import annotations

import atexit
import os
import sys

from coordinator.cli.limits import DEFAULT_LOOK_AHEAD, DEFAULT_PREFETCH
from coordinator.wal.push.marker import MARKER_DIR, archive_location, marker_answers
from coordinator.wal.spooldir import wal_spool_dir
from options.declared import WAL_FETCH, WAL_PUSH, switches, value_flags
from options.seed import storj_location

# The options of wal-push and wal-fetch, from their declarations: which take a value, which
# do not.
WAL_PUSH_VALUE_FLAGS = value_flags(WAL_PUSH)
WAL_PUSH_SWITCHES = switches(WAL_PUSH)
WAL_FETCH_VALUE_FLAGS = value_flags(WAL_FETCH)
WAL_FETCH_SWITCHES = switches(WAL_FETCH)

_ENV = {
    "--storage": "CLOUD_DUMP_STORAGE",
    "--cluster": "CLOUD_DUMP_CLUSTER",
    "--wal-prefix": "CLOUD_DUMP_WAL_PREFIX",
    "--spool-dir": "CLOUD_DUMP_SPOOL_DIR",
    "--prefetch": "CLOUD_DUMP_WAL_PREFETCH",
    "--storj-bucket": "STORJ_BUCKET",
    "--broker": "CLOUD_DUMP_BROKER_URL",
    "--look-ahead": "CLOUD_DUMP_WAL_LOOK_AHEAD",
}


def entry() -> None:
    """The ``cloud-dump`` console script: ``main``, then an exit that skips the interpreter's
    last teardown.

    Python's exit joins the threads that are not daemons and runs the ``atexit`` functions
    (``logging.shutdown``, ``weakref.finalize`` clean-ups, ``tempfile``'s); then it collects
    garbage and tears every module down, which with Celery, psycopg and pydantic or boto3
    loaded takes 150-200 ms (measured on ``backup``: 0.15-0.20 s, 0.012 s without) of a
    command the operator, or a benchmark, waits for. ``_exit_after_atexit`` is registered
    before any other ``atexit`` function, so it runs after all of them and leaves only that
    last part out. A command that raised (a bug: ``main`` maps every expected error to a code)
    exits as Python would, traceback included.
    """
    atexit.register(_exit_after_atexit)
    code = main()
    _exit_code.append(code)
    sys.exit(code)


# ``main``'s code once it returned (at most one): ``_exit_after_atexit`` exits with it.
_exit_code: list[int] = []


def _exit_after_atexit() -> None:
    if _exit_code:
        if "logging" in sys.modules:  # its own atexit function may have been registered first
            import logging

            logging.shutdown()
        leave(_exit_code[0])


def main() -> int:
    """Run the command line in ``sys.argv``; its exit code (``coordinator.cli.exitcodes``)."""
    argv = sys.argv[1:]
    answers = {"wal-push": wal_push_confirmed, "wal-fetch": wal_fetch_from_spool}
    answer = answers.get(argv[0]) if argv else None
    if answer is not None:
        try:
            answered = answer(argv[1:])
        except Exception:  # the full CLI decides and reports
            answered = False
        if answered:
            leave(0)  # the interpreter's teardown is a fifth of such a call (~4 of ~20 ms)
    try:
        from coordinator.cli.main import main as full_main

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
    from coordinator.cli.exitcodes import ExitCode

    return int(ExitCode.WAL_FETCH_FAILED)


def leave(code: int) -> None:
    """Exit at once, skipping the interpreter's teardown.

    PostgreSQL waits for this process to exit, once per WAL file, and tearing down an
    interpreter that loaded Celery or boto3 takes 100-200 ms (even one that loaded nothing but
    this module takes ~4 ms, a fifth of a call answered from a marker or the spool). Everything
    a WAL command does is finished when it returns (stored, renamed, or handed to a detached
    helper).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def wal_push_confirmed(args: list[str]) -> bool:
    """Whether ``wal-push`` with these arguments is answered without the full CLI: a
    confirmation marker for this very file, or one a running pusher writes while this call
    waits (only where the full CLI would go through the pusher too: a broker, look-ahead)."""
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
            if marker_answers(f.read(), path, location):  # as Spool.is_confirmed
                return True
    except OSError:
        pass
    if not settings["--broker"] or int(settings["--look-ahead"] or DEFAULT_LOOK_AHEAD) == 0:
        return False  # the full CLI pushes in this process
    from coordinator.wal.push.quickwait import wait_for_pusher

    return wait_for_pusher(spool, name, path, location)


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
    from coordinator.wal.fetch.served import archive_source, serve_without_cli

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
    from coordinator.cli.configfile import load_config_file

    # The file's values replace the environment's, as in the full CLI. Its warnings (a key set
    # twice) go through the full CLI's logging: with no logging here, answering would hide them.
    if load_config_file(args):
        return None
    settings = {flag: flags.get(flag) or os.environ.get(env) or None for flag, env in _ENV.items()}
    # The seed's --storage storj: its bucket's s3:// URL, as the full CLI records it.
    storage, _, problem = storj_location(settings["--storage"], settings["--storj-bucket"], None)
    if problem is not None:
        return None
    settings["--storage"] = storage
    prefix = settings["--wal-prefix"]
    if settings["--cluster"] and prefix and prefix.strip("/") != "wal_archive":
        return None  # refused by the full CLI (storage.layout.Layout)
    from coordinator.cli.limits import acceptable

    command = "wal-push" if value_flags is WAL_PUSH_VALUE_FLAGS else "wal-fetch"
    if not acceptable(command, value_flags, flags):
        return None  # a number out of range: the full CLI names it (exit 3, or 200)
    return (args[0], args[1]), settings
