"""Logging of the coordinator's processes: the command line's and its detached helpers'.

One handler on the root logger, writing to stderr, in one of two formats:

- ``setup_cli_logging``: what the operator (or PostgreSQL's log, for archive_command and
  restore_command) reads, one line per message: ``cloud-dump: warning: ...``, the level in lower
  case as in the CLI's own ``cloud-dump: error: ...`` lines.
- ``setup_helper_logging``: the detached WAL pusher's and prefetcher's, whose stderr is a file
  in the spool (``pusher.log``, ``prefetch.log``) read after the fact, maybe from several runs
  of the helper: each line says when, and which process, wrote it:
  ``2024-05-01 12:00:00,123 [4242] WARNING: ...``.

``NOISY_LOGGERS`` are the third-party libraries whose chatter (a retried request, a reconnect)
is logged at ERROR only. The command line lets it through at ``--log-level debug``; the helpers
never do, as their log is a file rotated only when a helper starts
(``coordinator.background.LOG_ROTATE_BYTES``), and one request-by-request trace of a whole
recovery would fill the disk PostgreSQL's pg_wal is on.

Standard library only.
"""

from __future__ import annotations

import logging
import sys

CLI_FORMAT = "cloud-dump: %(levelname)s: %(message)s"
HELPER_FORMAT = "%(asctime)s [%(process)d] %(levelname)s: %(message)s"

# Logged at ERROR only (see the module docstring). One list for every process: a library a
# process does not load costs nothing here (the WAL prefetcher reads the archive without the
# broker, so kombu, celery and amqp never log in it).
NOISY_LOGGERS = (
    "botocore",  # boto3's transport: every retried request, credential lookups
    "boto3",
    "urllib3",  # botocore's connection pool: "Connection pool is full", retries
    "kombu",  # Celery's transport: reconnects to Redis
    "celery",  # the client side of sending tasks and reading results
    "amqp",  # py-amqp, which kombu imports whatever the transport
)


def setup_cli_logging(level: str) -> None:
    """The command line's logging at ``level`` (``--log-level``): ``cloud-dump: <level>: ...``
    on stderr; the noisy libraries at ERROR unless ``level`` is ``debug``."""
    _install(_LowerLevelFormatter(CLI_FORMAT), level, quiet_libraries=level != "debug")


def setup_helper_logging(level: str) -> None:
    """A detached helper's logging at ``level``: timestamped lines with the process id on
    stderr (the helper's log file in the spool); the noisy libraries always at ERROR."""
    _install(logging.Formatter(HELPER_FORMAT), level, quiet_libraries=True)


def _install(formatter: logging.Formatter, level: str, *, quiet_libraries: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if quiet_libraries:
        for noisy in NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.ERROR)


class _LowerLevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.levelname = record.levelname.lower()
        return super().format(record)
