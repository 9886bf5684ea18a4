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
from coordinator.cli.exitcodes import ExitCode, exit_code_for, help_epilog
from coordinator.cli.limits import env_only_problems, flag_problem
from coordinator.cli.seed import apply_seed_variables
from coordinator.logs import setup_cli_logging
from coordinator.toolversion import tool_version
from options.declared import (
    BACKUP,
    BOOL,
    CHECK,
    CHOICE,
    CLEANUP,
    COMMANDS,
    CONST,
    DELETE,
    EXPIRE,
    FLOAT,
    INFO,
    INT,
    KEEP,
    LIST,
    REPEATED,
    RESTORE,
    SWITCH,
    VERIFY,
    WAL_FETCH,
    WAL_PUSH,
    Option,
    options_of,
)
from storage.errors import CloudDumpError, ConfigError

log = logging.getLogger("cloud_dump")

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


def _number(option: Option) -> Callable[[str], int | float]:
    """argparse ``type=`` for a numeric ``option``: its number, checked against its range.

    Raises ``ConfigError`` (exit 3), which argparse lets through, rather than a usage error.
    """
    limit = option.limit
    assert limit is not None

    def convert(text: str) -> int | float:
        env = text.env if isinstance(text, _FromEnv) else None
        problem = flag_problem(option, text, env)
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


# What each command is, for --help; its options come from ``options.declared``.
_COMMANDS: dict[str, dict[str, str]] = {
    BACKUP: {"help": "stream a physical backup of a cluster to storage",
             "description": "Take a base backup over the replication protocol and store it; "
                            "with --broker the workers upload it."},
    RESTORE: {"help": "restore a backup into an empty PGDATA",
              "description": "Download, decrypt, decompress and verify a backup into an empty "
                             "or absent directory."},
    LIST: {"help": "list the backups in storage",
           "description": "The complete backups in a store, newest first, with the WAL "
                          "archived after each."},
    EXPIRE: {"help": "remove backups and WAL a retention policy no longer keeps",
             "description": "Keep the newest --retain N backups, or every point of the last "
                            "--recovery-window restorable; remove the other backups, then the "
                            "WAL before the oldest kept backup's start. Never the newest "
                            "backup, never WAL a kept backup needs."},
    DELETE: {"help": "delete one backup",
             "description": "Remove one backup (manifest.json first, so that a half-deleted "
                            "backup is never taken for a whole one). Its WAL stays: expire "
                            "removes WAL no kept backup needs."},
    KEEP: {"help": "pin a backup (and the WAL that makes it consistent) against expire",
           "description": "Pin backup NAME: expire keeps it, and the WAL from its first to its "
                          "last segment, until --until or until released; delete refuses it."},
    CLEANUP: {"help": "remove what killed backups left: claims, uploads, partial objects",
              "description": "Abort the multipart uploads and remove the claims and objects of "
                             "backups whose coordinator is gone (no heartbeat in their claim "
                             "for --older-than), and stray uploads and claims beside complete "
                             "backups. A running backup is never touched."},
    VERIFY: {"help": "check that stored backups and their WAL are whole",
             "description": "Read every object of each backup back from storage and check its "
                            "size and SHA-256, and check that the WAL each backup needs, and "
                            "the WAL after it, is archived without a gap, following the "
                            "newest timeline's history. --deep also decrypts, decompresses "
                            "and reads every archive and that WAL back to their contents, "
                            "checking each file against backup_manifest and each segment's "
                            "header. Exit 0 only when everything checks out."},
    INFO: {"help": "what a store holds, and how far a restore from it reaches",
           "description": "The backups, the restorable window of each timeline (from the "
                          "newest archived WAL, read record by record), WAL gaps and the age "
                          "of the newest segment, stored bytes and verify's last result; as "
                          "text, --json or --prometheus (for node_exporter's textfile "
                          "collector)."},
    WAL_PUSH: {"help": "archive one WAL file (archive_command = 'cloud-dump wal-push %%p %%f')",
               "description": "Archive one WAL file; exit 0 only once it is stored. Settings "
                              "come from the environment or --config, never inline secrets."},
    WAL_FETCH: {"help": "fetch one WAL file (restore_command = 'cloud-dump wal-fetch %%f %%p')",
                "description": "Fetch one WAL file into PATH. Exit 0 fetched, 1 not in the "
                               "archive (which exists), "
                               f"{int(ExitCode.WAL_FETCH_FAILED)} any other failure, no archive "
                               "at the location included (PostgreSQL then stops recovery)."},
    CHECK: {"help": "prove the storage, worker and WAL archiving paths work",
            "description": "Check storage directly (with --storage: write, read back, delete), "
                           "that archive_command gets WAL into it (with --db-url: a forced WAL "
                           "switch, and the wait for its segment in the archive), and every "
                           "worker's path to its storage through the broker (with --broker)."},
}
# The positional arguments: PostgreSQL's %p and %f, in the order each command takes them.
_POSITIONALS: dict[str, list[tuple[str, str, str]]] = {
    WAL_PUSH: [("path", "PATH", "%%p: the file, relative to PGDATA"),
               ("file_name", "NAME", "%%f: its WAL file name")],
    WAL_FETCH: [("file_name", "NAME", "%%f: the WAL file name wanted"),
                ("path", "PATH", "%%p: where to write it")],
    KEEP: [("name", "NAME", "the backup to pin")],
}


# A variable's value an option cannot take, by command: reported only when that command runs
# (a backup's CLOUD_DUMP_COMPRESSION left in a server's environment must not stop wal-fetch).
_ENV_PROBLEMS: dict[str, list[str]] = {}


def _env_bool_for(command: str, option: Option) -> bool | None:
    """The variable of a true/false ``option``, None when unset or (noted for ``command``)
    when it is neither."""
    if not option.env:
        return None
    try:
        return _env_bool(option.env)
    except ConfigError as exc:
        _ENV_PROBLEMS.setdefault(command, []).append(f"{exc} ({command} {option.flag})")
        return None


def _add_option(command: str, target: _Group, option: Option) -> None:
    """Add ``option``'s flag to ``target``: its default from its variable (checked here, so a
    bad value is named before anything runs), --help naming the variable."""
    assert option.flag is not None
    env, kw = option.env, {}
    notes: list[str] = []
    if option.kind in (INT, FLOAT):
        assert option.limit is not None
        if option.default is not None:
            notes.append(f"default {option.default:g}")
        notes.append(option.range_text or option.limit.describe_short())
        from_env = _from_env(env) if env else None
        kw = {"type": _number(option), "metavar": option.metavar,
              "default": option.default if from_env is None else from_env}
    elif option.kind == SWITCH:
        from_env_bool = _env_bool_for(command, option)
        kw = {"action": "store_true",
              "default": option.default if from_env_bool is None else from_env_bool}
    elif option.kind == BOOL:
        from_env_bool = _env_bool_for(command, option)
        kw = {"action": argparse.BooleanOptionalAction,
              "default": option.default if from_env_bool is None else from_env_bool}
    elif option.kind == REPEATED:
        kw = {"action": "append", "metavar": option.metavar,
              "default": _env_list(env) if env else None}
        notes.append("repeatable" + (f"; env {env}, comma-separated" if env else ""))
        env = None
    elif option.kind == CONST:
        kw = {"action": "store_const", "dest": option.dest, "const": option.const}
    else:
        raw = _env(env) if env else None
        if option.kind == CHOICE:
            assert option.choices is not None
            if raw is not None and raw not in option.choices:
                assert env is not None
                _ENV_PROBLEMS.setdefault(command, []).append(
                    f"{describe(env, raw)} is not one of {', '.join(option.choices)} "
                    f"({command} {option.flag})")
                raw = None
            kw = {"choices": list(option.choices)}
            if option.metavar:
                kw["metavar"] = option.metavar
                notes.append(" | ".join(option.choices))
            if option.default is not None:
                notes.append(f"default {option.default}")
        else:
            kw = {"metavar": option.metavar}
        kw["default"] = raw if raw is not None else option.default
    if env:
        notes.append(f"env {env}")
    help_text = option.help + (f" ({'; '.join(notes)})" if notes else "")
    if option.kind not in (CONST,) and option.dest != option.flag.lstrip("-").replace("-", "_"):
        kw["dest"] = option.dest
    target.add_argument(option.flag, help=help_text, **kw)


def _add_command(commands: _Subparsers, command: str) -> None:
    # Every command's --help ends with the exit codes too: scripts are written against one.
    parser = commands.add_parser(command, epilog=help_epilog(), **_COMMANDS[command])
    for dest, metavar, help_text in _POSITIONALS.get(command, []):
        parser.add_argument(dest, metavar=metavar, help=help_text)
    groups: dict[str | None, _Group] = {None: parser}
    exclusive: dict[str, _Group] = {}
    for option in options_of(command):
        if option.flag is None:
            continue  # environment-only: read where it is used, checked in _check_numbers
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        target = groups[option.group]
        if option.exclusive is not None:
            if option.exclusive not in exclusive:
                exclusive[option.exclusive] = target.add_mutually_exclusive_group()
            target = exclusive[option.exclusive]
        _add_option(command, target, option)


class _VersionAction(argparse.Action):
    """``-V``/``--version``, with the version looked up only when it is asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 help: str | None = None) -> None:  # fmt: skip
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> NoReturn:
        parser._print_message(f"{parser.prog} {tool_version()}\n", sys.stdout)
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The full CLI's parser, every option from ``options.declared``.

    A variable whose value its option cannot take is noted for its command, and reported
    (exit 3) only when that command runs (``_check_numbers``).
    """
    _ENV_PROBLEMS.clear()
    parser = _Parser(
        prog="cloud-dump",
        description="Physical PostgreSQL backups to object storage, WAL archiving and "
        "point-in-time restore, with a Celery worker pool doing the uploads.",
        epilog=help_epilog(),
    )
    parser.add_argument("-V", "--version", action=_VersionAction,
                        help="show program's version number and exit")  # fmt: skip
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=_CommandParser)  # fmt: skip
    for command in COMMANDS:
        _add_command(commands, command)
    return parser


def _run(args: argparse.Namespace) -> int:
    from coordinator.cli.settings import settings_of
    from coordinator.settings import (
        BackupSettings,
        CheckSettings,
        CleanupSettings,
        DeleteSettings,
        ExpireSettings,
        InfoSettings,
        KeepSettings,
        ListSettings,
        RestoreSettings,
        VerifySettings,
        WalFetchSettings,
        WalPushSettings,
    )

    settings = settings_of(args)
    # The WAL commands first: they run once per segment and import only what they need.
    if isinstance(settings, WalPushSettings):
        from coordinator.wal.push.command import run_wal_push

        run_wal_push(settings)
        return ExitCode.OK
    if isinstance(settings, WalFetchSettings):
        from coordinator.wal.fetch.command import run_wal_fetch

        return run_wal_fetch(settings)
    if isinstance(settings, BackupSettings):
        from coordinator.backup.command import run_backup

        run_backup(settings, _report)
    elif isinstance(settings, RestoreSettings):
        from coordinator.restore.command import run_restore

        run_restore(settings, _report)
    elif isinstance(settings, ListSettings):
        from coordinator.ops.list import run_list

        run_list(settings, _report)
    elif isinstance(settings, ExpireSettings):
        from coordinator.ops.expire import run_expire

        run_expire(settings, _report)
    elif isinstance(settings, DeleteSettings):
        from coordinator.ops.expire import run_delete

        run_delete(settings, _report)
    elif isinstance(settings, KeepSettings):
        from coordinator.ops.expire import run_keep

        run_keep(settings, _report)
    elif isinstance(settings, CleanupSettings):
        from coordinator.ops.cleanup import run_cleanup

        run_cleanup(settings, _report)
    elif isinstance(settings, InfoSettings):
        from coordinator.ops.info import run_info

        run_info(settings, _report)
    elif isinstance(settings, VerifySettings):
        from coordinator.ops.verify import run_verify

        run_verify(settings, _report)
    else:
        from coordinator.ops.check import run_check

        assert isinstance(settings, CheckSettings)
        run_check(settings, _report)
    return ExitCode.OK


def _report(line: str) -> None:
    """One line of a command's report on stdout. A reader that went away (``| head``) is not an
    error: the rest of the report is dropped and the command goes on to its own outcome (a
    backup stays complete, verify still exits 15 for a problem). stdout then points at
    /dev/null, so that the interpreter's flush at exit has nowhere to fail."""
    global _stdout_gone
    if _stdout_gone:
        return
    try:
        print(line)
        sys.stdout.flush()  # a pipe is block-buffered: the failure shows here, not at exit
    except BrokenPipeError:
        _stdout_gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


_stdout_gone = False


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
        apply_seed_variables(argv)  # the seed's WAL_* variables, before flags are read
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
    setup_cli_logging(args.log_level)
    for warning in warnings:
        log.warning("%s", warning)
    code = _run_and_map_errors(args, failed)
    return failed if (failed and code not in (ExitCode.OK, 1)) else code


def _warn_before_failing(warnings: list[str]) -> None:
    """The config file's warnings when the command line failed before its --log-level was
    known: shown all the same, as the cause may be in them (the value of a key set twice that
    the operator did not edit)."""
    if warnings:
        setup_cli_logging("warning")
        for warning in warnings:
            log.warning("%s", warning)


def _check_numbers(args: argparse.Namespace) -> None:
    """What parsing cannot check alone: the command's environment-only numbers, and a
    compression level against its algorithm."""
    problems = _ENV_PROBLEMS.get(args.command, []) + env_only_problems(args.command)
    if problems:
        raise ConfigError(problems[0])
    level = getattr(args, "compression_level", None)
    if args.command == "backup" and level is not None:
        from coordinator.codecs import codec

        levels = codec(args.compression).levels
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
        return failed or ExitCode.INTERRUPTED
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
