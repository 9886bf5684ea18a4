"""The ``cloud-dump`` command line: flags, environment defaults, logging and exit codes.

The only place in cloud-dump that exits. Every flag can also come from an environment variable
(shown in ``--help``); a flag given on the command line wins. Errors are printed as one line,
``cloud-dump: error: <what went wrong>``, with the traceback only at ``--log-level debug``, and
map to the exit codes in ``coordinator.cli.exitcodes``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from coordinator.cli.configfile import describe, load_config_file
from coordinator.cli.exitcodes import ExitCode, exit_code_for
from coordinator.cli.limits import DEFAULT_PREFETCH, LIMITS, env_only_problems, flag_problem
from storage.errors import CloudDumpError, ConfigError

log = logging.getLogger("cloud_dump")

# pgBackRest's archive-timeout. PostgreSQL's archiver waits for the call, and so does a fast
# shutdown (the archive_command child gets no signal); a push that gives up is retried by
# PostgreSQL, nothing is lost.
DEFAULT_WAL_PUSH_TIMEOUT_S = 60.0

# argparse's group and subparser types are private; these are what we pass around.
_Group = Any
_Subparsers = Any



def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


class _FromEnv(str):
    """A flag's default read from its environment variable: argparse converts it with the
    flag's ``type`` only when the flag is absent, and the error then names the variable."""

    env: str


def _from_env(env: str) -> _FromEnv | None:
    raw = _env(env)
    if raw is None:
        return None
    value = _FromEnv(raw)
    value.env = env
    return value


def _number(flag: str) -> Callable[[str], int | float]:
    """argparse ``type=`` for ``flag``: its number, checked against ``coordinator.cli.limits``.

    Raises ``ConfigError`` (exit 3), which argparse lets through, rather than a usage error.
    """
    limit = LIMITS[flag]

    def convert(text: str) -> int | float:
        env = text.env if isinstance(text, _FromEnv) else None
        problem = flag_problem(flag, text, env)
        if problem is not None:
            raise ConfigError(problem)
        value = limit.parse(text)
        assert value is not None  # flag_problem checked it
        return value

    return convert


def _env_list(name: str) -> list[str] | None:
    raw = _env(name)
    return [item for item in raw.split(",") if item] if raw else None


def _env_bool(name: str) -> bool | None:
    raw = _env(name)
    if raw is None:
        return None
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{describe(name, raw)} is not true or false")


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error on one line, in the form of every other error (README: one
    line on stderr, ``cloud-dump: error: ...``), instead of the usage block before it: a WAL
    command's error lands in PostgreSQL's log, where the block would be 20 lines per call."""

    def error(self, message: str) -> NoReturn:
        # The help of the (sub)command the line was for names what it accepts.
        self.exit(ExitCode.USAGE,
                  f"cloud-dump: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


class _CommandParser(_Parser):
    """A command's parser (add_subparsers' ``parser_class``): an argument it does not know is
    its error, with its --help named, rather than the top parser's ("cloud-dump --help")."""

    def parse_known_args(  # type: ignore[override]  # the one form argparse calls on a command
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def _flag(group: _Group, flag: str, env: str | None, help_text: str, **kw: Any) -> None:
    """Add ``flag`` whose default comes from ``env``; --help names the variable."""
    if env is not None:
        if "default" not in kw:
            kw["default"] = _env(env)
        help_text += f" (env {env})"
    group.add_argument(flag, help=help_text, **kw)


def _number_flag(
    group: _Group, flag: str, help_text: str, default: float | None, *, metavar: str,
    with_env: bool = True, range_text: str | None = None,
) -> None:
    """A numeric ``flag``: its range and environment variable come from ``coordinator.cli.limits``,
    and both a given value and the variable's are checked while parsing."""
    limit = LIMITS[flag]
    env = limit.env if with_env else None
    notes = [] if default is None else [f"default {default:g}"]
    notes.append(range_text or limit.describe_short())
    notes += [f"env {env}"] if env else []
    help_text += f" ({'; '.join(notes)})"
    from_env = _from_env(env) if env else None
    group.add_argument(flag, help=help_text, type=_number(flag), metavar=metavar,
                       default=default if from_env is None else from_env)


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command: where the store and the broker are, and logging."""
    g = parser.add_argument_group("storage and broker")
    _flag(g, "--storage", "CLOUD_DUMP_STORAGE", "s3://bucket[/prefix] or file:///path",
          metavar="URL")
    _flag(g, "--s3-endpoint", "CLOUD_DUMP_S3_ENDPOINT", "S3-compatible endpoint, e.g. MinIO",
          metavar="URL")
    _flag(g, "--s3-region", "CLOUD_DUMP_S3_REGION", "S3 region", metavar="REGION")
    g.add_argument("--s3-path-style", action=argparse.BooleanOptionalAction,
                   default=_env_bool("CLOUD_DUMP_S3_PATH_STYLE"),
                   help="path-style addressing; default: on with --s3-endpoint "
                        "(env CLOUD_DUMP_S3_PATH_STYLE)")
    _number_flag(g, "--s3-max-parts", "most parts the store accepts in one upload",
                 10_000, metavar="N")
    _number_flag(g, "--storage-max-attempts", "attempts per storage request, with backoff", 5,
                 metavar="N")
    _flag(g, "--broker", "CLOUD_DUMP_BROKER_URL",
          "Celery broker, e.g. redis://host:6379/0; without it work runs in-process",
          metavar="URL")
    _flag(g, "--result-backend", "CLOUD_DUMP_RESULT_BACKEND",
          "where task results go; default: the broker", metavar="URL")
    _flag(g, "--staging-url", "CLOUD_DUMP_STAGING_URL",
          "Redis for staged part payloads; default: the broker", metavar="URL")
    _flag(parser, "--cluster", "CLOUD_DUMP_CLUSTER",
          "cluster namespace: <cluster>/backup/, <cluster>/wal_archive/", metavar="NAME")
    _flag(parser, "--config", "CLOUD_DUMP_CONFIG",
          "KEY=VALUE file of settings and credentials; its values override the environment, "
          "flags override both",
          metavar="FILE")
    _flag(parser, "--log-level", "CLOUD_DUMP_LOG_LEVEL", "default info",
          default=_env("CLOUD_DUMP_LOG_LEVEL") or "info",
          choices=["debug", "info", "warning", "error"])


def _add_key_flags(
    parser: argparse.ArgumentParser, *, encrypting: bool, encrypt_env: str = ""
) -> None:
    """age keys and passphrase: public keys to encrypt, identities to decrypt."""
    g = parser.add_argument_group("encryption")
    if encrypting:
        g.add_argument("--encrypt", action="store_true",
                       default=_env_bool(encrypt_env) or False,
                       help=f"encrypt with age (env {encrypt_env}); implied by a key or passphrase")
        g.add_argument("--recipient-key", action="append", metavar="FILE",
                       default=_env_list("CLOUD_DUMP_RECIPIENT_KEY"),
                       help="age public key file (repeatable; env CLOUD_DUMP_RECIPIENT_KEY, "
                            "comma-separated)")
    else:
        g.add_argument("--identity-key", action="append", metavar="FILE",
                       default=_env_list("CLOUD_DUMP_IDENTITY_KEY"),
                       help="age identity (private key) file (repeatable; "
                            "env CLOUD_DUMP_IDENTITY_KEY, comma-separated)")
    _flag(g, "--passphrase-file", "CLOUD_DUMP_PASSPHRASE_FILE",
          "read the passphrase from the first line of FILE", metavar="FILE")
    # Not _flag: the value of a flag shows in `ps`, the environment's does not.
    g.add_argument("--passphrase", default=None,
                   help="the passphrase itself (visible in ps: prefer --passphrase-file or "
                        "env CLOUD_DUMP_PASSPHRASE)")


def _add_backup_parser(commands: _Subparsers) -> None:
    p = commands.add_parser("backup", help="stream a physical backup of a cluster to storage",
                            description="Take a base backup over the replication protocol "
                                        "and store it; with --broker the workers upload it.")
    _flag(p, "--name", "CLOUD_DUMP_BACKUP_NAME", "name of the backup (unique)", metavar="NAME")
    _flag(p, "--db-url", "CLOUD_DUMP_DB_URL",
          "replication connection, postgres://user@host/postgres?replication=yes",
          metavar="URL")
    _flag(p, "--compression", "CLOUD_DUMP_COMPRESSION", "default zstd",
          default=_env("CLOUD_DUMP_COMPRESSION") or "zstd",
          choices=["zstd", "gzip", "lz4", "none"])
    _number_flag(p, "--compression-level", "level for the algorithm; default: its fast level",
                 None, metavar="N", range_text="zstd 1-22, gzip 1-9, lz4 1-12")
    _add_key_flags(p, encrypting=True, encrypt_env="CLOUD_DUMP_ENCRYPT")
    _number_flag(p, "--parallel", "uploads in flight / upload threads without a broker", 4,
                 metavar="N")
    _number_flag(p, "--part-size-mib", "target part size; grows for large archives", 16,
                 metavar="MIB")
    _number_flag(p, "--part-timeout", "re-send a part not confirmed after this long", 300.0,
                 metavar="SECONDS")
    _number_flag(p, "--task-timeout", "wait this long for claim/finalize tasks", 600.0,
                 metavar="SECONDS")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="live progress line on a terminal (default on)")
    _add_common_flags(p)


def _add_restore_parser(commands: _Subparsers) -> None:
    p = commands.add_parser("restore", help="restore a backup into an empty PGDATA",
                            description="Download, decrypt, decompress and verify a backup "
                                        "into an empty or absent directory.")
    _flag(p, "--name", "CLOUD_DUMP_BACKUP_NAME", "name of the backup", metavar="NAME")
    _flag(p, "--pgdata", "PGDATA", "target directory (absent or empty)", metavar="DIR")
    _add_key_flags(p, encrypting=False)
    p.add_argument("--tablespace-mapping", action="append", metavar="OLD=NEW",
                   help="restore the tablespace recorded at OLD into NEW (repeatable)")
    _number_flag(p, "--parallel", "ranged downloads in flight", 4, metavar="N")
    p.add_argument("--owner", metavar="USER[:GROUP]",
                   help="when run as root, give everything restored to USER (default: the "
                        "owner of PGDATA if it exists, else of the directory it goes into; "
                        "PostgreSQL cannot run as root)")
    _add_recovery_flags(p)
    _add_wal_flags(p)
    _add_common_flags(p)


def _add_recovery_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("point-in-time recovery (writes restore_command, the target "
                                  "and recovery.signal)")
    target = g.add_mutually_exclusive_group()
    target.add_argument("--recovery-target-time", metavar="TIME",
                        help="stop at this time, with an offset or a full zone name: "
                             "'2026-03-22 14:30:00+00', '2026-03-22T16:30:00 Europe/Helsinki'")
    target.add_argument("--recovery-target-lsn", metavar="LSN", help="stop at this LSN")
    target.add_argument("--recovery-target-xid", metavar="XID", help="stop at this transaction")
    target.add_argument("--recovery-target-name", metavar="NAME",
                        help="stop at this restore point (pg_create_restore_point)")
    target.add_argument("--recovery-target", choices=["immediate", "latest"],
                        help="immediate: as soon as consistent; latest: all archived WAL")
    g.add_argument("--recovery-target-timeline", metavar="latest|current|N",
                   help="timeline to follow: current (the backup's), latest, or a timeline "
                        "number (default: the one the archive's history leads to; refused "
                        "when its timelines branch)")
    g.add_argument("--recovery-target-exclusive", action="store_true",
                   help="stop just before the target instead of just after it")
    g.add_argument("--restore-config", metavar="FILE",
                   help="where to write the settings restore_command reads (default: "
                        "<PGDATA's name>.cloud-dump-restore.conf beside PGDATA, mode 0600; "
                        "never one serving another PGDATA)")
    parser.add_argument("--archive-mode", choices=["preserve", "off"], default="preserve",
                        help="off: write archive_mode = 'off' so the copy never archives; "
                             "preserve (default): archive as its configuration says")


def _add_wal_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("WAL archive")
    _flag(g, "--wal-prefix", "CLOUD_DUMP_WAL_PREFIX",
          "WAL archive prefix in the flat layout (default wal_archive)", metavar="PREFIX")
    _flag(g, "--spool-dir", "CLOUD_DUMP_SPOOL_DIR",
          "local directory for confirmation markers and prefetched WAL "
          "(default: pg_wal/cloud-dump of the data directory)", metavar="DIR")


def _add_wal_parsers(commands: _Subparsers) -> None:
    push = commands.add_parser(
        "wal-push", help="archive one WAL file (archive_command = 'cloud-dump wal-push %%p %%f')",
        description="Archive one WAL file; exit 0 only once it is stored. Settings come from "
                    "the environment or --config, never inline secrets.")
    push.add_argument("path", metavar="PATH", help="%%p: the file, relative to PGDATA")
    push.add_argument("file_name", metavar="NAME", help="%%f: its WAL file name")
    _flag(push, "--compression", "CLOUD_DUMP_WAL_COMPRESSION", "default zstd",
          default=_env("CLOUD_DUMP_WAL_COMPRESSION") or "zstd",
          choices=["zstd", "gzip", "lz4", "none"])
    push.add_argument("--compress", dest="compression", action="store_const", const="zstd",
                      help="the seed's flag: same as --compression zstd")
    _add_key_flags(push, encrypting=True, encrypt_env="CLOUD_DUMP_WAL_ENCRYPT")
    _number_flag(push, "--look-ahead", "also push up to N more segments already marked .ready",
                 8, metavar="N")
    _number_flag(push, "--timeout",
                 "give up (non-zero; PostgreSQL retries) if storage has not confirmed after this "
                 "long; PostgreSQL's archiver, and a fast shutdown, wait for the call",
                 DEFAULT_WAL_PUSH_TIMEOUT_S, metavar="SECONDS")
    _add_wal_flags(push)
    _add_common_flags(push)

    fetch = commands.add_parser(
        "wal-fetch", help="fetch one WAL file (restore_command = 'cloud-dump wal-fetch %%f %%p')",
        description="Fetch one WAL file into PATH. Exit 0 fetched, 1 not in the archive "
                    f"(which exists), {int(ExitCode.WAL_FETCH_FAILED)} any other failure, "
                    "no archive at the location included (PostgreSQL then stops recovery).")
    fetch.add_argument("file_name", metavar="NAME", help="%%f: the WAL file name wanted")
    fetch.add_argument("path", metavar="PATH", help="%%p: where to write it")
    _add_key_flags(fetch, encrypting=False)
    _number_flag(fetch, "--prefetch", "keep up to N following segments prefetched",
                 DEFAULT_PREFETCH, metavar="N")
    fetch.add_argument("--allow-partial", action="store_true",
                       help="serve <segment>.partial files when asked for them")
    _add_wal_flags(fetch)
    _add_common_flags(fetch)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cloud-dump",
        description="Physical PostgreSQL backups to object storage, WAL archiving and "
        "point-in-time restore, with a Celery worker pool doing the uploads.",
        epilog="Exit codes: 0 ok, 1 unexpected failure, 2 usage, 3 configuration, "
        "4 storage unreachable, 5 storage error, 6 broker unreachable, 7 no worker, "
        "8 task failed on a worker, 9 database unreachable, 10 database error, "
        "11 backup not found, 12 backup exists, 13 target not empty, 14 decryption failed, "
        "15 integrity error, 16 local i/o error, 17 WAL conflict, 18 no WAL archive there; "
        f"wal-fetch: 1 not in the archive, {int(ExitCode.WAL_FETCH_FAILED)} any failure. "
        "See README.md.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=_CommandParser)
    _add_backup_parser(commands)
    _add_restore_parser(commands)
    listing = commands.add_parser("list", help="list the backups in storage")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    _add_common_flags(listing)
    _add_wal_parsers(commands)
    check = commands.add_parser(
        "check",
        help="prove the storage and worker paths work (write, read back, delete)",
        description="Check storage directly (with --storage) and every worker's path to its "
        "storage through the broker (with --broker).",
    )
    _add_common_flags(check)
    _number_flag(check, "--timeout", "how long to wait for each worker", 30.0,
                 metavar="SECONDS", with_env=False)
    return parser


def _run(args: argparse.Namespace) -> int:
    # The environment's passphrase is read here rather than as a flag default, so that only a
    # passphrase typed on the command line (visible in ps) gets the warning.
    if hasattr(args, "passphrase"):
        args.passphrase_from_flag = args.passphrase is not None
        args.passphrase = args.passphrase or _env("CLOUD_DUMP_PASSPHRASE")
    # The WAL commands first: they run once per segment and import only what they need.
    if args.command == "wal-push":
        from coordinator.wal.push.command import run_wal_push

        run_wal_push(args)
        return ExitCode.OK
    if args.command == "wal-fetch":
        from coordinator.wal.fetch.command import run_wal_fetch

        return run_wal_fetch(args)
    from coordinator.backup.command import run_backup
    from coordinator.ops.check import run_check
    from coordinator.ops.list import run_list
    from coordinator.restore.command import run_restore

    handlers = {
        "backup": run_backup,
        "restore": run_restore,
        "list": run_list,
        "check": run_check,
    }
    handlers[args.command](args, print)
    return ExitCode.OK


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LowerLevelFormatter("cloud-dump: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if level != "debug":
        # Library chatter (botocore retries, kombu reconnects) is noise unless debugging.
        for noisy in ("botocore", "boto3", "urllib3", "kombu", "celery", "amqp"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


class _LowerLevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.levelname = record.levelname.lower()
        return super().format(record)


def _install_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so that a stopped backup cleans up after itself."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # restore_command treats exit codes up to 125 as "not in the archive" and may promote:
    # every wal-fetch failure, a usage error or a bug (1) included, must stop recovery.
    failed = ExitCode.WAL_FETCH_FAILED if argv[:1] == ["wal-fetch"] else None
    warnings: list[str] = []
    try:
        warnings = load_config_file(argv)
        # Parsing checks every number, given or from the environment (coordinator.cli.limits).
        args = build_parser().parse_args(argv)
        _check_numbers(args)
    except ConfigError as exc:
        _warn_before_failing(warnings)
        print(f"cloud-dump: error: {exc}", file=sys.stderr)
        return failed or ExitCode.CONFIG
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        code = exc.code if isinstance(exc.code, int) else ExitCode.USAGE
        if code:
            _warn_before_failing(warnings)
        return failed if (failed and code) else code
    _setup_logging(args.log_level)
    for warning in warnings:
        log.warning("%s", warning)
    code = _run_and_map_errors(args, failed)
    return failed if (failed and code not in (ExitCode.OK, 1)) else code


def _warn_before_failing(warnings: list[str]) -> None:
    """The config file's warnings when the command line failed before its --log-level was
    known: shown all the same, as the cause may be in them (the value of a key set twice that
    the operator did not edit)."""
    if warnings:
        _setup_logging("warning")
        for warning in warnings:
            log.warning("%s", warning)


def _check_numbers(args: argparse.Namespace) -> None:
    """What parsing cannot check alone: the command's environment-only numbers, and a
    compression level against its algorithm."""
    problems = env_only_problems(args.command)
    if problems:
        raise ConfigError(problems[0])
    level = getattr(args, "compression_level", None)
    if args.command == "backup" and level is not None:
        from coordinator.backup.replication import LEVEL_RANGES

        levels = LEVEL_RANGES.get(args.compression)
        if levels is None:
            raise ConfigError(
                f"a compression level (--compression-level or CLOUD_DUMP_COMPRESSION_LEVEL) "
                f"was given, but '{args.compression}' has no levels"
            )
        if level not in levels:
            raise ConfigError(
                f"compression level {level} (--compression-level or "
                f"CLOUD_DUMP_COMPRESSION_LEVEL) is out of range for {args.compression}: "
                f"expected a whole number from {levels.start} to {levels.stop - 1}"
            )


def _run_and_map_errors(args: argparse.Namespace, failed: int | None = None) -> int:
    """Run the command; on an error, its one line and exit code (``failed`` when given)."""
    try:
        _install_sigterm()
        return _run(args)
    except CloudDumpError as exc:
        log.error("%s", exc)
        log.debug("details", exc_info=True)
        return failed or exit_code_for(exc)
    except OSError as exc:
        # Local disk trouble (the library translates storage and network errors itself). The
        # library names the file even where the OS does not (a write on a descriptor).
        where = f" '{exc.filename}'" if exc.filename else ""
        where += f" -> '{exc.filename2}'" if exc.filename2 else ""
        log.error("%s%s", (exc.strerror or str(exc)).lower(), where)
        log.debug("details", exc_info=True)
        return failed or ExitCode.LOCAL_IO
    except KeyboardInterrupt:
        # Reached after the command cleaned up (a backup aborts its uploads first).
        log.error("interrupted")
        return failed or 130
    except Exception as exc:
        # Not an error we anticipated, so a bug: keep it to one line, traceback on request.
        log.error(
            "unexpected %s: %s (rerun with --log-level debug and report it)",
            type(exc).__name__,
            exc,
        )
        log.debug("details", exc_info=True)
        return failed or ExitCode.FAILURE


if __name__ == "__main__":
    sys.exit(main())
