"""What the coordinator's tests share: a local store in the test's directory, and the answer an
embedded runner gives a unit that is overdue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.base import Storage
from storage.errors import StorageUnreachable
from storage.factory import open_storage
from storage.urls import local_url


def overdue(what: str) -> BaseException:
    """``EmbeddedRunner``'s ``overdue``: the error of a unit not answered in time."""
    return StorageUnreachable(f"{what} overdue")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Storage]:
    """A local store under the test's directory."""
    (tmp_path / "store").mkdir()
    storage = open_storage(local_url(str(tmp_path / "store")))
    yield storage
    storage.close()
