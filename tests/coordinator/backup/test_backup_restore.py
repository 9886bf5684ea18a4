"""Round trips on real servers: back up through Celery workers, restore, start, compare rows.

Every case backs up a cluster holding data in two databases and an extra tablespace, restores
it into new directories (the tablespace remapped, since the source still uses its own), starts
the restored cluster and compares the content of every table.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from devrig import sample
from devrig.moto import StorageTarget
from devrig.postgres import PgFactory, majors
from devrig.roundtrip import backup_cli, restore_and_compare
from devrig.services import RedisServer, WorkerPool

MAJORS = majors()


@pytest.mark.parametrize("major", MAJORS)
def test_round_trip_through_workers_on_s3(
    major: int,
    pg_factory: PgFactory,
    s3_store: StorageTarget,
    redis_server: RedisServer,
    start_workers: Callable[..., WorkerPool],
) -> None:
    cluster = pg_factory(major)
    tablespace = sample.populate(cluster)
    expected = sample.digest(cluster.sql)
    start_workers(s3_store.env, count=2)
    backup_cli(cluster, s3_store, "rt", broker=redis_server)
    restore_and_compare(cluster, s3_store, "rt", tablespace, expected)
