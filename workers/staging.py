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

import threading
from typing import TYPE_CHECKING, Protocol, cast

from storage.errors import CloudDumpError
from workers.brokerfaults import broker_faults

if TYPE_CHECKING:
    from redis import Redis

STAGE_KEY_PREFIX = "cloud-dump:stage:"
_SLICE_BYTES = 4 * 1024 * 1024


class StagedPayloadMissing(CloudDumpError):
    """The staged payload is gone (expired, or its coordinator gave up and deleted it)."""


class Stage(Protocol):
    def put(self, ref: str, data: bytes, ttl_s: int) -> None: ...

    def get(self, ref: str) -> bytes: ...

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

    def delete(self, *refs: str) -> None:
        with self._lock:
            for ref in refs:
                self._payloads.pop(ref, None)


def redis_client(url: str, *, connect_timeout_s: float, read_timeout_s: float) -> Redis:
    """A redis-py client for ``url`` that says no more than it must when it connects.

    One retry, no backoff: enough to replace a connection a restarted Redis closed. No
    ``CLIENT SETINFO`` (library name and version) and no maintenance-notification handshake:
    redis-py sends each on every new connection, one round trip apiece, and the backup opens a
    connection per sending thread; with the broker 50 ms away they added a fifth of a second to
    each (bench/backup.py, broker 50 ms away).
    """
    import redis  # only the broker path needs it
    from redis.backoff import NoBackoff
    from redis.driver_info import DriverInfo
    from redis.maint_notifications import MaintNotificationsConfig
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=read_timeout_s,
        retry=Retry(NoBackoff(), 1),
        driver_info=DriverInfo(name=None, lib_version=None),
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
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
            self._client.set(STAGE_KEY_PREFIX + ref, data, ex=ttl_s)

    def get(self, ref: str) -> bytes:
        # In slices: redis-py's reader holds about three copies of one large reply, which put
        # a 48 MiB spike on each worker for a 16 MiB part (bench/backup).
        key = STAGE_KEY_PREFIX + ref
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

    def delete(self, *refs: str) -> None:
        if not refs:
            return
        with broker_faults(self.url):
            self._client.delete(*(STAGE_KEY_PREFIX + ref for ref in refs))

    def close(self) -> None:
        self._client.close()
