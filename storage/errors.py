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

Messages are lower case, without a trailing period, and quote the names they mention, so that the
CLI can print ``cloud-dump: error: <message>`` as one readable line.
"""

from __future__ import annotations


class CloudDumpError(Exception):
    """Base of every error cloud-dump raises on purpose."""


class ConfigError(CloudDumpError):
    """A flag, environment variable or URL is invalid."""


class StorageMismatch(ConfigError):
    """A coordinator told a storage sent a task to a worker whose storage is elsewhere.

    Raised by the worker before it touches anything; a configuration error on the coordinator's
    side (exit 3), since only the operator can say which of the two locations was meant.
    """


class StorageError(CloudDumpError):
    """A storage operation failed."""


class TransientStorageError(StorageError):
    """A storage failure that may succeed if retried later."""


class StorageUnreachable(TransientStorageError):
    """The storage endpoint (or local directory) could not be reached."""


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


class BrokerUnreachable(BrokerError):
    """The broker could not be reached."""


class NoWorkerAvailable(BrokerError):
    """The broker is reachable but no worker consumed the task in time."""


class RemoteTaskFailed(BrokerError):
    """A task failed on a worker; the message carries the worker's error."""


class DatabaseError(CloudDumpError):
    """The PostgreSQL server refused or failed a request."""


class DatabaseUnreachable(DatabaseError):
    """Could not connect to (or authenticate with) the PostgreSQL server."""


class BackupNotFound(CloudDumpError):
    """No complete backup (manifest.json) exists under that name."""


class BackupExists(CloudDumpError):
    """The backup name is already used by a complete or a running backup."""


class TargetNotEmpty(CloudDumpError):
    """A restore target directory exists and is not empty: nothing was written."""


class DecryptionFailed(CloudDumpError):
    """The passphrase or identity does not decrypt the backup."""


class IntegrityError(CloudDumpError):
    """Bytes fetched or restored do not match the checksums recorded at backup time."""


class WalArchiveGap(IntegrityError):
    """A WAL segment is missing from an archive that holds later segments of its timeline."""


class WalConflict(CloudDumpError):
    """A different WAL file is already archived under the name, or the archive belongs to
    another cluster. Nothing is overwritten."""


class WalArchiveNotFound(CloudDumpError):
    """No WAL archive exists at the configured location (wrong storage, cluster or prefix).

    Distinct from a file missing from an archive that exists: restore_command must not answer
    "not in the archive" for it, since PostgreSQL would take that as the end of recovery.
    """
