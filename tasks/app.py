"""The Celery application workers run: ``celery -A tasks.app worker -Q parts,wal``.

Settings are read from the ``CLOUD_DUMP_*`` environment once, when the worker imports this
module. The worker process builds its storage client on first use (once, under a lock: the
pool's threads share it; boto3 clients are thread-safe), and again after a fork, should a pool
that forks be chosen (``-P prefork``): boto3 clients must not cross a fork.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import replace

from celery.signals import task_postrun, task_prerun

from coordinator.malloc import release_free_memory, tune_malloc
from options.seed import storj_location
from storage.base import Storage
from storage.errors import ConfigError
from storage.factory import open_storage
from storage.options import StorageOptions
from storage.redact import redact_url
from tasks.config import make_app
from tasks.settings import WorkerSettings
from workers.location import require_location
from workers.staging import RedisStage

log = logging.getLogger(__name__)


class WorkerStorage:
    """The storage of this worker process, built lazily and rebuilt after a fork.

    ``get(expected)`` refuses work meant for another storage (``workers.location``).
    """

    def __init__(self, worker_settings: WorkerSettings) -> None:
        self._settings = worker_settings
        self._storage: Storage | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def get(self, expected: str | None = None) -> Storage:
        """This process's storage; ``StorageMismatch`` when ``expected`` (the location a
        request carries) is somewhere else."""
        storage = self._open()
        if expected is not None:
            require_location(storage, expected, _worker_name())
        return storage

    def _open(self) -> Storage:
        with self._lock:
            return self._open_locked()

    def _open_locked(self) -> Storage:
        if self._storage is None or self._pid != os.getpid():
            settings = self._settings
            url, endpoint, problem = storj_location(
                settings.storage, settings.storj_bucket, settings.s3_endpoint)
            if problem is not None:
                raise ConfigError(f"worker: {problem}")
            if not url:
                raise ConfigError(
                    "worker has no storage: set CLOUD_DUMP_STORAGE (s3://... or file:///...)"
                )
            options = StorageOptions.from_settings(settings)
            self._storage = open_storage(url, replace(options, s3_endpoint=endpoint))
            self._pid = os.getpid()
            log.info("worker process %d uses storage %s", self._pid, self._storage.url)
        return self._storage


def _worker_name() -> str:
    """The Celery node name running the current task (``w1@host``), for messages."""
    from celery import current_task

    hostname = getattr(getattr(current_task, "request", None), "hostname", None)
    return str(hostname or socket.gethostname())


class WorkerStage:
    """The Redis stage of this worker process, built lazily and rebuilt after a fork."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._stage: RedisStage | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def get(self) -> RedisStage:
        with self._lock:
            if self._stage is None or self._pid != os.getpid():
                self._stage = RedisStage(self._url)
                self._pid = os.getpid()
            return self._stage


# Large buffers come and go on the pool's threads (1 MiB slices of staged parts, whole WAL
# files): reused from one task to the next, not mapped afresh each time (coordinator.malloc).
tune_malloc(arenas=1)


# WAL pushes come one after another and reuse the heap's free memory for the next file (the
# point of tune_malloc's thresholds); once none has come for IDLE_RELEASE_S, it is given back.
# Every other task -- a backup's parts above all -- starts and ends with the free heap given
# back: a backup's memory is then its own, not what WAL pushes before it left. One arena
# (tune_malloc(arenas=1)): malloc_trim gives back the top of the main arena's heap, not of a
# thread's arena, where the pool thread's buffers would otherwise stay (20 MB after a burst
# of prod WAL pushes, measured).
_REUSES_HEAP = frozenset({"cloud_dump.push_wal"})
IDLE_RELEASE_S = 1.0
_idle_release: threading.Timer | None = None
_idle_lock = threading.Lock()


def _cancel_idle_release() -> None:
    global _idle_release
    with _idle_lock:
        if _idle_release is not None:
            _idle_release.cancel()
            _idle_release = None


def _release_when_idle() -> None:
    global _idle_release
    with _idle_lock:
        if _idle_release is not None:
            _idle_release.cancel()
        _idle_release = threading.Timer(IDLE_RELEASE_S, release_free_memory)
        _idle_release.daemon = True
        _idle_release.start()


@task_prerun.connect  # type: ignore[untyped-decorator]
def _before_task(sender: object = None, **_: object) -> None:
    _cancel_idle_release()
    if getattr(sender, "name", None) not in _REUSES_HEAP:
        release_free_memory()


@task_postrun.connect  # type: ignore[untyped-decorator]
def _after_task(sender: object = None, **_: object) -> None:
    if getattr(sender, "name", None) in _REUSES_HEAP:
        _release_when_idle()
    else:
        release_free_memory()


settings = WorkerSettings()
app = make_app(settings.broker_url, settings.result_backend)
worker_storage = WorkerStorage(settings)
worker_stage = WorkerStage(settings.staging_url or settings.broker_url)
log.info("cloud-dump worker app: broker %s", redact_url(settings.broker_url))
