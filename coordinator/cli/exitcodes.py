"""Exit codes of the ``cloud-dump`` command, and which error maps to which.

The README documents this table; scripts and monitoring may rely on it, so codes are never
reused for another meaning.
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
)


class ExitCode(IntEnum):
    OK = 0
    # An unexpected failure (a bug: please report it with the --log-level debug output).
    FAILURE = 1
    # Bad command line, or a command this version does not implement yet.
    USAGE = 2
    # A flag or environment value is invalid (storage URL, name, number out of range).
    CONFIG = 3
    # The storage endpoint or directory could not be reached or kept failing, throttling (503
    # SlowDown) or timing out, after retries: may pass, try again later.
    STORAGE_UNREACHABLE = 4
    # The store answered with an error retrying will not fix (no bucket, access denied, ...).
    STORAGE_ERROR = 5
    # The Celery broker (Redis) could not be reached.
    BROKER_UNREACHABLE = 6
    # The broker answered, but no worker took the work in time.
    NO_WORKER = 7
    # A worker ran the task and it failed (its error is in the message).
    TASK_FAILED = 8
    # Could not connect to or authenticate with PostgreSQL.
    DATABASE_UNREACHABLE = 9
    # PostgreSQL refused or failed the backup (e.g. not enough wal senders).
    DATABASE_ERROR = 10
    # No complete backup of that name.
    BACKUP_NOT_FOUND = 11
    # The backup name is taken, by a complete backup or one in progress.
    BACKUP_EXISTS = 12
    # The restore target (PGDATA or a tablespace directory) is not empty; nothing was written.
    TARGET_NOT_EMPTY = 13
    # Wrong passphrase or identity.
    DECRYPTION_FAILED = 14
    # Stored or restored bytes do not match their checksums (corrupted or missing data).
    INTEGRITY = 15
    # A local file or directory could not be read or written (permissions, disk full).
    LOCAL_IO = 16
    # wal-push: a different file is archived under that name, or WAL of another cluster.
    WAL_CONFLICT = 17
    # No WAL archive exists at the location at all (wrong --storage, --cluster or --wal-prefix).
    WAL_ARCHIVE_NOT_FOUND = 18
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


# Most specific first: the first matching class decides.
_EXIT_CODES: list[tuple[type[BaseException], ExitCode]] = [
    (ConfigError, ExitCode.CONFIG),
    (StorageUnreachable, ExitCode.STORAGE_UNREACHABLE),
    (StorageError, ExitCode.STORAGE_ERROR),
    (BrokerUnreachable, ExitCode.BROKER_UNREACHABLE),
    (NoWorkerAvailable, ExitCode.NO_WORKER),
    (RemoteTaskFailed, ExitCode.TASK_FAILED),
    (DatabaseUnreachable, ExitCode.DATABASE_UNREACHABLE),
    (DatabaseError, ExitCode.DATABASE_ERROR),
    (BackupNotFound, ExitCode.BACKUP_NOT_FOUND),
    (BackupExists, ExitCode.BACKUP_EXISTS),
    (TargetNotEmpty, ExitCode.TARGET_NOT_EMPTY),
    (DecryptionFailed, ExitCode.DECRYPTION_FAILED),
    (IntegrityError, ExitCode.INTEGRITY),
    (WalConflict, ExitCode.WAL_CONFLICT),
    (WalArchiveNotFound, ExitCode.WAL_ARCHIVE_NOT_FOUND),
    (CloudDumpError, ExitCode.FAILURE),
    (OSError, ExitCode.LOCAL_IO),
]


def exit_code_for(error: BaseException) -> ExitCode:
    for cls, code in _EXIT_CODES:
        if isinstance(error, cls):
            return code
    return ExitCode.FAILURE
