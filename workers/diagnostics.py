"""Proving the path to storage: write, read back and delete a small object."""

from __future__ import annotations

import os
import time
import uuid

from pydantic import BaseModel

from storage.base import Storage, sha256_hex
from storage.errors import ChecksumMismatch
from workers.location import StorageBound

# Keys under this prefix cannot collide with backups: backup and cluster names start with a
# letter or digit.
PING_PREFIX = "_cloud_dump/ping/"
PING_SIZE_BYTES = 64 * 1024


class PingRequest(StorageBound):
    """The round trip asked of a worker; nothing but the location the sender expects."""


class PingResult(BaseModel):
    """What a storage round trip showed; small and JSON-able, so it can be a task result."""

    worker: str
    pid: int
    storage: str
    size_bytes: int
    elapsed_ms: float


def ping_storage(storage: Storage, worker: str) -> PingResult:
    """Write, read back and delete a random object; raise if any step fails or bytes differ."""
    started = time.monotonic()
    key = f"{PING_PREFIX}{uuid.uuid4().hex}"
    payload = os.urandom(PING_SIZE_BYTES)
    storage.put(key, payload, if_absent=True)
    try:
        echoed = storage.get(key)
    finally:
        storage.delete(key)
    if sha256_hex(echoed) != sha256_hex(payload):
        raise ChecksumMismatch(f"storage '{storage.url}' returned different bytes for '{key}'")
    return PingResult(
        worker=worker,
        pid=os.getpid(),
        storage=storage.url,
        size_bytes=len(payload),
        elapsed_ms=round((time.monotonic() - started) * 1000, 1),
    )
