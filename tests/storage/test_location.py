"""Where a storage URL points, as the coordinator computes it without opening the store, is
what the opened store reports (``Storage.url``): the two sides of a storage-location check."""

from __future__ import annotations

import pytest

from storage.errors import ConfigError, StorageMismatch
from storage.factory import open_storage
from storage.options import StorageOptions
from storage.urls import storage_url
from workers.location import require_location

SPELLINGS = [
    ("s3://bucket", "s3://bucket"),
    ("s3://bucket/", "s3://bucket"),
    ("s3://bucket/pg", "s3://bucket/pg"),
    ("s3://bucket/pg/", "s3://bucket/pg"),
    ("s3://bucket//pg/x/", "s3://bucket/pg/x"),
    ("file:///srv/store", "file:///srv/store"),
    ("file:///srv/store/", "file:///srv/store"),
    ("file:///srv//store", "file:///srv/store"),
    ("file://localhost/srv/store", "file:///srv/store"),
    ("file:///srv/my%20store", "file:///srv/my store"),
]


@pytest.mark.parametrize(("url", "location"), SPELLINGS)
def test_storage_url_is_what_the_opened_store_reports(url: str, location: str) -> None:
    # S3Storage builds its client lazily: opening it here contacts no endpoint.
    store = open_storage(url, StorageOptions(s3_endpoint="http://127.0.0.1:9"))
    assert storage_url(url) == store.url == location


@pytest.mark.parametrize("url", ["ftp://x/y", "s3:///prefix", "file://host/x", "file:relative"])
def test_storage_url_refuses_what_open_storage_refuses(url: str) -> None:
    with pytest.raises(ConfigError):
        storage_url(url)


def test_a_worker_refuses_a_request_for_another_location_naming_both() -> None:
    store = open_storage("s3://bucket/pg", StorageOptions(s3_endpoint="http://127.0.0.1:9"))
    require_location(store, None, "w1@host")
    require_location(store, "s3://bucket/pg/", "w1@host")  # same place, other spelling
    with pytest.raises(StorageMismatch) as refused:
        require_location(store, "s3://bucket/pg-typo", "w1@host")
    message = str(refused.value)
    assert "'s3://bucket/pg'" in message and "'s3://bucket/pg-typo'" in message
    assert "w1@host" in message
