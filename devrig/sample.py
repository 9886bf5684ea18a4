"""Sample data for round trips: two databases, a table in an extra tablespace, and a digest of
every table's content so a restored cluster can be compared row for row, not by counts.

``big_source`` (module) is a cluster holding enough of it that a backup in 5 MiB parts is made
of many parts and takes a moment, with its tablespace directory and digest; the tests of a
module share it and only read it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from devrig.postgres import PgCluster, PgFactory, make_postgres_dir

TABLES = {
    "app1": ["items", "in_tablespace"],
    "app2": ["users"],
}

Sql = Callable[..., list[tuple[object, ...]]]
BigSource = tuple[PgCluster, Path, dict[str, str]]  # the cluster, its tablespace, its digest


def populate(cluster: PgCluster, rows: int = 2000) -> Path:
    """Create the sample databases; return the extra tablespace's directory."""
    location = make_postgres_dir("cloud-dump-ts-")
    cluster.sql(f"CREATE TABLESPACE ts LOCATION '{location}'")
    cluster.sql("CREATE DATABASE app1")
    cluster.sql("CREATE DATABASE app2")
    cluster.sql(
        "CREATE TABLE items AS SELECT g AS id, md5(g::text) AS name, now() AS at "
        f"FROM generate_series(1, {rows}) g",
        dbname="app1",
    )
    cluster.sql(
        "CREATE TABLE in_tablespace TABLESPACE ts AS SELECT g AS id, repeat('x', g % 50) AS pad "
        f"FROM generate_series(1, {rows}) g",
        dbname="app1",
    )
    cluster.sql(
        "CREATE TABLE users AS SELECT g AS id, 'user' || g AS login "
        f"FROM generate_series(1, {rows // 2}) g",
        dbname="app2",
    )
    return location


def digest(sql: Sql) -> dict[str, str]:
    """md5 of every sample table's rows in id order, keyed "db.table"."""
    result = {}
    for db, tables in TABLES.items():
        for table in tables:
            rows = sql(
                f"SELECT count(*), md5(string_agg(t::text, '|' ORDER BY t.id)) FROM {table} t",
                dbname=db,
            )
            result[f"{db}.{table}"] = f"{rows[0][0]}:{rows[0][1]}"
    return result


def make_big_source(pg_factory: PgFactory) -> BigSource:
    """A new cluster with enough data that a backup is made of many parts and takes a moment."""
    cluster = pg_factory(15)
    tablespace = populate(cluster, rows=200_000)
    return cluster, tablespace, digest(cluster.sql)


@pytest.fixture(scope="module")
def big_source(pg_factory: PgFactory) -> BigSource:
    return make_big_source(pg_factory)
