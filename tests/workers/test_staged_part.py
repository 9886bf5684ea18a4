"""A staged part read from Redis in slices as it is uploaded (``workers.staging.StagedPartBody``).

Real Redis, and both backends (a local directory, and moto, which does not check the SHA-256
sent with a part: the body's own check is all that keeps wrong bytes out of it).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator

import pytest

from devrig.services import RedisServer
from storage.base import MiB, PartBody, Storage, UploadedPart, sha256_hex
from storage.errors import ChecksumMismatch
from workers.backup import UploadPartRequest, upload_part
from workers.staging import STAGE_KEY_PREFIX, RedisStage, StagedPayloadMissing

# Not a whole number of slices (1 MiB): the last slice is short.
SIZE = 5 * MiB + 300_001
KEY = "b1/base.tar"


def payload(seed: int, size: int = SIZE) -> bytes:
    return hashlib.shake_256(str(seed).encode()).digest(size)


@pytest.fixture
def stage(redis_server: RedisServer) -> Iterator[RedisStage]:
    redis_stage = RedisStage(redis_server.url)
    yield redis_stage
    redis_stage.close()


def staged(stage: RedisStage, ref: str, data: bytes, upload_id: str) -> UploadPartRequest:
    stage.put(ref, data, ttl_s=60)
    return UploadPartRequest(
        key=KEY, upload_id=upload_id, part_number=1, size=len(data), sha256=sha256_hex(data),
        ref=ref,
    )  # fmt: skip


def flip_byte(stage: RedisStage, ref: str, offset: int) -> None:
    """Change one staged byte, as a payload changed after it was hashed would be."""
    client = stage._client
    key = STAGE_KEY_PREFIX + ref
    old = client.getrange(key, offset, offset)
    assert isinstance(old, bytes)
    client.setrange(key, offset, bytes([old[0] ^ 0x01]))


def test_a_part_streamed_from_redis_is_stored_byte_for_byte(
    storage: Storage, stage: RedisStage
) -> None:
    data = payload(1)
    upload_id = storage.create_multipart(KEY)
    result = upload_part(storage, stage, staged(stage, "r1", data, upload_id))
    assert (result.size, result.sha256) == (SIZE, sha256_hex(data))
    part = UploadedPart(result.part_number, result.etag, result.size, result.sha256)
    storage.complete_multipart(KEY, upload_id, [part])
    assert storage.get(KEY) == data


@pytest.mark.parametrize("offset", [0, 2 * MiB + 17, SIZE - 1], ids=["first", "middle", "last"])
def test_bytes_changed_after_hashing_never_reach_the_store(
    storage: Storage, stage: RedisStage, offset: int
) -> None:
    data = payload(2)
    upload_id = storage.create_multipart(KEY)
    request = staged(stage, "r2", data, upload_id)
    flip_byte(stage, "r2", offset)
    with pytest.raises(ChecksumMismatch, match=r"staged part 1 of 'b1/base\.tar'"):
        upload_part(storage, stage, request)
    # The body broke off before its last byte: the store holds no part of the upload.
    assert storage.uploaded_bytes(KEY, upload_id) == 0
    storage.abort_multipart(KEY, upload_id)


def test_a_staged_part_of_another_size_is_refused_before_anything_is_sent(
    stage: RedisStage,
) -> None:
    data = payload(3)
    stage.put("r3", data[:-1], ttl_s=60)
    with pytest.raises(ChecksumMismatch, match=rf"\({SIZE - 1} bytes staged\)"):
        stage.open_part("r3", size=SIZE, sha256=sha256_hex(data), what="part")
    with pytest.raises(StagedPayloadMissing):
        stage.open_part("never-staged", size=SIZE, sha256=sha256_hex(data), what="part")


def read_all(body: PartBody, chunk: int) -> bytes:
    out = bytearray()
    while piece := body.read(chunk):
        out += piece
    return bytes(out)


def test_rewinds_and_jumps_still_hand_out_checked_bytes(stage: RedisStage) -> None:
    data = payload(4)
    stage.put("r4", data, ttl_s=60)
    body = stage.open_part("r4", size=SIZE, sha256=sha256_hex(data), what="part")
    assert len(body) == SIZE
    # A first pass cut short, then a rewind (botocore resending), then all of it.
    assert body.read(1000) == data[:1000]
    assert body.seek(0) == 0
    assert read_all(body, 64 * 1024) == data
    # Once checked, read again from anywhere (botocore signs a payload, then sends it).
    assert body.seek(-10, io.SEEK_END) == SIZE - 10
    assert body.read() == data[-10:]

    # Bytes not read in one pass from the start are checked by a pass of its own.
    jumped = stage.open_part("r4", size=SIZE, sha256=sha256_hex(data), what="part")
    jumped.seek(3 * MiB)
    assert read_all(jumped, 1 * MiB) == data[3 * MiB :]
    flip_byte(stage, "r4", 10)  # before where reading started
    jumped_bad = stage.open_part("r4", size=SIZE, sha256=sha256_hex(data), what="part")
    jumped_bad.seek(3 * MiB)
    with pytest.raises(ChecksumMismatch):
        read_all(jumped_bad, 1 * MiB)
    assert jumped_bad.tell() < SIZE  # the last bytes were not handed out


def test_a_payload_deleted_while_it_is_read_is_missing(stage: RedisStage) -> None:
    data = payload(5)
    stage.put("r5", data, ttl_s=60)
    body = stage.open_part("r5", size=SIZE, sha256=sha256_hex(data), what="part")
    assert body.read(MiB) == data[:MiB]
    stage.delete("r5")
    with pytest.raises(StagedPayloadMissing, match="'r5' is gone"):
        body.read(MiB)
