"""``cloud-dump backup``: one run, from claiming the name to the manifest written last.

    claim name (sent while the command starts) → connect, IDENTIFY_SYSTEM, ask the WAL archive
    (answered while the server checkpoints and streams; passed before the first part is sent)
    → BASE_BACKUP → per archive: open upload (answered while it streams), ArchiveWriter
    (compress if the server did not, encrypt, cut parts) → PartWindow (stage + send) →
    drain → finalize (complete uploads, backup_manifest, wrapped key, manifest.json last)

Nothing is streamed before the claim is answered. What waits on a round trip to the broker
runs beside what does not: with the broker far away, one after the other cost the backup
seconds (bench/backup.py, broker 50 ms away).

Any failure, Ctrl-C or SIGTERM aborts the run: uploads aborted, objects removed, claim released,
staged payloads deleted, so nothing is left that looks like a backup.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from coordinator.backup.heartbeat import Heartbeat
from coordinator.backup.pipeline import ArchiveSummary, ArchiveWriter, PartSizer
from coordinator.backup.progress import Progress
from coordinator.backup.replication import (
    ArchiveInfo,
    BaseBackupOptions,
    BaseBackupResult,
    ReplicationConnection,
    SystemInfo,
)
from coordinator.backup.window import PartWindow
from coordinator.backup.work import BackupWork
from coordinator.codecs import DEFAULT_COMPRESSION, codec, compressed_by
from coordinator.crypto import encrypt_bytes, generate_identity, unwrap_identity, wrap_identity
from coordinator.toolversion import tool_version
from storage.base import Capabilities, sha256_hex
from storage.errors import CloudDumpError, DecryptionFailed, WalConflict
from storage.layout import DEFAULT_WAL_PREFIX, Layout
from storage.manifest import (
    ArchiveRecord,
    BackupManifest,
    EncryptionInfo,
    StoredObject,
    version_for,
)
from storage.walnames import parse_lsn, prev_segment_name, segment_name
from workers.backup import (
    WRAPPED_KEY_NAME,
    AbortRequest,
    ArchiveUpload,
    BackupRef,
    ClaimRequest,
    FinalizeRequest,
    UploadPartResult,
)
from workers.wal import ARCHIVE_INFO_NAME, OpenWalArchiveRequest

if TYPE_CHECKING:
    from coordinator.settings import Encryption

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# How long an abort waits for the uploads being opened, in all (their workers may be stopped).
OPENING_WAIT_S = 10.0


@dataclass(frozen=True)
class BackupKeys:
    """What one backup encrypts to; ``wrapped_identity`` and ``passphrase`` are set in
    passphrase mode (the passphrase only to check it against the WAL archive's key: it is never
    sent)."""

    recipients: list[str]
    wrapped_identity: bytes | None = None
    passphrase: str | None = field(default=None, repr=False)

    @classmethod
    def of(cls, chosen: Encryption) -> BackupKeys:
        """The operator's recipients, or with a passphrase a fresh identity of this backup's
        own, wrapped with it (one scrypt, ~1.7 s)."""
        if chosen.recipients:
            return cls(chosen.recipients)
        assert chosen.passphrase, "an Encryption has recipients or a passphrase"
        return cls.with_passphrase(chosen.passphrase)

    @classmethod
    def with_passphrase(cls, passphrase: str) -> BackupKeys:
        secret, public = generate_identity()
        return cls([public], wrap_identity(secret, passphrase), passphrase)


@dataclass(frozen=True)
class BackupPlan:
    name: str
    cluster: str | None
    dsn: str
    compression: str = DEFAULT_COMPRESSION
    compression_level: int | None = None
    encryption: BackupKeys | None = None
    # Where the cluster's WAL is archived (its passphrase is checked against the backup's).
    wal_prefix: str | None = None
    max_in_flight: int = 8
    part_timeout_s: float = 300.0
    target_part_bytes: int = 16 * 1024 * 1024
    show_progress: bool = False
    heartbeat_every_s: float = 60.0  # CLOUD_DUMP_HEARTBEAT_S
    allow_unchecked_tablespaces: bool = False


def _in_background(name: str, work: Callable[[], _T]) -> Future[_T]:
    """``work()`` on a daemon thread of its own: its result or error, once there is one."""
    outcome: Future[_T] = Future()

    def run() -> None:
        try:
            outcome.set_result(work())
        except BaseException as exc:
            outcome.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return outcome


@dataclass
class _Object:
    """One stored object of an archive, and the opening of its multipart upload."""

    key: str
    opening: Future[str]  # the upload's ID (``_Run.open_object``)

    @property
    def upload_id(self) -> str:
        """Waited for; raises the opening's error."""
        return self.opening.result()


@dataclass
class _Archive:
    info: ArchiveInfo
    key: str
    sizer: PartSizer
    objects: list[_Object]  # opened as their first part is due; the first at ``key``
    writer: ArchiveWriter | None = None  # None until it is made (which may fail)
    summary: ArchiveSummary | None = None


@dataclass
class _Run:
    """State of one run, written by the stream callbacks (``BackupSink``)."""

    plan: BackupPlan
    work: BackupWork
    capabilities: Capabilities
    window: PartWindow
    progress: Progress
    claim: str  # where the claim is stored, storage URL included
    stop_heartbeat: Callable[[], None] = lambda: None
    # Checks to pass before the first part is sent (the WAL archive's, sent ahead).
    before_first_part: Callable[[], None] | None = None
    archives: list[_Archive] = field(default_factory=list)
    backup_manifest: bytes | None = None
    stored_backup_manifest: bytes | None = None

    @property
    def layout(self) -> Layout:
        return Layout(cluster=self.plan.cluster)

    def begin_archive(self, archive: ArchiveInfo) -> None:
        plan = self.plan
        encrypted = plan.encryption is not None
        key = self.layout.archive_key(
            plan.name, archive.name, plan.compression, encrypted=encrypted
        )
        sizer = PartSizer(self.capabilities, target_part_bytes=plan.target_part_bytes)
        # The first object is opened while the archive streams, sent and answered on a thread
        # of its own: waited for when the first part is due, not before the first byte is read
        # (with the broker 50 ms away, that wait cost 100 ms of the server's stream per archive).
        # Listed before anything else can fail, so that an abort finds the upload.
        current = _Archive(archive, key, sizer, [self.open_object(key)])
        self.archives.append(current)
        client_compression = plan.compression if archive.compression == "none" else "none"

        def put_part(part_number: int, data: bytes, sha256: str) -> None:
            # The checks sent ahead are passed before the first part is sent, not before the
            # first byte is read: their answer and the upload's opening come back while the
            # archive streams (waiting for both, one after the other, before reading held the
            # server's stream for four round trips to the broker).
            self.check_before_first_part()
            index, within = sizer.object_of(part_number)
            if index == len(current.objects):  # the store's part limit: on in a new object
                current.objects.append(self.open_object(Layout.archive_object_key(key, index)))
            stored = current.objects[index]
            # Every part before this one in its object has the sizer's size (PartSizer).
            offset = (within - 1) * sizer.part_bytes
            self.window.submit(stored.key, stored.opening, within, data, sha256, offset)
            self.progress.stored(len(data))

        writer = ArchiveWriter(
            _CallbackSink(put_part),
            sizer,
            client_compression=client_compression,
            compression_level=plan.compression_level,
            recipients=plan.encryption.recipients if plan.encryption else None,
        )
        self.archives[-1].writer = writer
        self.progress.begin_archive(archive.name)

    def open_object(self, key: str) -> _Object:
        """Open the multipart upload of ``key``, answered on a thread of its own."""
        work = self.work
        return _Object(
            key,
            _in_background("open-upload", lambda: work.upload_id(work.start_open_archive(key))),
        )

    def check_before_first_part(self) -> None:
        """Pass the checks sent ahead (once), or raise what they found."""
        check, self.before_first_part = self.before_first_part, None
        if check is not None:
            check()

    def write(self, data: memoryview) -> None:
        writer = self.archives[-1].writer
        assert writer is not None, "begin_archive made it"
        writer.write(data)

    def end_archive(self) -> None:
        current = self.archives[-1]
        assert current.writer is not None, "begin_archive made it"
        current.summary = current.writer.close()

    def manifest(self, data: bytes) -> None:
        self.backup_manifest = data

    def set_progress(self, done_bytes: int, total_bytes: int | None) -> None:
        self.progress.streamed(done_bytes, total_bytes)


class _CallbackSink:
    """Adapts a function to the pipeline's ``PartSink``."""

    def __init__(self, put: Callable[[int, bytes, str], None]) -> None:
        self.put_part = put


class _StreamSink:
    """The ``BackupSink`` handed to the replication reader: forwards to the run."""

    def __init__(self, run: _Run) -> None:
        self.begin_archive = run.begin_archive
        self.write = run.write
        self.end_archive = run.end_archive
        self.manifest = run.manifest
        self.progress = run.set_progress


def run_backup(
    plan: BackupPlan, work: BackupWork, capabilities: Capabilities, claiming: ClaimRequest
) -> BackupManifest:
    """Take the backup described by ``plan``, under ``claiming`` (``work.new_claim``, perhaps
    sent ahead with ``BackupWork.send_claim``); return its manifest once it is stored."""
    check_wal_archive_passphrase(plan, work)
    backup, run_id = claiming.backup, claiming.run_id
    # Answered before anything else: a database that cannot be reached is looked at only once
    # the name is this run's, so that the run never waits on a claim it must then undo (with
    # no worker running, that wait is --task-timeout).
    claim = work.claim(claiming)
    heartbeat = Heartbeat(work, backup, run_id, plan.heartbeat_every_s)
    heartbeat.start()
    window = PartWindow(work, plan.max_in_flight, run_id=run_id)
    run = _Run(plan, work, capabilities, window, Progress(plan.show_progress), claim,
               heartbeat.stop)  # fmt: skip
    try:
        return _stream_and_finalize(run, backup, run_id)
    except BaseException as exc:
        # Includes KeyboardInterrupt and the SIGTERM the CLI turns into one.
        log.debug("backup failed, aborting: %r", exc)
        heartbeat.stop()
        if _abort(run, backup, run_id):
            # Stopped after finalize stored it (a Ctrl-C while its answer was on its way):
            # the backup is whole, and saying only "interrupted" would hide it.
            log.warning(
                "backup '%s' was stored whole before this run stopped: it is kept and "
                "listed ('cloud-dump delete --name %s' removes it)", plan.name, plan.name,
            )
        raise
    finally:
        heartbeat.stop()


def check_wal_archive_passphrase(plan: BackupPlan, work: BackupWork) -> None:
    """Refuse a passphrase that does not open the WAL archive's key (``DecryptionFailed``).

    A point-in-time restore of this backup reads the archive's WAL with the backup's
    passphrase: with another one it would stop at the first WAL file, long after the backup
    was taken. No archive, or one without a passphrase-wrapped key: nothing to check.
    """
    passphrase = plan.encryption.passphrase if plan.encryption else None
    if passphrase is None:
        return
    layout = Layout(cluster=plan.cluster, wal_prefix=plan.wal_prefix or DEFAULT_WAL_PREFIX)
    opened = work.open_wal_archive(
        OpenWalArchiveRequest(
            archive_info_key=layout.wal_root + ARCHIVE_INFO_NAME,
            system_identifier=None,
            want_wrapped_identity=True,
        )
    )
    archive = opened.archive
    if archive is None or archive.encryption is None or opened.wrapped_identity_b64 is None:
        return
    key = archive.encryption.wrapped_identity_key
    try:
        unwrap_identity(base64.b64decode(opened.wrapped_identity_b64), passphrase, key)
    except DecryptionFailed as exc:
        raise DecryptionFailed(
            f"the backup passphrase does not open the WAL archive's key '{key}': a "
            "point-in-time restore could not decrypt the WAL; back up with the archive's "
            "passphrase"
        ) from exc


def refuse_archive_ahead(plan: BackupPlan, work: BackupWork, system: SystemInfo) -> None:
    """Refuse (``WalConflict``, exit 17) a server whose own timeline is further along in the
    WAL archive than the server itself (``ArchiveAheadCheck``, asked and answered now)."""
    ArchiveAheadCheck(plan, work, system)()


class ArchiveAheadCheck:
    """Whether the WAL archive holds this server's timeline further along than the server
    itself: asked when made, answered when called (``WalConflict``, exit 17).

    A server's archive lags behind it, never leads. An archive holding later segments of this
    server's timeline was written by another server on the same timeline: a copy restored
    without a recovery target and started continues its source's timeline (same system
    identifier, same segment names). Its backup would land beside the source's, and a restore
    of it would replay the source's WAL under its own segments' names: a cluster that does not
    start. Nothing archived on that timeline, or no archive: nothing to compare.
    """

    def __init__(self, plan: BackupPlan, work: BackupWork, system: SystemInfo) -> None:
        self._system = system
        self._wal_root = Layout(
            cluster=plan.cluster, wal_prefix=plan.wal_prefix or DEFAULT_WAL_PREFIX
        ).wal_root
        request = OpenWalArchiveRequest(
            archive_info_key=self._wal_root + ARCHIVE_INFO_NAME,
            system_identifier=None,
            newest_on_timeline=system.timeline,
        )
        # Sent and answered on a thread: the caller goes on to start the base backup.
        self._answer = _in_background(
            "wal-archive", lambda: work.wal_archive(work.start_open_wal_archive(request))
        )

    def __call__(self) -> None:
        """Wait for the answer; raise ``WalConflict`` if the archive is ahead."""
        system = self._system
        opened = self._answer.result()
        if opened.archive is not None and (
            opened.archive.system_identifier != system.system_identifier
        ):
            return  # another cluster's archive: segment names say nothing of this server's WAL
        newest = opened.newest_segment
        here = segment_name(system.timeline, parse_lsn(system.xlogpos), system.wal_segment_size)
        if newest is not None and newest > here:
            raise WalConflict(
                f"the WAL archive '{self._wal_root}' holds timeline {system.timeline} up to "
                f"{newest}, beyond this server's position {system.xlogpos} (in {here}): another "
                f"server writes timeline {system.timeline} there (a copy restored without a "
                "recovery target and started?), and a restore of this backup would replay its "
                "WAL; back this server up under another --cluster or storage"
            )


def _stream_and_finalize(run: _Run, backup: BackupRef, run_id: str) -> BackupManifest:
    plan = run.plan
    started = _now()
    with ReplicationConnection.connect(plan.dsn) as conn:
        system = conn.identify_system()
        # Asked now, answered on its own thread while the server checkpoints and streams: the
        # first part waits for it (with the broker 50 ms away, asking first cost 100 ms).
        run.before_first_part = ArchiveAheadCheck(plan, run.work, system)
        result = conn.base_backup(
            BaseBackupOptions(
                label=f"cloud-dump {plan.name}",
                server_compression=plan.compression,
                compression_level=plan.compression_level,
                require_tablespace_check=not plan.allow_unchecked_tablespaces,
            ),
            _StreamSink(run),
        )
        run.check_before_first_part()  # passed by every backup, whatever it streamed
    # When the server's stream ended, not when the uploads drained: a restore refuses time
    # targets before end_time, and a late end_time would refuse targets the backup reaches.
    ended = _now()
    uploads = run.window.drain()
    if run.backup_manifest is None:
        raise CloudDumpError("the server sent no backup_manifest")
    manifest = _build_manifest(run, system, result, (started, ended), uploads)
    run.stop_heartbeat()  # none may land after finalize removed the claim
    _finalize(run, backup, run_id, manifest, uploads)
    run.progress.finish(manifest.stored_size, run.work.resent)
    return manifest


def _finalize(
    run: _Run,
    backup: BackupRef,
    run_id: str,
    manifest: BackupManifest,
    uploads: dict[str, list[UploadPartResult]],
) -> None:
    refs = {name: f"{run_id}:{name}" for name in ("backup_manifest", "manifest", "wrapped")}
    payloads = {
        refs["backup_manifest"]: _stored_backup_manifest(run),
        refs["manifest"]: manifest.to_json(),
    }
    wrapped = run.plan.encryption.wrapped_identity if run.plan.encryption else None
    if wrapped is not None:
        payloads[refs["wrapped"]] = wrapped
    run.work.finalize(
        FinalizeRequest(
            backup=backup,
            run_id=run_id,
            archives=[
                ArchiveUpload(key=o.key, upload_id=o.upload_id, parts=uploads.get(o.key, []))
                for a in run.archives
                for o in a.objects
            ],
            backup_manifest_key=manifest.backup_manifest_key,
            backup_manifest_ref=refs["backup_manifest"],
            wrapped_key_ref=refs["wrapped"] if wrapped is not None else None,
            manifest_ref=refs["manifest"],
        ),
        payloads,
    )


def _stored_backup_manifest(run: _Run) -> bytes:
    """backup_manifest as stored: encrypted once (age output is randomised, so the bytes the
    manifest describes must be the very bytes that are stored)."""
    if run.stored_backup_manifest is None:
        assert run.backup_manifest is not None
        encryption = run.plan.encryption
        run.stored_backup_manifest = (
            run.backup_manifest
            if encryption is None
            else encrypt_bytes(run.backup_manifest, encryption.recipients)
        )
    return run.stored_backup_manifest


def _build_manifest(
    run: _Run,
    system: SystemInfo,
    result: BaseBackupResult,
    times: tuple[datetime, datetime],
    uploads: dict[str, list[UploadPartResult]],
) -> BackupManifest:
    plan = run.plan
    encrypted = plan.encryption is not None
    stored_manifest = _stored_backup_manifest(run)
    layout = run.layout
    encryption = _encryption_info(run, layout) if encrypted else None
    archives = [_archive_record(a, plan, uploads) for a in run.archives]
    return BackupManifest(
        format_version=version_for(encryption, archives),
        name=plan.name,
        cluster=plan.cluster,
        tool_version=tool_version(),
        pg_version=system.server_version,
        pg_version_num=system.server_version_num,
        system_identifier=system.system_identifier,
        timeline=result.start_timeline,
        start_lsn=result.start_lsn,
        end_lsn=result.end_lsn,
        start_wal_file=segment_name(
            result.start_timeline, parse_lsn(result.start_lsn), system.wal_segment_size
        ),
        # The last byte needed is just before end_lsn (PostgreSQL's XLByteToPrevSeg): at a
        # segment boundary the backup ends in the previous segment.
        end_wal_file=prev_segment_name(
            result.end_timeline, parse_lsn(result.end_lsn), system.wal_segment_size
        ),
        start_time=times[0],
        end_time=times[1],
        compression=codec(plan.compression).name,
        compression_level=plan.compression_level,
        encryption=encryption,
        archives=archives,
        backup_manifest_key=layout.backup_manifest_key(plan.name, encrypted=encrypted),
        backup_manifest_size=len(stored_manifest),
        backup_manifest_sha256=sha256_hex(stored_manifest),
    )


def _archive_record(
    archive: _Archive, plan: BackupPlan, uploads: dict[str, list[UploadPartResult]]
) -> ArchiveRecord:
    summary = archive.summary
    assert summary is not None
    keys = [o.key for o in archive.objects]
    if len(keys) != len(summary.objects):
        raise CloudDumpError(f"'{archive.key}' opened {len(keys)} object(s) for "
                             f"{len(summary.objects)}")  # fmt: skip
    uploaded = {(key, p.part_number): p for key in keys for p in uploads.get(key, [])}
    for part in summary.parts:
        index, within = archive.sizer.object_of(part.number)
        confirmed = uploaded.get((keys[index], within))
        if confirmed is None or confirmed.sha256 != part.sha256 or confirmed.size != part.size:
            raise CloudDumpError(f"part {within} of '{keys[index]}' was not confirmed")
    objects = [
        StoredObject(key=key, size=o.size, sha256=o.sha256, parts=o.parts)
        for key, o in zip(keys, summary.objects, strict=True)
    ]
    return ArchiveRecord(
        name=archive.info.name,
        key=archive.key,
        tablespace_oid=archive.info.tablespace_oid,
        tablespace_location=archive.info.location,
        compression=codec(plan.compression).name,
        compressed_by=compressed_by(plan.compression, archive.info.compression),
        encrypted=plan.encryption is not None,
        stored_size=summary.stored_size,
        sha256=summary.sha256,
        parts=summary.parts,
        objects=objects if len(objects) > 1 else [],
    )


def _encryption_info(run: _Run, layout: Layout) -> EncryptionInfo:
    encryption = run.plan.encryption
    assert encryption is not None
    if encryption.wrapped_identity is not None:
        return EncryptionInfo(
            mode="passphrase",
            recipients=encryption.recipients,
            wrapped_identity_key=layout.backup_prefix(run.plan.name) + WRAPPED_KEY_NAME,
            # The very bytes finalize stores (``FinalizeRequest.wrapped_key_ref``).
            wrapped_identity_size=len(encryption.wrapped_identity),
            wrapped_identity_sha256=sha256_hex(encryption.wrapped_identity),
        )
    return EncryptionInfo(mode="recipients", recipients=encryption.recipients)


def _abort(run: _Run, backup: BackupRef, run_id: str) -> bool:
    """Best effort: undo what this run stored. A failure here must not hide the first one.
    True when the backup was found complete (and left so)."""
    run.window.abandon()  # first: releases a part thread waiting for room or for the broker
    for archive in run.archives:
        if archive.summary is None and archive.writer is not None:
            try:
                archive.writer.abort()
            except Exception:
                log.debug("aborting the archive writer failed", exc_info=True)
    try:
        return run.work.abort(
            AbortRequest(backup=backup, run_id=run_id, uploads=_opened_uploads(run))
        )
    except Exception as exc:
        log.warning(
            "could not clean up after the failed backup (%s): backup '%s' stays claimed "
            "until '%s' is deleted",
            exc,
            backup.name,
            run.claim,
        )
        return False


def _opened_uploads(run: _Run) -> list[ArchiveUpload]:
    """The uploads this run opened, each opening waited for, up to ``OPENING_WAIT_S`` in all:
    one answered after the abort ran would be left open. An opening a stopped worker holds is
    not waited for longer: the abort also aborts every upload it finds under the backup's
    name, and ``cleanup`` one opened after it."""
    uploads = []
    deadline = time.monotonic() + OPENING_WAIT_S
    for stored in (o for archive in run.archives for o in archive.objects):
        try:
            upload_id = stored.opening.result(timeout=max(0.0, deadline - time.monotonic()))
            uploads.append(ArchiveUpload(key=stored.key, upload_id=upload_id, parts=[]))
        except FutureTimeout:
            log.debug("the upload of '%s' was not answered in time", stored.key)
        except Exception as exc:  # never opened: nothing to abort
            log.debug("the upload of '%s' was not opened: %r", stored.key, exc)
    return uploads


def _now() -> datetime:
    return datetime.now(UTC)
