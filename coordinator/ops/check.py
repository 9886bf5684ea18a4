"""``cloud-dump check``: prove the paths a backup will use, before a backup needs them.

With ``--db-url``, also that ``archive_command`` gets WAL into the archive
(``coordinator.ops.archivecheck``): a forced WAL switch, and the wait for its segment.

Directly: write, read back and delete a small object in the store. Through the broker: find the
workers, make sure someone consumes each queue, and have every worker do the same storage round
trip, so a worker with wrong credentials shows up now rather than in the middle of the night.
Given both a storage and a broker, every worker must store in that storage (as a backup told
that storage would require, ``workers.location``): each one storing elsewhere is reported, and
the check fails (exit 3) naming both locations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from coordinator import pgconn
from coordinator.ops.archivecheck import check_archiving
from coordinator.settings import CheckSettings, Report, layout_of, open_store
from storage.base import Storage
from storage.errors import ConfigError, RemoteTaskFailed, StorageError, StorageMismatch
from storage.redact import redact_url
from storage.urls import storage_url
from workers.diagnostics import PingRequest, PingResult, ping_storage

log = logging.getLogger(__name__)


def check_storage(storage: Storage, report: Callable[[str], None]) -> PingResult:
    result = ping_storage(storage, "cli")
    report(
        f"storage {storage.url}: ok ({result.size_bytes // 1024} KiB round trip in "
        f"{result.elapsed_ms:.0f} ms)"
    )
    return result


def check_workers(
    broker_url: str,
    result_backend: str | None,
    timeout_s: float,
    report: Callable[[str], None],
    storage_url: str | None = None,
) -> list[PingResult]:
    """Every worker's round trip to its storage; ``storage_url`` (``storage.factory.storage_url``
    form): where each worker must be storing, None for anywhere."""
    from coordinator.broker import client as dispatch
    from coordinator.broker.flights import run_on_worker

    broker = dispatch.open_broker(broker_url, result_backend)
    try:
        report(f"broker {redact_url(broker_url)}: ok")
        workers = dispatch.live_workers(broker)
        dispatch.require_queue_consumers(workers)
        request = PingRequest(storage_url=storage_url).model_dump()
        results = []
        refused: list[StorageMismatch] = []
        for worker, queues in sorted(workers.items()):
            try:
                payload = run_on_worker(
                    broker, worker, "cloud_dump.ping_storage", timeout_s, request
                )
            except StorageMismatch as exc:
                # Every worker is asked, so that the report shows the whole fleet.
                report(f"worker {worker} (queues {','.join(queues)}): storage mismatch: {exc}")
                refused.append(exc)
                continue
            except (StorageError, ConfigError) as exc:
                # The worker's own view of its storage: say whose it is.
                raise RemoteTaskFailed(f"worker '{worker}': {exc}") from exc
            result = PingResult.model_validate(payload)
            report(
                f"worker {worker} (queues {','.join(queues)}): storage {result.storage} ok "
                f"in {result.elapsed_ms:.0f} ms"
            )
            results.append(result)
        if refused:
            raise StorageMismatch(
                f"{len(refused)} of {len(workers)} worker(s) store elsewhere: {refused[0]}"
            )
        return results
    finally:
        broker.close()


def run_check(args: CheckSettings, report: Report) -> None:
    """The storage round trip, the workers' (with a broker), then archiving (with a
    database): each reported as it passes; the first failure raised."""
    if not args.storage and not args.broker and not args.db_url:
        raise ConfigError("nothing to check: give --storage, --broker, --db-url or several")
    if args.db_url and not args.storage:
        raise ConfigError(
            "check --db-url needs --storage (and --cluster or --wal-prefix if archive_command "
            "uses them): where to look for the WAL it archives"
        )
    layout = layout_of(args)  # a WAL prefix with a cluster is refused before connecting
    if args.db_url and not args.db_url_from_environment and pgconn.has_password(args.db_url):
        log.warning("the password in --db-url is visible to every user in 'ps': prefer "
                    "PGPASSWORD, a .pgpass file or CLOUD_DUMP_DB_URL")
    if args.storage:
        storage = open_store(args)
        try:
            check_storage(storage, report)
            if args.db_url:
                # Before the workers: a broken archive_command is what an operator is most
                # likely running check for.
                check_archiving(args.db_url, storage, layout, args.timeout, report)
        finally:
            storage.close()
    if args.broker:
        location = storage_url(args.storage) if args.storage else None
        check_workers(args.broker, args.result_backend, args.timeout, report, location)
