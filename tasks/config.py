"""Building a configured Celery app, for workers (``tasks.app``) and the coordinator alike.

Queues: ``parts`` (backup part uploads, finalisation, diagnostics) and ``wal`` (WAL pushes), so
that archiving never waits behind a large backup. Every worker also listens on its own direct
queue (``worker_direct``) so that ``cloud-dump check`` can test each worker's path to storage.
Tasks are acknowledged late and rejected when their worker dies, so a message is not lost with
a worker; the coordinator still re-dispatches overdue parts itself, because Redis redelivers an
unacknowledged message only after its visibility timeout (DESIGN.md §3, invariant 5).

Workers run Celery's threads pool (``worker_pool``): one process per worker.

Importing this module reads no environment: the coordinator builds its app from CLI flags.
"""

from __future__ import annotations

import ssl

from celery import Celery
from kombu.entity import Queue

from storage.errors import BackupExists, ObjectExists, UploadNotFound, WalConflict

PARTS_QUEUE = "parts"
WAL_QUEUE = "wal"
# kombu's Redis transport with fewer round trips per connection (tasks.redistransport), and
# its variant for the coordinator's commands.
QUIET_REDIS_TRANSPORT = "tasks.redistransport:Transport"
CLIENT_REDIS_TRANSPORT = "tasks.redistransport:ClientTransport"
TASK_MODULES = ["tasks.diagnostics", "tasks.backup", "tasks.wal", "tasks.verify"]
# Answers a task gives by raising, in normal operation: a name already taken, a WAL file
# already archived with other bytes, a create-if-absent that lost, an upload aborted under a
# late part. The command reports each (with its exit code); the worker logs it as one INFO
# line ("raised expected"), not as an ERROR with a traceback that would page someone.
# Celery's ``Task.throws``; every other exception stays an ERROR.
EXPECTED_REFUSALS: tuple[type[Exception], ...] = (
    BackupExists, ObjectExists, UploadNotFound, WalConflict,
)  # fmt: skip


def make_app(broker_url: str, result_backend: str | None = None, *, client: bool = False) -> Celery:
    """A Celery app talking to ``broker_url``; results go to the same Redis unless told.
    ``client``: the app of a command that sends tasks, not of a worker
    (``tasks.redistransport.ClientTransport`` for a ``redis://`` broker)."""
    app = Celery("cloud_dump", include=TASK_MODULES)
    app.conf.update(
        broker_url=broker_url,
        result_backend=result_backend or broker_url,
        # json only: task arguments are small models, and pickle would run code from the broker.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One task at a time per pool slot: a prefetched part would sit idle behind a slow one.
        worker_prefetch_multiplier=1,
        # Threads, not Celery's default prefork: a prefork worker is two interpreters (the
        # consumer and each pool child, ~70 MB each before any payload), and the work here is
        # uploads and downloads, hashing and (de)compression, which all release the GIL for
        # large buffers. Measured on bench-peers' `prod` backup: 2 workers went from
        # 2 x (70 + 136) MB to 2 x ~90 MB. ``--concurrency`` is the number of threads; a
        # worker started with ``-P`` gets that pool instead (Celery keeps this one for a
        # command line that names the default, prefork).
        worker_pool="threads",
        worker_direct=True,
        task_default_queue=PARTS_QUEUE,
        task_queues=(Queue(PARTS_QUEUE), Queue(WAL_QUEUE)),  # type: ignore[no-untyped-call]
        task_routes={
            "cloud_dump.push_wal": {"queue": WAL_QUEUE},
            "cloud_dump.open_wal_archive": {"queue": WAL_QUEUE},
        },
        task_track_started=True,
        result_expires=24 * 3600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Fail fast instead of retrying a dead broker forever inside a CLI call.
        broker_connection_timeout=5,
        redis_socket_connect_timeout=5,
        redis_socket_timeout=30,
        # The same bounds for the broker's own connections (kombu's Redis transport has none
        # by default): a broker host that vanishes without closing its sockets left a
        # coordinator's send blocked for good, and Ctrl-C waiting on it. Above kombu's 1 s
        # BRPOP timeout, so an idle worker's wait for tasks never trips it.
        broker_transport_options={"socket_timeout": 30, "socket_connect_timeout": 5},
    )
    broker_scheme = _scheme(broker_url)
    if broker_scheme == "redis":
        app.conf.broker_transport = CLIENT_REDIS_TRANSPORT if client else QUIET_REDIS_TRANSPORT
    # A rediss:// URL: verify the server's certificate against the system's CAs, or the file
    # SSL_CERT_FILE names (OpenSSL's own variable), and its name, as our redis-py clients do.
    # Without this kombu falls back to CERT_NONE (the broker's password then goes to whoever
    # answers), and Celery's result backend refuses to start at all.
    if broker_scheme == "rediss":
        app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if _scheme(result_backend or broker_url) == "rediss":
        app.conf.redis_backend_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return app


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower()
