"""Where part payloads wait between the coordinator and the worker that uploads them.

Task messages carry a reference, never the bytes (a 16 MiB payload inline in a Celery message
cost ~7x the round trip of passing a key, DESIGN.md §3). With a broker the stage is Redis: the
coordinator writes a payload with a TTL, a worker reads it, and the coordinator deletes it once
the upload is confirmed; the TTL only cleans up after a coordinator that died. Without a broker
the stage is a dictionary in the coordinator's process.

The coordinator owns a payload's life: a worker never deletes one, so a part that is
re-dispatched (its first worker looked dead) still finds its bytes. A Redis that restarts loses
every payload: the coordinator keeps each one until its task is answered, to stage it again
(``coordinator.broker.flights``), so its memory is bounded by the same window as Redis's.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, cast

from storage.base import PartBody
from storage.errors import ChecksumMismatch, CloudDumpError
from workers.brokerfaults import broker_faults

if TYPE_CHECKING:
    from redis import Redis

STAGE_KEY_PREFIX = "cloud-dump:stage:"
# A staged payload is read in slices this size (a part as it is uploaded, a WAL file whole):
# what a worker holds of it at a time, as redis-py keeps about three copies of a reply while it
# reads one. Measured on a 7 MiB payload (a prod WAL segment, zstd), CPU per read: 4 MiB
# slices 17 ms, 2 MiB 4.5, 1 MiB 4.1, 256 KiB 6.3 (redis-py's reply buffer grows by copying,
# and past ~2 MiB that dominates).
_SLICE_BYTES = 1024 * 1024
# What redis-py asks of the socket per read (its default, 64 KiB, cost 9.6 ms of CPU for the
# 7 MiB above against 4.1 ms: each read is a Python-level loop turn and a buffer append).
_SOCKET_READ_BYTES = 256 * 1024


def stage_key(ref: str) -> str:
    """The Redis key a payload staged under ``ref`` is stored at."""
    return STAGE_KEY_PREFIX + ref


class StagedPayloadMissing(CloudDumpError):
    """The staged payload is gone (expired, or its coordinator gave up and deleted it)."""


class Stage(Protocol):
    def put(self, ref: str, data: bytes, ttl_s: int) -> None: ...

    def get(self, ref: str) -> bytes: ...

    def open_part(self, ref: str, *, size: int, sha256: str, what: str) -> PartBody:
        """The staged part ``ref`` to upload, read as it is sent (``storage.base.PartBody``).

        ``size`` bytes whose hex SHA-256 is ``sha256``: other bytes raise
        ``ChecksumMismatch`` (naming ``what``) before the last of them is handed out, a
        payload that is gone ``StagedPayloadMissing``.
        """
        ...

    def delete(self, *refs: str) -> None: ...


class MemoryStage:
    """In-process stage for the embedded (no broker) mode."""

    def __init__(self) -> None:
        self._payloads: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, ref: str, data: bytes, ttl_s: int) -> None:
        with self._lock:
            self._payloads[ref] = data

    def get(self, ref: str) -> bytes:
        with self._lock:
            try:
                return self._payloads[ref]
            except KeyError:
                raise StagedPayloadMissing(f"staged payload '{ref}' is gone") from None

    def open_part(self, ref: str, *, size: int, sha256: str, what: str) -> PartBody:
        """The staged part, checked by its size alone when it is ``bytes``.

        Bytes staged here never left this process: the coordinator hashed this very object a
        moment ago (``coordinator.backup.parts.PartThread``) and ``bytes`` cannot change, so
        hashing it again could only catch a part staged under the wrong reference, which its
        size and the whole object's SHA-256 (checked by ``restore`` and ``verify`` as they read
        it) catch too. That pass cost a no-broker backup 0.3 CPU s per 280 MB stored, on the
        two cores the server's compression needs. A mutable payload is hashed.
        """
        data = self.get(ref)
        if len(data) != size or (
            not isinstance(data, bytes) and hashlib.sha256(data).hexdigest() != sha256.lower()
        ):
            raise ChecksumMismatch(f"{what} does not match its checksum")
        return _BytesBody(data, sha256.lower())

    def delete(self, *refs: str) -> None:
        with self._lock:
            for ref in refs:
                self._payloads.pop(ref, None)


def quiet_connection_kwargs() -> dict[str, Any]:
    """redis-py connection settings that send nothing on connect but what the URL asks for
    (``AUTH`` for a password, ``SELECT`` for a database other than 0).

    redis-py 8 otherwise opens every connection with ``HELLO 3``, ``CLIENT SETINFO`` (library
    name, then version) and a maintenance-notification handshake: four round trips before the
    first command. The backup opens a connection per sending thread and kombu one per
    producer; with the broker 50 ms away each took a fifth of a second more
    (bench/backup.py, broker 50 ms away). RESP2 is what redis-py spoke by default before 8.
    Also the settings of the broker's own connections (``tasks.redistransport``).
    """
    from redis.driver_info import DriverInfo
    from redis.maint_notifications import MaintNotificationsConfig

    return {
        "protocol": 2,
        "driver_info": DriverInfo(name=None, lib_version=None),
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
    }


def redis_client(url: str, *, connect_timeout_s: float, read_timeout_s: float) -> Redis:
    """A redis-py client for ``url`` that says no more than it must when it connects
    (``quiet_connection_kwargs``).

    One retry, no backoff: enough to replace a connection a restarted Redis closed.
    """
    import redis  # only the broker path needs it
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=read_timeout_s,
        socket_read_size=_SOCKET_READ_BYTES,
        retry=Retry(NoBackoff(), 1),
        **quiet_connection_kwargs(),
    )


class RedisStage:
    """Payloads in Redis under ``cloud-dump:stage:<ref>``, each with a TTL.

    Connection failures leave as ``BrokerUnreachable`` (``workers.brokerfaults``). A request is
    tried twice, without backoff: the second try opens a fresh connection, which is all a
    restarted Redis needs; a Redis that is down is reported at once, and the caller decides
    whether to wait for it.
    """

    def __init__(self, url: str) -> None:
        self._client = redis_client(url, connect_timeout_s=5, read_timeout_s=60)
        self.url = url

    def put(self, ref: str, data: bytes, ttl_s: int) -> None:
        with broker_faults(self.url):
            self._client.set(stage_key(ref), data, ex=ttl_s)

    def put_many(self, payloads: Mapping[str, bytes], ttl_s: int) -> None:
        """``put`` each of ``payloads`` (ref → bytes), in one round trip to Redis."""
        with broker_faults(self.url), self._client.pipeline(transaction=False) as pipe:
            for ref, data in payloads.items():
                pipe.set(stage_key(ref), data, ex=ttl_s)
            pipe.execute()

    def get(self, ref: str) -> bytes:
        # In slices: redis-py's reader holds about three copies of one large reply, which put
        # a 48 MiB spike on each worker for a 16 MiB part (bench/backup).
        key = stage_key(ref)
        with broker_faults(self.url):
            size = int(self._client.strlen(key))
            # Each slice is copied into one buffer as it arrives, so that the payload is held
            # once, not twice (a list of slices, then their join): 16 MiB less per worker.
            data = bytearray(size)
            filled = 0
            for start in range(0, size, _SLICE_BYTES):
                chunk = self._client.getrange(key, start, min(start + _SLICE_BYTES, size) - 1)
                if not isinstance(chunk, bytes) or len(chunk) != min(_SLICE_BYTES, size - start):
                    break
                data[start : start + len(chunk)] = chunk
                filled += len(chunk)
            # The key may have expired in between: a short read must not pass for the payload.
            exists = bool(self._client.exists(key))
        if not exists or filled != size:
            raise StagedPayloadMissing(f"staged payload '{ref}' is gone (expired or abandoned)")
        # A bytearray: what every consumer does with a payload (hash it, write it, hand it to
        # botocore as a body, compare it) takes one; bytes() would copy it again.
        return cast(bytes, data)

    def open_part(self, ref: str, *, size: int, sha256: str, what: str) -> PartBody:
        key = stage_key(ref)
        with broker_faults(self.url):
            staged = int(self._client.strlen(key))
        if staged == 0:
            raise StagedPayloadMissing(f"staged payload '{ref}' is gone (expired or abandoned)")
        if staged != size:
            raise ChecksumMismatch(f"{what} does not match its checksum ({staged} bytes staged)")
        return StagedPartBody(self._client, self.url, key, size, sha256.lower(), what)

    def delete(self, *refs: str) -> None:
        if not refs:
            return
        with broker_faults(self.url):
            self._client.delete(*(stage_key(ref) for ref in refs))

    def close(self) -> None:
        self._client.close()


class _BytesBody(io.BytesIO):
    """Bytes in memory as a ``PartBody`` (checked before it is made)."""

    failure: Exception | None = None

    def __init__(self, data: bytes, sha256: str) -> None:
        super().__init__(data)
        self._size = len(data)
        self.sha256 = sha256

    def __len__(self) -> int:
        return self._size


class StagedPartBody:
    """A part staged in Redis, read in ``_SLICE_BYTES`` slices as it is uploaded
    (``storage.base.PartBody``): a worker holds one slice of it, not the part.

    The bytes are hashed as they are handed out in order from the start; before the last of
    them goes out, the digest must be the part's, else ``ChecksumMismatch``. When they were not
    read in one pass from the start (a rewind in the middle), the last read checks the staged
    payload with a pass of its own first. A slice that comes back short means the payload
    expired or was deleted meanwhile: ``StagedPayloadMissing``.

    Once checked, later passes are not hashed again (over plain HTTP botocore reads the body
    once to sign it, then again to send it): the coordinator writes a payload once and never
    changes it, and a second pass that differed from the signed first would fail the store's
    signature check anyway.
    """

    def __init__(
        self, client: Redis, url: str, key: str, size: int, sha256: str, what: str
    ) -> None:
        self._client = client
        self._url = url
        self._key = key
        self._size = size
        self.sha256 = sha256
        self._what = what
        self._pos = 0
        self._digest = hashlib.sha256()
        self._hashed_to = 0  # bytes [0, _hashed_to) went into _digest, in order
        self._verified = False
        self._slice = b""
        self._slice_start = 0
        self.failure: Exception | None = None

    def __len__(self) -> int:
        return self._size

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET, /) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        if self._pos == 0 and not self._verified:
            self._digest = hashlib.sha256()  # a rewind: hash the next pass afresh
            self._hashed_to = 0
        return self._pos

    def read(self, size: int = -1, /) -> bytes:
        try:
            return self._read(size)
        except Exception as exc:
            self.failure = exc
            raise

    def _read(self, size: int) -> bytes:
        if self._pos >= self._size:
            return b""
        offset = self._pos - self._slice_start
        if not 0 <= offset < len(self._slice):
            self._slice_start = self._pos - self._pos % _SLICE_BYTES
            self._slice = self._fetch(self._slice_start)
            offset = self._pos - self._slice_start
        end = len(self._slice) if size < 0 else min(len(self._slice), offset + size)
        chunk = self._slice[offset:end]
        if not self._verified:
            if self._hashed_to == self._pos:
                self._digest.update(chunk)
                self._hashed_to += len(chunk)
            if self._pos + len(chunk) == self._size:
                self._verify()
        self._pos += len(chunk)
        return chunk

    def _verify(self) -> None:
        if self._hashed_to != self._size:
            digest = hashlib.sha256()
            for start in range(0, self._size, _SLICE_BYTES):
                digest.update(self._fetch(start))
        else:
            digest = self._digest
        if digest.hexdigest() != self.sha256:
            raise ChecksumMismatch(f"{self._what} does not match its checksum")
        self._verified = True

    def _fetch(self, start: int) -> bytes:
        want = min(_SLICE_BYTES, self._size - start)
        with broker_faults(self._url):
            data = self._client.getrange(self._key, start, start + want - 1)
        if not isinstance(data, bytes) or len(data) != want:
            raise StagedPayloadMissing(
                f"staged payload '{self._key.removeprefix(STAGE_KEY_PREFIX)}' is gone "
                "(expired or abandoned)"
            )
        return data
