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
from typing import Protocol

from storage.errors import CloudDumpError
from workers.brokerfaults import broker_faults

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


class RedisStage:
    """Payloads in Redis under ``cloud-dump:stage:<ref>``, each with a TTL.

    Connection failures leave as ``BrokerUnreachable`` (``workers.brokerfaults``). A request is
    tried twice, without backoff: the second try opens a fresh connection, which is all a
    restarted Redis needs; a Redis that is down is reported at once, and the caller decides
    whether to wait for it.
    """

    def __init__(self, url: str) -> None:
        import redis  # only the broker path needs it
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._client = redis.Redis.from_url(
            url, socket_connect_timeout=5, socket_timeout=60, retry=Retry(NoBackoff(), 1)
        )
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
            chunks = [
                self._client.getrange(key, start, min(start + _SLICE_BYTES, size) - 1)
                for start in range(0, size, _SLICE_BYTES)
            ]
            # The key may have expired in between: a short read must not pass for the payload.
            exists = bool(self._client.exists(key))
        data = b"".join(c for c in chunks if isinstance(c, bytes))
        if not exists or len(data) != size:
            raise StagedPayloadMissing(f"staged payload '{ref}' is gone (expired or abandoned)")
        return data

    def delete(self, *refs: str) -> None:
        if not refs:
            return
        with broker_faults(self.url):
            self._client.delete(*(STAGE_KEY_PREFIX + ref for ref in refs))

    def close(self) -> None:
        self._client.close()
