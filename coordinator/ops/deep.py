"""``verify --deep``: the read-back of every archive and of the WAL the backups need, sent as
units of work (``workers.verify``) to the Celery workers with ``--broker``, else run in
``--parallel`` threads of this process (``coordinator.runner``).

One unit per archive, one per ``WAL_BATCH`` segments. Without a broker, the units decrypt with
this command's keys (``--identity-key``, ``--passphrase-file``, ``CLOUD_DUMP_PASSPHRASE``: the
keys restore takes); on workers, with the workers' own (``tasks.verify``): no key or passphrase
is ever in a task. Memory: without a broker at most ``--parallel`` units at once, sharing
``--parallel`` ranged reads of 64 MiB or more between them (``coordinator.rangedread``), plus
one WAL segment each; a worker holds one unit's.

What the units find goes into the backups' and the WAL archive's reports; a unit that fails
(the store unreachable after retries, no worker) fails the command with its error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.runner import WAIT_PAUSE_S, Handle, Runner
from coordinator.settings import VerifySettings, open_store, read_passphrase
from coordinator.wait import wait_until
from storage.manifest import ArchiveRecord, BackupManifest
from storage.walnames import Segment
from workers.verify import (
    ArchiveCheckRequest,
    ArchiveCheckResult,
    VerifyKeys,
    WalCheckRequest,
    WalCheckResult,
)

WAL_BATCH = 16  # segments per unit: 256 MiB of WAL at the default segment size
# A broker that goes away is waited for this long before the command fails (exit 6).
BROKER_GRACE_S = 60.0
STAGE_TTL_S = 3600


@dataclass
class DeepFindings:
    """What the units found, per backup (by name) and for the WAL."""

    backup_problems: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    file_bytes: dict[str, int] = field(default_factory=dict)
    bytes_read: dict[str, int] = field(default_factory=dict)
    wal_problems: list[str] = field(default_factory=list)
    wal_segments: int = 0
    wal_bytes: int = 0


def check_deep(
    args: VerifySettings,
    archives: list[tuple[BackupManifest, ArchiveRecord]],
    wal: dict[str, list[str]],
    wal_prefix: str,
) -> DeepFindings:
    """Read back ``archives`` and the segments ``wal`` lists (system identifier → names, in
    WAL order); the findings. Raises what a unit failed with."""
    runner, ranges = _open_runner(args, len(archives))
    findings = DeepFindings()
    try:
        handles: list[tuple[Handle, Callable[[Any], None]]] = []
        for manifest, archive in archives:
            request = _archive_request(manifest, archive, ranges)
            handle = runner.start("cloud_dump.verify_archive", request,
                                  f"the deep check of '{archive.key}'")  # fmt: skip
            handles.append((handle, _archive_taker(findings, manifest.name)))
        for system, names in wal.items():
            for batch in _batches(names, WAL_BATCH):
                segments = WalCheckRequest(cluster=args.cluster, wal_prefix=wal_prefix,
                                           segments=batch, system_identifier=system)  # fmt: skip
                handle = runner.start("cloud_dump.verify_wal", segments,
                                      f"the deep check of WAL {batch[0]}..{batch[-1]}")  # fmt: skip
                handles.append((handle, lambda answer: _take_wal(findings, answer)))
        try:
            for handle, take in handles:
                wait_until(handle.done, timeout_s=math.inf, first_s=WAIT_PAUSE_S)
                take(handle.result())
        finally:
            runner.release(h for h, _ in handles)
    finally:
        runner.close()
    return findings


def wal_to_read(needed: dict[int, dict[int, str]], present: dict[int, set[int]],
                segment_size: int) -> dict[str, list[str]]:  # fmt: skip
    """The archived segments among ``needed`` (timeline → number → system identifier), by
    system identifier, in WAL order."""
    found: dict[str, list[str]] = {}
    for timeline in sorted(needed):
        for number, system in sorted(needed[timeline].items()):
            if number in present.get(timeline, set()):
                found.setdefault(system, []).append(Segment(timeline, number).name(segment_size))
    return found


def _archive_taker(findings: DeepFindings, backup: str) -> Callable[[Any], None]:
    def take(answer: Any) -> None:
        result = ArchiveCheckResult.model_validate(answer)
        problems = findings.backup_problems.setdefault(backup, [])
        for problem in result.problems:
            text = f"backup '{backup}': {problem}"
            if text not in problems:  # backup_manifest's own problems come from every archive
                problems.append(text)
        findings.files[backup] = findings.files.get(backup, 0) + result.files
        findings.file_bytes[backup] = findings.file_bytes.get(backup, 0) + result.bytes_checked
        findings.bytes_read[backup] = findings.bytes_read.get(backup, 0) + result.bytes_read

    return take


def _take_wal(findings: DeepFindings, answer: Any) -> None:
    result = WalCheckResult.model_validate(answer)
    findings.wal_problems += result.problems
    findings.wal_segments += result.segments
    findings.wal_bytes += result.bytes_read


def _archive_request(
    manifest: BackupManifest, archive: ArchiveRecord, ranges: int
) -> ArchiveCheckRequest:
    encryption = manifest.encryption
    return ArchiveCheckRequest(
        backup=manifest.name, key=archive.key, stored_size=archive.stored_size,
        sha256=archive.sha256, part_size=archive.largest_part, objects=archive.objects,
        compression=archive.compression, encrypted=archive.encrypted,
        tablespace_oid=archive.tablespace_oid,
        tablespace_oids=[a.tablespace_oid for a in manifest.archives
                         if a.tablespace_oid is not None],
        backup_manifest_key=manifest.backup_manifest_key,
        backup_manifest_size=manifest.backup_manifest_size,
        backup_manifest_sha256=manifest.backup_manifest_sha256,
        encryption_mode=encryption.mode if encryption else None,
        wrapped_identity_key=encryption.wrapped_identity_key if encryption else None,
        wrapped_identity_size=encryption.wrapped_identity_size if encryption else None,
        wrapped_identity_sha256=encryption.wrapped_identity_sha256 if encryption else None,
        ranges_in_flight=ranges,
    )  # fmt: skip


def _open_runner(args: VerifySettings, archives: int) -> tuple[Runner, int]:
    """The runner, and the ranged reads each archive unit may keep in flight."""
    if args.broker:
        from coordinator.broker.client import open_broker
        from coordinator.broker.flights import CeleryRunner
        from storage.urls import storage_url
        from tasks.config import PARTS_QUEUE

        location = storage_url(args.storage) if args.storage else None
        broker = open_broker(args.broker, args.result_backend, args.staging_url)
        # Never sent again for taking long: an archive of many GiB takes minutes; a unit lost
        # with its worker is sent again by the flights' own watch (coordinator.broker.flights).
        runner: Runner = CeleryRunner(broker, PARTS_QUEUE, storage_url=location,
                                      grace_s=BROKER_GRACE_S, payload_ttl_s=STAGE_TTL_S,
                                      resend_after_s=math.inf)  # fmt: skip
        return runner, args.parallel  # each worker's own memory
    from coordinator.runner import EmbeddedRunner
    from storage.errors import StorageUnreachable
    from workers.verify import units

    keys = VerifyKeys(
        [Path(p) for p in args.identity_key], lambda: read_passphrase(args), "verify",
        "verify --deep decrypts with the keys restore takes",
    )  # fmt: skip
    storage = open_store(args)

    def overdue(what: str) -> BaseException:  # no deadline: only for the runner's protocol
        return StorageUnreachable(f"storage {storage.url} did not answer {what}")

    runner = EmbeddedRunner(storage, units(keys), threads=args.parallel, overdue=overdue)
    return runner, max(1, args.parallel // max(1, min(args.parallel, archives)))


def _batches(names: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(names), size):
        yield names[start:start + size]
