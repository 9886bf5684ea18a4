"""``workers.wal.push_wal`` called directly: the push race, and a name already taken.

Two workers may push the same WAL file at once (PostgreSQL retried an archive_command whose
answer was lost, or two coordinators archive one timeline). The archive must end with one
object per name: the same bytes again is "already archived", other bytes are a conflict that
leaves the stored object as it was. Storage is real (a directory, S3 on moto), and so is the
stage (Redis); the race is forced by holding both pushes after their first look at the archive,
until each has made it.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from devrig.moto import StorageTarget
from devrig.services import RedisServer
from devrig.walfiles import SEG1, SYSID_A, SYSID_B
from storage.base import PartBody, Storage, sha256_hex
from storage.errors import WalConflict
from storage.layout import Layout
from workers.staging import RedisStage, Stage
from workers.wal import (
    ARCHIVE_INFO_NAME,
    RAW_SHA256,
    SYSTEM_IDENTIFIER,
    PushWalRequest,
    PushWalResult,
    push_wal,
)

LAYOUT = Layout(cluster="main")
INFO_KEY = LAYOUT.wal_root + ARCHIVE_INFO_NAME
ZSTD_KEY = LAYOUT.wal_key(SEG1, "zstd", encrypted=False)
GZIP_KEY = LAYOUT.wal_key(SEG1, "gzip", encrypted=False)


class HeldStage:
    """A stage whose ``get`` holds each caller until ``parties`` callers are in it.

    ``push_wal`` reads the stage after it looked for the file in the archive and before it
    stores it: holding there makes every push look before any of them stores, the race.
    """

    def __init__(self, stage: Stage, parties: int) -> None:
        self._stage = stage
        self._barrier = threading.Barrier(parties, timeout=60)

    def put(self, ref: str, data: bytes, ttl_s: int) -> None:
        self._stage.put(ref, data, ttl_s)

    def get(self, ref: str) -> bytes:
        self._barrier.wait()
        return self._stage.get(ref)

    def open_part(self, ref: str, *, size: int, sha256: str, what: str) -> PartBody:
        return self._stage.open_part(ref, size=size, sha256=sha256, what=what)

    def delete(self, *refs: str) -> None:
        self._stage.delete(*refs)


@pytest.fixture
def redis_stage(redis_server: RedisServer) -> Iterator[RedisStage]:
    stage = RedisStage(redis_server.url)
    yield stage
    stage.close()


def staged_push(
    stage: Stage, key: str, raw: bytes, system_identifier: int = SYSID_A
) -> PushWalRequest:
    """Stage ``raw`` as the stored form (the worker does not look inside) and ask for its push."""
    ref = f"wal-{uuid.uuid4().hex}"
    stage.put(ref, raw, ttl_s=60)
    return PushWalRequest(
        key=key,
        file_name=SEG1,
        stored_size=len(raw),
        stored_sha256=sha256_hex(raw),
        raw_sha256=sha256_hex(raw),
        system_identifier=str(system_identifier),
        archive_info_key=INFO_KEY,
        ref=ref,
    )


def race(
    storage_target: StorageTarget, stage: Stage, requests: list[PushWalRequest]
) -> list[PushWalResult | BaseException]:
    """Push every request at once, each from its own thread and connection (as workers do)."""
    held = HeldStage(stage, len(requests))

    def push(request: PushWalRequest) -> PushWalResult | BaseException:
        store = storage_target.open()
        try:
            return push_wal(store, held, request)
        except Exception as exc:  # the outcome under test
            return exc
        finally:
            store.close()

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(push, requests, timeout=120))


def wal_objects(storage: Storage) -> list[str]:
    return sorted(i.key for i in storage.list(LAYOUT.wal_root) if i.key != INFO_KEY)


def test_two_pushes_of_the_same_file_at_once_one_stores_the_other_is_already_archived(
    storage_target: StorageTarget, storage: Storage, redis_stage: RedisStage
) -> None:
    raw = b"segment one" * 1000
    requests = [staged_push(redis_stage, ZSTD_KEY, raw) for _ in range(2)]

    outcomes = race(storage_target, redis_stage, requests)

    assert all(isinstance(o, PushWalResult) for o in outcomes), outcomes
    results = [o for o in outcomes if isinstance(o, PushWalResult)]
    assert sorted(r.status for r in results) == ["already-archived", "stored"]
    assert {r.key for r in results} == {ZSTD_KEY}
    assert wal_objects(storage) == [ZSTD_KEY]
    assert storage.get(ZSTD_KEY) == raw
    metadata = storage.head(ZSTD_KEY).metadata or {}
    assert metadata.get(RAW_SHA256) == sha256_hex(raw)
    assert metadata.get(SYSTEM_IDENTIFIER) == str(SYSID_A)


def test_two_pushes_of_different_bytes_under_one_name_at_once_one_wins_whole(
    storage_target: StorageTarget, storage: Storage, redis_stage: RedisStage
) -> None:
    contents = [b"timeline 2 history\n", b"timeline 2 history, other branch\n"]
    requests = [staged_push(redis_stage, ZSTD_KEY, raw) for raw in contents]

    outcomes = race(storage_target, redis_stage, requests)

    stored = [i for i, o in enumerate(outcomes) if isinstance(o, PushWalResult)]
    conflicts = [o for o in outcomes if isinstance(o, WalConflict)]
    assert len(stored) == 1 and len(conflicts) == 1, outcomes
    (winner,) = stored
    result = outcomes[winner]
    assert isinstance(result, PushWalResult) and result.status == "stored"
    assert "already archived with different content" in str(conflicts[0])
    assert wal_objects(storage) == [ZSTD_KEY]
    assert storage.get(ZSTD_KEY) == contents[winner]
    assert (storage.head(ZSTD_KEY).metadata or {}).get(RAW_SHA256) == sha256_hex(contents[winner])


@pytest.mark.parametrize("key", [ZSTD_KEY, GZIP_KEY], ids=["same-suffix", "other-suffix"])
def test_other_bytes_under_an_archived_name_are_a_conflict_and_change_nothing(
    storage: Storage, redis_stage: RedisStage, key: str
) -> None:
    first = push_wal(storage, redis_stage, staged_push(redis_stage, ZSTD_KEY, b"first"))
    assert first.status == "stored"
    before = (storage.get(ZSTD_KEY), storage.head(ZSTD_KEY).metadata)

    with pytest.raises(WalConflict, match=f"'{SEG1}' is already archived with different"):
        push_wal(storage, redis_stage, staged_push(redis_stage, key, b"second"))

    assert wal_objects(storage) == [ZSTD_KEY]
    assert (storage.get(ZSTD_KEY), storage.head(ZSTD_KEY).metadata) == before


def test_the_same_file_pushed_again_is_answered_from_the_archive_without_the_stage(
    storage: Storage, redis_stage: RedisStage
) -> None:
    raw = b"segment one"
    push_wal(storage, redis_stage, staged_push(redis_stage, ZSTD_KEY, raw))
    again = staged_push(redis_stage, GZIP_KEY, raw)
    # The stage was emptied (the coordinator gave up on the first answer): not needed.
    redis_stage.delete(again.ref)

    result = push_wal(storage, redis_stage, again)

    assert (result.status, result.key) == ("already-archived", ZSTD_KEY)
    assert wal_objects(storage) == [ZSTD_KEY]


def test_a_push_from_another_cluster_is_refused_before_anything_is_stored(
    storage: Storage, redis_stage: RedisStage
) -> None:
    push_wal(storage, redis_stage, staged_push(redis_stage, ZSTD_KEY, b"first"))
    other_key = LAYOUT.wal_key("000000010000000000000002", "zstd", encrypted=False)
    request = staged_push(redis_stage, other_key, b"second", SYSID_B).model_copy(
        update={"file_name": "000000010000000000000002"}
    )

    with pytest.raises(WalConflict, match=f"WAL of system {SYSID_B} cannot go into"):
        push_wal(storage, redis_stage, request)

    assert wal_objects(storage) == [ZSTD_KEY]
