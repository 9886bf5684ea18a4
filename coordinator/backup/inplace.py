"""In-place tablespaces on PostgreSQL 13 to 15: refused, since BASE_BACKUP loses them.

With ``allow_in_place_tablespaces`` (a developer setting a superuser may turn on per session),
``CREATE TABLESPACE ... LOCATION ''`` makes a tablespace that is a directory ``pg_tblspc/<oid>``
inside PGDATA rather than a link. PostgreSQL 16 sends it as an archive of its own, recorded at
the relative location ``pg_tblspc/<oid>``; 13, 14 and 15 (measured: 13.23, 14.23, 15.18) leave
it out of the tablespace list and skip ``pg_tblspc``'s content, so the backup completes, verifies
against its own backup_manifest, and restores a cluster whose tables there cannot be read.

The replication protocol cannot list tablespaces, so ``find_in_place_tablespaces`` asks over an
ordinary connection made with the same parameters (``pg_tablespace_location`` answers a relative
path for an in-place one). pg_hba.conf may admit the role for replication only: then it returns
None and the caller warns that it could not look.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import make_conninfo

from coordinator.pgconn import message, ordinary_params, redact

SENT_SINCE = 160000  # PostgreSQL 16 backs in-place tablespaces up
# 1663 and 1664 are pg_default and pg_global, whose location is '' (PGDATA itself).
_QUERY = (
    b"SELECT spcname, pg_tablespace_location(oid) FROM pg_tablespace "
    b"WHERE oid NOT IN (1663, 1664) AND pg_tablespace_location(oid) NOT LIKE '/%' "
    b"ORDER BY oid"
)


@dataclass(frozen=True)
class InPlaceTablespace:
    name: str
    location: str  # pg_tblspc/<oid>, relative to PGDATA


def find_in_place_tablespaces(
    params: Mapping[str, str],
) -> tuple[list[InPlaceTablespace], None] | tuple[None, str]:
    """(the in-place tablespaces, None), or (None, why they could not be listed)."""
    try:
        with psycopg.connect(make_conninfo("", **ordinary_params(params)), autocommit=True) as conn:
            rows = conn.execute(_QUERY).fetchall()
    except psycopg.Error as exc:
        return None, redact(message(exc), params.get("password"))
    return [InPlaceTablespace(str(name), str(location)) for name, location in rows], None


def ordinary_database(params: Mapping[str, str]) -> str:
    """The database the check connects to (the URL's, or ``postgres`` for a replication one)."""
    return ordinary_params(params)["dbname"]
