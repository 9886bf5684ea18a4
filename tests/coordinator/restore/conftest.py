"""Fixtures shared by the restore tests of this package."""

from __future__ import annotations

import pytest

from devrig.postgres import PgFactory
from tests.coordinator.restore.rawbackup import RawBackup, make_raw_backup


@pytest.fixture(scope="session")
def raw_backup(pg_factory: PgFactory) -> RawBackup:
    """One staged pg_basebackup output for the session (see ``rawbackup.make_raw_backup``)."""
    return make_raw_backup(pg_factory)
