"""``Storage.delete_many`` on both backends: any number of keys (S3 sends at most 1,000 a
DeleteObjects request), missing keys deleted already, and a key the store refused named in the
error, never reported as success."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.stub import Stubber

from devrig.moto import S3_PREFIX, StorageTarget, local_target
from storage.base import Storage
from storage.errors import PermanentStorageError, StorageUnreachable
from storage.s3 import DELETE_BATCH_KEYS

# More than one DeleteObjects request takes.
MANY = DELETE_BATCH_KEYS + 7


def put_all(storage: Storage, keys: list[str]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: storage.put(key, key.encode()), keys))


def stored(storage: Storage, prefix: str = "") -> set[str]:
    return {info.key for info in storage.list(prefix)}


def test_delete_many_removes_more_keys_than_one_request_takes(storage: Storage) -> None:
    doomed = [f"wal_archive/{n:024X}.zst" for n in range(MANY)]
    kept = ["wal_archive/00000002.history.zst", "b1/manifest.json"]
    put_all(storage, doomed + kept)

    storage.delete_many(doomed)

    assert stored(storage) == set(kept)


def test_delete_many_takes_missing_and_repeated_keys_as_deleted(storage: Storage) -> None:
    storage.put("b1/base.tar.zst", b"archive")
    storage.put("b1/manifest.json", b"{}")

    storage.delete_many(["b1/base.tar.zst", "never/existed", "b1/base.tar.zst"])
    storage.delete_many([])

    assert stored(storage) == {"b1/manifest.json"}


def test_delete_many_checks_every_key_before_deleting_any(storage: Storage) -> None:
    storage.put("a/one", b"1")

    with pytest.raises(ValueError, match=r"invalid storage key '\.\./escape'"):
        storage.delete_many(["a/one", "../escape"])

    assert stored(storage) == {"a/one"}


def test_local_delete_many_leaves_no_empty_directory_behind(tmp_path: Path) -> None:
    storage = local_target(tmp_path / "store").open()
    put_all(storage, ["b9/x/one", "b9/two", "keep/three", "keep/four"])

    storage.delete_many(["b9/x/one", "b9/two", "keep/three"])

    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["keep"]
    assert [p.name for p in (tmp_path / "store" / "keep").iterdir()] == ["four"]


def test_local_delete_many_in_a_missing_store_is_the_stores_error(tmp_path: Path) -> None:
    storage = local_target(tmp_path / "absent", create=False).open()

    with pytest.raises(PermanentStorageError, match=r"directory '.*/absent' does not exist"):
        storage.delete_many(["a/one"])


def test_s3_key_the_store_refuses_is_named_and_the_others_are_deleted(
    s3_store: StorageTarget, moto_admin_client: Any
) -> None:
    """A real per-key failure: moto applies the bucket policy to each key of DeleteObjects and
    answers 200 with an AccessDenied entry for the denied one."""
    storage = s3_store.open()
    keys = [f"wal_archive/{n:024X}" for n in range(5)]
    denied = keys[3]
    put_all(storage, keys)
    bucket = s3_store.url.removeprefix("s3://").split("/")[0]
    moto_admin_client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:DeleteObject",
                       "Resource": f"arn:aws:s3:::{bucket}/{S3_PREFIX}/{denied}"}],
    }))  # fmt: skip

    with pytest.raises(PermanentStorageError) as caught:
        storage.delete_many(keys)

    assert str(caught.value) == (f"could not delete 1 of {len(keys)} object(s), the first "
                                 f"'{denied}': AccessDenied (access denied)")  # fmt: skip
    assert stored(storage) == {denied}
    storage.close()


def test_s3_keys_failing_for_a_while_are_sent_again_and_then_named(
    s3_store: StorageTarget,
) -> None:
    """Stubbed: no real server answers DeleteObjects with a per-key InternalError on demand.
    The keys such an answer lists are sent again (only those); still failing after the request
    budget (2 attempts here), they are a StorageUnreachable naming the first."""
    storage = s3_store.open()
    client = storage._client()  # type: ignore[attr-defined]  # the stub needs the very client
    bucket = s3_store.url.removeprefix("s3://").split("/")[0]
    full = [f"{S3_PREFIX}/k{n}" for n in range(3)]

    def answer(keys: list[str], failing: list[str]) -> None:
        stub.add_response(
            "delete_objects",
            {"Errors": [{"Key": k, "Code": "InternalError", "Message": "x"} for k in failing]},
            {"Bucket": bucket, "Delete": {"Objects": [{"Key": k} for k in keys], "Quiet": True}},
        )

    with Stubber(client) as stub:
        answer(full, failing=full[1:])
        answer(full[1:], failing=[])
        storage.delete_many(["k0", "k1", "k2"])
        stub.assert_no_pending_responses()

        answer(full, failing=[full[2]])
        answer([full[2]], failing=[full[2]])
        with pytest.raises(StorageUnreachable) as caught:
            storage.delete_many(["k0", "k1", "k2"])
        stub.assert_no_pending_responses()
    assert str(caught.value).endswith(
        "kept failing: could not delete 1 of 3 object(s), the first 'k2': InternalError"
    )
    storage.close()
