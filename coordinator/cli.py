"""The ``cloud-dump`` command line: flags, environment defaults, logging and exit codes.

The only place in cloud-dump that exits. Every flag can also come from an environment variable
(shown in ``--help``); a flag given on the command line wins. Errors are printed as one line,
``cloud-dump: error: <what went wrong>``, with the traceback only at ``--log-level debug``, and
map to the exit codes in ``coordinator.exitcodes``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from coordinator.exitcodes import ExitCode, exit_code_for
from storage import StorageOptions, open_storage
from storage.errors import CloudDumpError, ConfigError

log = logging.getLogger("cloud_dump")

# Commands of the seed that later releases fill in; they parse nothing yet and exit USAGE.
_PLANNED = {
    "backup": "stream a physical backup of a PostgreSQL cluster to storage",
    "restore": "restore a backup into an empty PGDATA (optionally to a point in time)",
    "list": "list the backups in storage",
    "wal-push": "archive one WAL file (use as archive_command: wal-push %%p %%f)",
    "wal-fetch": "fetch one WAL file (use as restore_command: wal-fetch %%f %%p)",
}


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def _env_int(name: str, default: int) -> int:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}='{raw}' is not a whole number") from None


def _env_bool(name: str) -> bool | None:
    raw = _env(name)
    if raw is None:
        return None
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"environment variable {name}='{raw}' is not true or false")


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command: where the store and the broker are, and logging."""
    g = parser.add_argument_group("storage and broker")
    g.add_argument(
        "--storage",
        default=_env("CLOUD_DUMP_STORAGE"),
        metavar="URL",
        help="s3://bucket[/prefix] or file:///path (env CLOUD_DUMP_STORAGE)",
    )
    g.add_argument(
        "--s3-endpoint",
        default=_env("CLOUD_DUMP_S3_ENDPOINT"),
        metavar="URL",
        help="S3-compatible endpoint, e.g. MinIO (env CLOUD_DUMP_S3_ENDPOINT)",
    )
    g.add_argument(
        "--s3-region",
        default=_env("CLOUD_DUMP_S3_REGION"),
        metavar="REGION",
        help="S3 region (env CLOUD_DUMP_S3_REGION)",
    )
    g.add_argument(
        "--s3-path-style",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("CLOUD_DUMP_S3_PATH_STYLE"),
        help="path-style addressing; default: on with --s3-endpoint (env CLOUD_DUMP_S3_PATH_STYLE)",
    )
    g.add_argument(
        "--s3-max-parts",
        type=int,
        metavar="N",
        default=_env_int("CLOUD_DUMP_S3_MAX_PARTS", 10_000),
        help="most parts the store accepts in one upload, 1000-10000 "
        "(env CLOUD_DUMP_S3_MAX_PARTS, default 10000)",
    )
    g.add_argument(
        "--storage-max-attempts",
        type=int,
        metavar="N",
        default=_env_int("CLOUD_DUMP_STORAGE_MAX_ATTEMPTS", 5),
        help="attempts per storage request, with backoff "
        "(env CLOUD_DUMP_STORAGE_MAX_ATTEMPTS, default 5)",
    )
    g.add_argument(
        "--broker",
        default=_env("CLOUD_DUMP_BROKER_URL"),
        metavar="URL",
        help="Celery broker, e.g. redis://host:6379/0; without it work runs "
        "in-process (env CLOUD_DUMP_BROKER_URL)",
    )
    g.add_argument(
        "--result-backend",
        default=_env("CLOUD_DUMP_RESULT_BACKEND"),
        metavar="URL",
        help="where task results go; default: the broker (env CLOUD_DUMP_RESULT_BACKEND)",
    )
    parser.add_argument(
        "--cluster",
        default=_env("CLOUD_DUMP_CLUSTER"),
        metavar="NAME",
        help="cluster namespace: <cluster>/backup/, <cluster>/wal_archive/ "
        "(env CLOUD_DUMP_CLUSTER)",
    )
    parser.add_argument(
        "--log-level",
        default=_env("CLOUD_DUMP_LOG_LEVEL") or "info",
        choices=["debug", "info", "warning", "error"],
        help="(env CLOUD_DUMP_LOG_LEVEL, default info)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloud-dump",
        description="Physical PostgreSQL backups to object storage, WAL archiving and "
        "point-in-time restore, with a Celery worker pool doing the uploads.",
        epilog="Exit codes: 0 ok, 1 unexpected failure, 2 usage, 3 configuration, "
        "4 storage unreachable, 5 storage error, 6 broker unreachable, 7 no worker, "
        "8 task failed on a worker. See README.md.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in _PLANNED.items():
        commands.add_parser(name, help=summary, description=summary)
    check = commands.add_parser(
        "check",
        help="prove the storage and worker paths work (write, read back, delete)",
        description="Check storage directly (with --storage) and every worker's path to its "
        "storage through the broker (with --broker).",
    )
    _add_common_flags(check)
    check.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for each worker (default 30)",
    )
    return parser


def _storage_options(args: argparse.Namespace) -> StorageOptions:
    return StorageOptions(
        s3_endpoint=args.s3_endpoint,
        s3_region=args.s3_region,
        s3_path_style=args.s3_path_style,
        max_part_count=args.s3_max_parts,
        max_attempts=args.storage_max_attempts,
    )


def _run_check(args: argparse.Namespace) -> ExitCode:
    from coordinator.check import check_storage, check_workers

    if not args.storage and not args.broker:
        raise ConfigError("nothing to check: give --storage, --broker or both")
    report: Callable[[str], None] = print
    if args.storage:
        storage = open_storage(args.storage, _storage_options(args))
        try:
            check_storage(storage, report)
        finally:
            storage.close()
    if args.broker:
        check_workers(args.broker, args.result_backend, args.timeout, report)
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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        # Building the parser reads environment defaults, which may be invalid.
        parser = build_parser()
        # Planned commands accept (and ignore) any flags, so that scripts written for the seed
        # get "not implemented" rather than a complaint about the flags.
        args, unknown = parser.parse_known_args(argv)
        if unknown and args.command not in _PLANNED:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except ConfigError as exc:
        print(f"cloud-dump: error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    _setup_logging(getattr(args, "log_level", "info"))
    if args.command in _PLANNED:
        log.error("'%s' is not implemented in this version yet", args.command)
        return ExitCode.USAGE
    try:
        return _run_check(args)
    except CloudDumpError as exc:
        log.error("%s", exc)
        log.debug("details", exc_info=True)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as exc:
        # Not an error we anticipated, so a bug: keep it to one line, traceback on request.
        log.error(
            "unexpected %s: %s (rerun with --log-level debug and report it)",
            type(exc).__name__,
            exc,
        )
        log.debug("details", exc_info=True)
        return ExitCode.FAILURE


if __name__ == "__main__":
    sys.exit(main())
