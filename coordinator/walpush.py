"""``cloud-dump wal-push %p %f``: archive one WAL file, and exit 0 only once storage has it.

What one call does (PostgreSQL runs it once per WAL file, one at a time, and retries on failure):

1. Validate the name; if the spool has a confirmation marker for it, return at once. This is
   the path most calls take under load (see 4), so nothing heavy is imported before it.
2. Read the file and its cluster's system identifier (from the segment's long page header, or
   from ``global/pg_control`` for ``.history``/``.backup`` files), check it against the cached
   archive identity, compress (zstd level 3 by default: ~5-10x on WAL at a few hundred MB/s,
   so a 16 MiB segment costs tens of milliseconds) and optionally encrypt.
3. Stage the bytes and send ``cloud_dump.push_wal`` to the ``wal`` queue (or, without a
   broker, run the same function in this process), then wait for the result. A push not
   confirmed within ``CLOUD_DUMP_WAL_RETRY_S`` (default 15 s) is sent again: a worker killed
   mid-task takes its message with it (DESIGN.md §3, invariant 5), and ``push_wal`` is
   idempotent. Nothing short of a confirmation, within ``--timeout``, returns success.
4. Look-ahead: up to ``--look-ahead`` segments already marked ``.ready`` after this one are
   pushed in the same batch, so the workers upload in parallel while PostgreSQL still calls
   us one file at a time; their later calls find a marker. Only this call's own file decides
   the exit status: a failed look-ahead push is a warning, its own call will retry it.

Encryption: ``--recipient-key`` encrypts to those public keys. With a passphrase, the archive
gets its own X25519 identity, stored passphrase-wrapped beside the WAL by the first encrypted
push (``workers.wal``); every later push encrypts to its public key, read from the spool's
cached archive identity, so the ~1.7 s scrypt cost is paid once per spool, not per segment.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from coordinator.walspool import (
    Spool,
    archive_location,
    default_spool_dir,
    ready_names,
    select_look_ahead,
)

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

    from storage import Storage
    from storage.layout import Layout
    from workers.staging import MemoryStage, RedisStage
    from workers.wal import (
        OpenWalArchiveRequest,
        OpenWalArchiveResult,
        PushWalRequest,
        PushWalResult,
        WalArchiveInfo,
    )

    Outcome = PushWalResult | BaseException

log = logging.getLogger(__name__)

RETRY_ENV = "CLOUD_DUMP_WAL_RETRY_S"
# Safety net only: wal-push deletes its staged payloads once the batch is answered.
STAGE_TTL_S = 3600
EMBEDDED_THREADS = 4
DEFAULT_RETRY_S = 15.0
ZSTD_LEVEL = 3
GZIP_LEVEL = 6

# XLogLongPageHeaderData (access/xlog_internal.h): the 24-byte short header (magic, info, tli,
# pageaddr, rem_len + padding), then the system identifier, segment size and block size.
_XLP_LONG_HEADER = 0x0002
_LONG_HEADER_BYTES = 40


class RawWal(NamedTuple):
    """A WAL file as read from pg_wal."""

    file_name: str
    data: bytes
    raw_sha256: str
    system_identifier: str | None


class Encryption(NamedTuple):
    recipients: list[str] | None
    passphrase: str | None


def run_wal_push(args: argparse.Namespace) -> None:
    """Archive ``args.file_name`` from ``args.path``; return only once storage confirmed it."""
    spool = Spool(Path(args.spool_dir) if args.spool_dir else default_spool_dir(args.path))
    location = archive_location(args.storage, args.cluster, args.wal_prefix)
    name = args.file_name
    # Markers exist only for valid names, so this check needs no validation (and no import).
    if "/" not in name and name not in ("", ".", "..") and spool.is_confirmed(name, location):
        log.debug("WAL file '%s' is already archived (spool marker)", name)
        return
    from storage.walnames import wal_kind

    wal_kind(name)  # refuse a bad name before it touches a path or a key
    _push(args, spool, location)


def _push(args: argparse.Namespace, spool: Spool, location: str) -> None:
    from storage.layout import DEFAULT_WAL_PREFIX, Layout

    layout = Layout(cluster=args.cluster, wal_prefix=args.wal_prefix or DEFAULT_WAL_PREFIX)
    encryption = _encryption_of(args)
    deadline = time.monotonic() + args.timeout
    own = read_wal(Path(args.path), args.file_name)
    wal_dir = Path(args.path).parent
    look_ahead = select_look_ahead(
        args.file_name,
        ready_names(wal_dir / "archive_status"),
        args.look_ahead,
        lambda name: spool.is_confirmed(name, location),
    )
    runner = _open_runner(args)
    try:
        archive = _archive_for(runner, spool, location, layout, own, encryption)
        recipients = _recipients(encryption, archive)
        batch = [own, *_read_look_ahead(wal_dir, look_ahead)]
        requests = [encode_wal(runner, raw, args.compression, recipients, layout) for raw in batch]
        outcomes = runner.push(requests, own.file_name, deadline)
        runner.delete_staged(*(r.ref for r in requests))
    finally:
        runner.close()
    _record(spool, location, batch, outcomes, archive)
    outcome = outcomes[own.file_name]
    if isinstance(outcome, BaseException):
        raise outcome
    log.info(
        "WAL file '%s' %s at '%s'",
        own.file_name,
        "archived" if outcome.status == "stored" else "was already archived",
        outcome.key,
    )
    _prune(spool, wal_dir)


def read_wal(path: Path, file_name: str) -> RawWal:
    """The file and the system identifier of the cluster that wrote it."""
    import hashlib

    from storage.errors import IntegrityError
    from storage.walnames import wal_kind

    kind = wal_kind(file_name)
    data = path.read_bytes()
    if kind in ("segment", "partial"):
        system_identifier: str | None = str(segment_system_identifier(data, file_name))
    else:
        # .history and .backup files have no page header: ask the data directory.
        system_identifier = _pg_control_system_identifier(path)
        if not data:
            raise IntegrityError(f"WAL file '{file_name}' is empty")
    return RawWal(file_name, data, hashlib.sha256(data).hexdigest(), system_identifier)


def segment_system_identifier(data: bytes, file_name: str) -> int:
    """``xlp_sysid`` of the segment's first page; ``IntegrityError`` if it is not a segment."""
    import struct

    from storage.errors import IntegrityError

    if len(data) < _LONG_HEADER_BYTES:
        raise IntegrityError(f"WAL file '{file_name}' is too short ({len(data)} bytes)")
    # Little-endian: the byte order of the server that wrote it, x86 and arm64 alike.
    info = struct.unpack_from("<H", data, 2)[0]
    sysid, seg_size = struct.unpack_from("<QI", data, 24)
    if not info & _XLP_LONG_HEADER or sysid == 0:
        raise IntegrityError(f"WAL file '{file_name}' does not start with a WAL page header")
    if len(data) != seg_size:
        raise IntegrityError(
            f"WAL file '{file_name}' is {len(data)} bytes but its header says {seg_size}"
        )
    return int(sysid)


def _pg_control_system_identifier(wal_path: Path) -> str | None:
    """The first field of ``global/pg_control``: of the data directory holding ``pg_wal``, or
    of the working directory (archive_command runs in PGDATA); None if neither is readable."""
    # absolute() is lexical: a pg_wal symlinked to another disk still leads back to PGDATA.
    data_dir = wal_path.absolute().parent.parent
    for candidate in (data_dir / "global" / "pg_control", Path("global/pg_control")):
        try:
            with candidate.open("rb") as f:
                head = f.read(8)
        except OSError:
            continue
        if len(head) == 8:
            return str(int.from_bytes(head, "little"))
    return None


def encode_wal(
    runner: WalRunner, raw: RawWal, compression: str, recipients: list[str] | None, layout: Layout
) -> PushWalRequest:
    """Compress and encrypt ``raw``, stage the result, and describe it for ``push_wal``."""
    import hashlib
    import uuid

    from workers.wal import ARCHIVE_INFO_NAME, PushWalRequest

    payload = compress(raw.data, compression)
    if recipients:
        from coordinator.crypto import encrypt_bytes

        payload = encrypt_bytes(payload, recipients)
    request = PushWalRequest(
        key=layout.wal_key(raw.file_name, compression, encrypted=bool(recipients)),
        file_name=raw.file_name,
        stored_size=len(payload),
        stored_sha256=hashlib.sha256(payload).hexdigest(),
        raw_sha256=raw.raw_sha256,
        system_identifier=raw.system_identifier,
        archive_info_key=layout.wal_root + ARCHIVE_INFO_NAME,
        ref=f"wal-{raw.file_name}-{uuid.uuid4().hex}",
    )
    runner.stage_payload(request.ref, payload)
    return request


def compress(data: bytes, compression: str) -> bytes:
    """One frame/member, readable by ``zstd -d``, ``gzip -d`` or ``lz4 -d``."""
    if compression == "zstd":
        import zstandard

        return bytes(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data))
    if compression == "gzip":
        import gzip

        return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)
    if compression == "lz4":
        import lz4.frame

        return bytes(lz4.frame.compress(data))
    if compression == "none":
        return data
    from storage.layout import compression_suffix

    compression_suffix(compression)  # raises ConfigError naming the valid choices
    raise AssertionError("unreachable")


def _encryption_of(args: argparse.Namespace) -> Encryption:
    from pathlib import Path

    from coordinator.commands import read_passphrase
    from storage.errors import ConfigError

    passphrase = read_passphrase(args)
    if args.recipient_key and passphrase:
        raise ConfigError("give either --recipient-key or a passphrase, not both")
    if args.recipient_key:
        from coordinator.crypto import read_recipients

        return Encryption(read_recipients([Path(p) for p in args.recipient_key]), None)
    if passphrase:
        return Encryption(None, passphrase)
    if args.encrypt:
        raise ConfigError("--encrypt needs --recipient-key FILE or --passphrase-file FILE")
    return Encryption(None, None)


def _recipients(encryption: Encryption, archive: WalArchiveInfo | None) -> list[str] | None:
    if encryption.recipients:
        return encryption.recipients
    if encryption.passphrase:
        assert archive is not None and archive.encryption is not None  # set up by _archive_for
        return [archive.encryption.recipient]
    return None


def _archive_for(
    runner: WalRunner,
    spool: Spool,
    location: str,
    layout: Layout,
    own: RawWal,
    encryption: Encryption,
) -> WalArchiveInfo | None:
    """The archive's identity: from the spool's cache, else (passphrase mode) from storage."""
    from storage.errors import WalConflict
    from workers.wal import WalArchiveInfo

    cached = spool.read_archive_cache(location)
    archive = WalArchiveInfo.model_validate_json(cached) if cached else None
    sysid = own.system_identifier
    if archive is not None and sysid is not None and archive.system_identifier != sysid:
        raise WalConflict(
            f"WAL of system {sysid} cannot go into the archive of system "
            f"{archive.system_identifier} at '{layout.wal_root}'"
        )
    if encryption.passphrase and (archive is None or archive.encryption is None):
        archive = _open_passphrase_archive(runner, layout, sysid, encryption.passphrase)
        spool.write_archive_cache(location, archive.model_dump_json())
    return archive


def _read_look_ahead(wal_dir: Path, names: list[str]) -> list[RawWal]:
    from storage.errors import CloudDumpError

    batch = []
    for name in names:
        try:
            batch.append(read_wal(wal_dir / name, name))
        except (CloudDumpError, OSError) as exc:
            log.warning("not pushing '%s' ahead: %s", name, exc)
    return batch


def _open_runner(args: argparse.Namespace) -> WalRunner:
    from storage.errors import ConfigError

    try:
        retry_s = float(os.environ.get(RETRY_ENV) or DEFAULT_RETRY_S)
    except ValueError:
        raise ConfigError(f"environment variable {RETRY_ENV} is not a number") from None
    if args.broker:
        return CeleryWalRunner.connect(args.broker, args.result_backend, args.staging_url, retry_s)
    from coordinator.commands import open_store

    return EmbeddedWalRunner(open_store(args))


def _record(
    spool: Spool,
    location: str,
    batch: list[RawWal],
    outcomes: dict[str, PushWalResult | BaseException],
    archive: WalArchiveInfo | None,
) -> None:
    """Markers for every confirmed file; the archive identity, if not cached yet."""
    for raw in batch:
        outcome = outcomes[raw.file_name]
        if isinstance(outcome, BaseException):
            if raw is not batch[0]:
                log.warning(
                    "look-ahead push of '%s' failed (its own call will retry): %s",
                    raw.file_name,
                    outcome,
                )
            continue
        spool.confirm(raw.file_name, raw.raw_sha256, location)
        if archive is None and outcome.archive is not None:
            archive = outcome.archive
            spool.write_archive_cache(location, archive.model_dump_json())


def _prune(spool: Spool, wal_dir: Path) -> None:
    """Drop markers of files no longer in pg_wal: PostgreSQL will not ask for them again."""
    try:
        present = {entry.name for entry in wal_dir.iterdir()}
    except OSError:
        return
    spool.prune(lambda name: name in present)


def _open_passphrase_archive(
    runner: WalRunner, layout: Layout, sysid: str | None, passphrase: str
) -> WalArchiveInfo:
    """The archive with passphrase encryption set up, and proof that ``passphrase`` opens it.

    Costs one scrypt (~1.7 s): wrapping a new identity, or unwrapping the archive's to check
    it. Encrypting WAL to a key the operator's passphrase cannot open would make the archive
    useless, so a mismatch fails the push instead.
    """
    import base64
    import uuid

    from coordinator.crypto import generate_identity, wrap_identity
    from workers.wal import ARCHIVE_INFO_NAME, ARCHIVE_KEY_NAME, OpenWalArchiveRequest

    request = OpenWalArchiveRequest(
        archive_info_key=layout.wal_root + ARCHIVE_INFO_NAME,
        system_identifier=sysid,
        want_wrapped_identity=True,
    )
    result = runner.open_archive(request)
    if result.archive is None or result.archive.encryption is None:
        identity, recipient = generate_identity()
        ref = f"wal-key-{uuid.uuid4().hex}"
        runner.stage_payload(ref, wrap_identity(identity, passphrase))
        try:
            result = runner.open_archive(
                request.model_copy(
                    update={
                        "recipient": recipient,
                        "wrapped_identity_key": layout.wal_root + ARCHIVE_KEY_NAME,
                        "wrapped_identity_ref": ref,
                    }
                )
            )
        finally:
            runner.delete_staged(ref)
        assert result.archive is not None and result.archive.encryption is not None
        if result.archive.encryption.recipient == recipient:
            return result.archive
    assert result.archive is not None and result.archive.encryption is not None
    if result.wrapped_identity_b64 is None:
        raise AssertionError("open_wal_archive returned no wrapped identity")
    _check_passphrase(
        base64.b64decode(result.wrapped_identity_b64),
        passphrase,
        result.archive.encryption.recipient,
        result.archive.encryption.wrapped_identity_key,
    )
    return result.archive


def _check_passphrase(wrapped: bytes, passphrase: str, recipient: str, key: str) -> None:
    from coordinator.crypto import decrypt_bytes, encrypt_bytes, unwrap_identity
    from storage.errors import DecryptionFailed

    try:
        identity = unwrap_identity(wrapped, passphrase)
        decrypt_bytes(encrypt_bytes(b"probe", [recipient]), [identity], f"'{key}'")
    except DecryptionFailed as exc:
        raise DecryptionFailed(
            f"the passphrase does not open the WAL archive's key '{key}': not pushing WAL "
            "that could not be decrypted"
        ) from exc


class WalRunner:
    """Where ``push_wal`` runs; the two implementations below."""

    def stage_payload(self, ref: str, data: bytes) -> None:
        raise NotImplementedError

    def delete_staged(self, *refs: str) -> None:
        raise NotImplementedError

    def open_archive(self, request: OpenWalArchiveRequest) -> OpenWalArchiveResult:
        raise NotImplementedError

    def push(
        self, requests: list[PushWalRequest], own_name: str, deadline: float
    ) -> dict[str, Outcome]:
        """Each file's result, or the error that stopped it; never raises for one file."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class EmbeddedWalRunner(WalRunner):
    """No broker: the worker functions run in threads of this process."""

    def __init__(self, storage: Storage) -> None:
        from workers.staging import MemoryStage

        self._storage = storage
        self._stage: MemoryStage = MemoryStage()

    def stage_payload(self, ref: str, data: bytes) -> None:
        self._stage.put(ref, data, STAGE_TTL_S)

    def delete_staged(self, *refs: str) -> None:
        self._stage.delete(*refs)

    def open_archive(self, request: OpenWalArchiveRequest) -> OpenWalArchiveResult:
        from workers.wal import open_wal_archive

        return open_wal_archive(self._storage, self._stage, request)

    def push(
        self, requests: list[PushWalRequest], own_name: str, deadline: float
    ) -> dict[str, Outcome]:
        import concurrent.futures

        from workers.wal import push_wal

        threads = min(EMBEDDED_THREADS, len(requests))
        with concurrent.futures.ThreadPoolExecutor(threads, "wal-push") as pool:
            futures = {
                r.file_name: pool.submit(push_wal, self._storage, self._stage, r) for r in requests
            }
            outcomes: dict[str, Outcome] = {}
            for name, future in futures.items():
                error = future.exception()
                outcomes[name] = error if error is not None else future.result()
        return outcomes

    def close(self) -> None:
        self._storage.close()


class CeleryWalRunner(WalRunner):
    """Sends ``push_wal`` to the ``wal`` queue, payloads through the Redis stage, and re-sends
    a push whose answer is overdue (its worker may have died with the message)."""

    def __init__(self, app: Celery, stage: RedisStage, retry_s: float) -> None:
        self._app = app
        self._stage = stage
        self._retry_s = retry_s

    @classmethod
    def connect(
        cls, broker: str, result_backend: str | None, staging_url: str | None, retry_s: float
    ) -> CeleryWalRunner:
        from coordinator.dispatch import connect_broker
        from workers.staging import RedisStage

        app = connect_broker(broker, result_backend)
        return cls(app, RedisStage(staging_url or broker), retry_s)

    def stage_payload(self, ref: str, data: bytes) -> None:
        self._stage.put(ref, data, STAGE_TTL_S)

    def delete_staged(self, *refs: str) -> None:
        from storage.errors import BrokerUnreachable

        try:
            self._stage.delete(*refs)
        except BrokerUnreachable as exc:  # the TTL removes them later
            log.warning("staged WAL payloads left to expire: %s", exc)

    def open_archive(self, request: OpenWalArchiveRequest) -> OpenWalArchiveResult:
        from workers.wal import OpenWalArchiveResult

        deadline = time.monotonic() + self._retry_s * 4
        outcome = self._await_one("cloud_dump.open_wal_archive", request.model_dump(), deadline)
        if isinstance(outcome, BaseException):
            raise outcome
        return OpenWalArchiveResult.model_validate(outcome)

    def push(
        self, requests: list[PushWalRequest], own_name: str, deadline: float
    ) -> dict[str, Outcome]:
        from workers.wal import PushWalResult

        sent = {
            r.file_name: (r.model_dump(), [self._send("cloud_dump.push_wal", r.model_dump())])
            for r in requests
        }
        last_sent = dict.fromkeys(sent, time.monotonic())
        outcomes: dict[str, Outcome] = {}
        pause_s = 0.005
        while len(outcomes) < len(sent):
            now = time.monotonic()
            for name, (payload, results) in sent.items():
                if name in outcomes:
                    continue
                done = next((r for r in results if self._ready(r)), None)
                if done is not None:
                    answer = self._answer(done, f"'cloud_dump.push_wal' of '{name}'")
                    outcomes[name] = (
                        answer
                        if isinstance(answer, BaseException)
                        else PushWalResult.model_validate(answer)
                    )
                    if name == own_name:
                        # Look-ahead pushes get one more retry period, not the whole timeout.
                        deadline = min(deadline, now + self._retry_s)
                elif now >= deadline:
                    outcomes[name] = self._overdue(name, deadline)
                elif now - last_sent[name] >= self._retry_s:
                    log.warning(
                        "no answer for WAL file '%s' after %.0f s: sending it again",
                        name,
                        now - last_sent[name],
                    )
                    results.append(self._send("cloud_dump.push_wal", payload))
                    last_sent[name] = now
            time.sleep(pause_s)
            pause_s = min(pause_s * 2, 0.05)
        for _, results in sent.values():
            for result in results:
                self._forget(result)
        return outcomes

    def _await_one(self, task: str, payload: object, deadline: float) -> object:
        results = [self._send(task, payload)]
        last_sent = time.monotonic()
        while not (done := next((r for r in results if self._ready(r)), None)):
            now = time.monotonic()
            if now >= deadline:
                return self._overdue(task, deadline)
            if now - last_sent >= self._retry_s:
                results.append(self._send(task, payload))
                last_sent = now
            time.sleep(0.01)
        answer = self._answer(done, f"'{task}'")
        for result in results:
            self._forget(result)
        return answer

    def _overdue(self, what: str, deadline: float) -> BaseException:
        from coordinator.dispatch import START_WORKER_HINT
        from storage.errors import NoWorkerAvailable

        return NoWorkerAvailable(f"no worker confirmed '{what}' in time: {START_WORKER_HINT}")

    def _send(self, task: str, payload: object) -> AsyncResult:
        from tasks.config import WAL_QUEUE

        with self._broker_errors():
            return self._app.send_task(task, args=[payload], queue=WAL_QUEUE)

    def _ready(self, result: AsyncResult) -> bool:
        with self._broker_errors():
            return bool(result.ready())

    def _answer(self, result: AsyncResult, what: str) -> object:
        """The task's return value, or its error as a project error (not raised)."""
        from storage.errors import CloudDumpError, RemoteTaskFailed

        try:
            with self._broker_errors():
                return result.get(timeout=10, propagate=True)
        except CloudDumpError as exc:  # Celery re-created the worker's own error
            return exc
        except Exception as exc:
            return RemoteTaskFailed(f"{what} failed on a worker: {exc}")

    def _forget(self, result: AsyncResult) -> None:
        import contextlib

        with contextlib.suppress(Exception):  # results expire anyway
            result.forget()

    def _broker_errors(self) -> _BrokerErrors:
        return _BrokerErrors()

    def close(self) -> None:
        self._stage.close()


class _BrokerErrors:
    """Translate kombu/redis connection failures into ``BrokerUnreachable``."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        from kombu.exceptions import OperationalError
        from redis import RedisError

        from storage.errors import BrokerUnreachable

        if isinstance(exc, OperationalError | RedisError | OSError):
            raise BrokerUnreachable(f"broker stopped answering: {exc}") from exc
