"""Exit codes of the ``cloud-dump`` command. Each error class carries its own
(``storage.errors``); this module names them, with the statuses no error class has.

The README documents the table (a test holds it to ``ExitCode``); scripts and monitoring may rely
on it, so codes are never reused for another meaning.
"""

from __future__ import annotations

from enum import IntEnum

from storage.errors import (
    BackupExists,
    BackupNotFound,
    BrokerUnreachable,
    CloudDumpError,
    ConfigError,
    DatabaseError,
    DatabaseUnreachable,
    DecryptionFailed,
    IntegrityError,
    NoWorkerAvailable,
    RemoteTaskFailed,
    StorageError,
    StorageUnreachable,
    TargetNotEmpty,
    WalArchiveNotFound,
    WalConflict,
    WalNotArchived,
)


class ExitCode(IntEnum):
    """Every exit status of ``cloud-dump``. An error's status is its class's ``exit_code``
    (``storage.errors``): the members naming an error class take it from there."""

    OK = 0
    # An unexpected failure (a bug: please report it with the --log-level debug output).
    FAILURE = CloudDumpError.exit_code
    # Bad command line, or a command this version does not implement yet.
    USAGE = 2
    CONFIG = ConfigError.exit_code
    STORAGE_UNREACHABLE = StorageUnreachable.exit_code
    STORAGE_ERROR = StorageError.exit_code
    BROKER_UNREACHABLE = BrokerUnreachable.exit_code
    NO_WORKER = NoWorkerAvailable.exit_code
    TASK_FAILED = RemoteTaskFailed.exit_code
    DATABASE_UNREACHABLE = DatabaseUnreachable.exit_code
    DATABASE_ERROR = DatabaseError.exit_code
    BACKUP_NOT_FOUND = BackupNotFound.exit_code
    BACKUP_EXISTS = BackupExists.exit_code
    TARGET_NOT_EMPTY = TargetNotEmpty.exit_code
    DECRYPTION_FAILED = DecryptionFailed.exit_code
    INTEGRITY = IntegrityError.exit_code
    # A local file or directory could not be read or written (permissions, disk full): OSError.
    LOCAL_IO = 16
    WAL_CONFLICT = WalConflict.exit_code
    WAL_ARCHIVE_NOT_FOUND = WalArchiveNotFound.exit_code
    WAL_NOT_ARCHIVED = WalNotArchived.exit_code
    # Ctrl-C or SIGTERM, after the command cleaned up (128 + SIGINT, as shells report it).
    INTERRUPTED = 130
    # wal-fetch only: any failure other than "not in the archive", a missing archive (18)
    # included. PostgreSQL stops recovery on a restore_command status above 125
    # (src/common/wait_error.c, wait_result_is_any_signal(rc, true), called by
    # RestoreArchivedFile) instead of taking it as the end of the archive and promoting early.
    # Its log line comes from wait_result_to_str: 126 reads "command not executable" and 127
    # "command not found", which send operators after the wrong problem; any other status
    # reads "child process exited with exit code N". 128 + N reads as "killed by signal N" to
    # people and scripts, and 128 + SIGTERM (143) makes RestoreArchivedFile exit as for a fast
    # shutdown (wait_result_is_signal); 200 is far above every signal number (1-64).
    WAL_FETCH_FAILED = 200


# What --help says of each status, in a few words (the README's table says more).
SUMMARY: dict[ExitCode, str] = {
    ExitCode.OK: "ok",
    ExitCode.FAILURE: "unexpected failure",
    ExitCode.USAGE: "usage",
    ExitCode.CONFIG: "configuration",
    ExitCode.STORAGE_UNREACHABLE: "storage unreachable",
    ExitCode.STORAGE_ERROR: "storage error",
    ExitCode.BROKER_UNREACHABLE: "broker unreachable",
    ExitCode.NO_WORKER: "no worker",
    ExitCode.TASK_FAILED: "task failed on a worker",
    ExitCode.DATABASE_UNREACHABLE: "database unreachable",
    ExitCode.DATABASE_ERROR: "database error",
    ExitCode.BACKUP_NOT_FOUND: "backup not found",
    ExitCode.BACKUP_EXISTS: "backup exists",
    ExitCode.TARGET_NOT_EMPTY: "target not empty or in use",
    ExitCode.DECRYPTION_FAILED: "decryption failed",
    ExitCode.INTEGRITY: "integrity error",
    ExitCode.LOCAL_IO: "local i/o error",
    ExitCode.WAL_CONFLICT: "WAL conflict",
    ExitCode.WAL_ARCHIVE_NOT_FOUND: "no WAL archive there",
    ExitCode.WAL_NOT_ARCHIVED: "check: WAL did not reach the archive",
    ExitCode.INTERRUPTED: "interrupted",
    ExitCode.WAL_FETCH_FAILED: "wal-fetch: any failure (1: not in the archive)",
}


def help_epilog() -> str:
    """The exit codes for ``cloud-dump --help``, from ``ExitCode`` and ``SUMMARY``."""
    return "Exit codes: " + ", ".join(f"{int(c)} {SUMMARY[c]}" for c in ExitCode) + (
        ". See README.md.")


def exit_code_for(error: BaseException) -> ExitCode:
    """The status ``error`` ends the command with: its class's ``exit_code`` for cloud-dump's
    errors, ``LOCAL_IO`` for an ``OSError`` (local disk trouble), ``FAILURE`` otherwise."""
    if isinstance(error, CloudDumpError):
        return ExitCode(type(error).exit_code)
    if isinstance(error, OSError):
        return ExitCode.LOCAL_IO
    return ExitCode.FAILURE
