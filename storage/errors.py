"""The project's error tree.

Every failure that leaves a cloud-dump package is one of these. Third-party exceptions (botocore,
OSError from the local backend, kombu, psycopg) are translated where they are caught, once, and
re-raised ``from`` the original so the traceback (shown at DEBUG) keeps the cause.

    CloudDumpError
     ├── ConfigError                 bad flag or environment value; nothing was touched
     │    └── StorageMismatch        a task names a storage other than the worker's own
     ├── StorageError
     │    ├── TransientStorageError  worth retrying: network, throttling, 5xx
     │    │    └── StorageUnreachable   the endpoint or directory could not be reached at all
     │    └── PermanentStorageError  retrying will not help
     │         ├── ObjectNotFound       the key does not exist
     │         ├── ObjectExists         a conditional create found the key taken
     │         ├── ChecksumMismatch     bytes do not match the checksum they were sent with
     │         ├── PartTooSmall         a non-last multipart part is under the store's minimum
     │         └── UploadNotFound       the multipart upload id is unknown (completed or aborted)
     ├── DatabaseError               the PostgreSQL server failed a request
     │    └── DatabaseUnreachable    could not connect or authenticate
     ├── BackupNotFound              no manifest.json for that backup name
     ├── BackupExists                the backup name is taken (or claimed by a running backup)
     ├── TargetNotEmpty              restore target (PGDATA, tablespace dir) has files in it
     ├── DecryptionFailed            wrong passphrase or identity, or not encrypted to it
     ├── IntegrityError              fetched or restored bytes do not match their checksums
     ├── WalConflict                 a different file is archived under that name, or the
     │                               archive belongs to another cluster: never overwritten
     ├── WalArchiveNotFound          no WAL archive at all at the location (not the same as a
     │                               file missing from an archive that exists)
     └── BrokerError
          ├── BrokerUnreachable      the Celery broker or result backend could not be reached
          ├── NoWorkerAvailable      the broker answered but no worker took the work in time
          └── RemoteTaskFailed       a worker ran the task and it failed

Each class carries the exit code of the ``cloud-dump`` command that fails with it
(``exit_code``, inherited by subclasses that do not set their own); ``coordinator.cli.exitcodes``
names them, and ``--help`` and the README's table are checked against it.

Messages are lower case, without a trailing period, and quote the names they mention, so that the
CLI can print ``cloud-dump: error: <message>`` as one readable line.
"""

from __future__ import annotations


class CloudDumpError(Exception):
    """Base of every error cloud-dump raises on purpose."""

    exit_code: int = 1


class ConfigError(CloudDumpError):
    """A flag, environment variable or URL is invalid."""

    exit_code: int = 3


class StorageMismatch(ConfigError):
    """A coordinator told a storage sent a task to a worker whose storage is elsewhere.

    Raised by the worker before it touches anything; a configuration error on the coordinator's
    side (exit 3), since only the operator can say which of the two locations was meant.
    """


class StorageError(CloudDumpError):
    """A storage operation failed."""

    exit_code: int = 5


class TransientStorageError(StorageError):
    """A storage failure that may succeed if retried later."""


class StorageUnreachable(TransientStorageError):
    """The storage endpoint (or local directory) could not be reached."""

    exit_code: int = 4


class PermanentStorageError(StorageError):
    """A storage failure that retrying will not fix."""


class ObjectNotFound(PermanentStorageError):
    """The requested key does not exist."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object '{key}' not found")
        self.key = key


class ObjectExists(PermanentStorageError):
    """A create-only-if-absent write found the key already present."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object '{key}' already exists")
        self.key = key


class ChecksumMismatch(PermanentStorageError):
    """Bytes did not match the checksum they were declared with."""


class PartTooSmall(PermanentStorageError):
    """A multipart part other than the last is smaller than the store allows."""


class UploadNotFound(PermanentStorageError):
    """The multipart upload does not exist (never created, completed or aborted)."""


class BrokerError(CloudDumpError):
    """The task broker or result backend failed."""

    exit_code: int = 1


class BrokerUnreachable(BrokerError):
    """The broker could not be reached."""

    exit_code: int = 6


class NoWorkerAvailable(BrokerError):
    """The broker is reachable but no worker consumed the task in time."""

    exit_code: int = 7


class RemoteTaskFailed(BrokerError):
    """A task failed on a worker; the message carries the worker's error."""

    exit_code: int = 8


class DatabaseError(CloudDumpError):
    """The PostgreSQL server refused or failed a request."""

    exit_code: int = 10


class DatabaseUnreachable(DatabaseError):
    """Could not connect to (or authenticate with) the PostgreSQL server."""

    exit_code: int = 9


class BackupNotFound(CloudDumpError):
    """No complete backup (manifest.json) exists under that name."""

    exit_code: int = 11


class BackupExists(CloudDumpError):
    """The backup name is already used by a complete or a running backup."""

    exit_code: int = 12


class TargetNotEmpty(CloudDumpError):
    """A restore target directory exists and is not empty: nothing was written."""

    exit_code: int = 13


class DecryptionFailed(CloudDumpError):
    """The passphrase or identity does not decrypt the backup."""

    exit_code: int = 14


class IntegrityError(CloudDumpError):
    """Bytes fetched or restored do not match the checksums recorded at backup time."""

    exit_code: int = 15


class WalArchiveGap(IntegrityError):
    """A WAL segment is missing from an archive that holds later segments of its timeline."""


class WalConflict(CloudDumpError):
    """A different WAL file is already archived under the name, or the archive belongs to
    another cluster. Nothing is overwritten."""

    exit_code: int = 17


class WalArchiveNotFound(CloudDumpError):
    """No WAL archive exists at the configured location (wrong storage, cluster or prefix).

    Distinct from a file missing from an archive that exists: restore_command must not answer
    "not in the archive" for it, since PostgreSQL would take that as the end of recovery.
    """

    exit_code: int = 18


class WalNotArchived(CloudDumpError):
    """``check --db-url``: the segment the check switched to did not reach the archive in time,
    or PostgreSQL reported ``archive_command`` failing for it. Archiving does not work as
    configured: nothing a backup relies on would be recoverable past its end."""

    exit_code: int = 19
