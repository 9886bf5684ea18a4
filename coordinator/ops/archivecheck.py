"""``check --db-url``: prove that ``archive_command`` gets WAL into this archive, now.

As pgBackRest's ``check`` does: connect to the primary over an ordinary connection (the
backup's URL will do: ``replication`` is dropped), make sure the current segment holds a record
(a transaction id is assigned and committed), force a WAL switch, and wait until the segment it
completed is in the archive at ``--storage``/``--cluster``/``--wal-prefix``. Looking in the
store, rather than trusting ``pg_stat_archiver`` alone, also catches an ``archive_command`` that
works but writes somewhere else; ``pg_stat_archiver`` is read on each poll to name the failure
when PostgreSQL reports one.

Requires the role to be allowed ``pg_switch_wal()`` (a superuser, or ``GRANT EXECUTE ON
FUNCTION pg_switch_wal() TO <role>``); the function and ``pg_stat_archiver`` are documented in
PostgreSQL's "System Administration Functions" and "The Cumulative Statistics System".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import make_conninfo

from coordinator import pgconn
from coordinator.catalog import wal_file_name
from coordinator.wait import wait_until
from storage.base import Storage
from storage.errors import ConfigError, DatabaseError, DatabaseUnreachable, WalNotArchived
from storage.layout import Layout
from storage.walnames import format_lsn, parse_lsn
from workers.wal import SYSTEM_IDENTIFIER

log = logging.getLogger(__name__)

POLL_FIRST_S = 0.2
POLL_MAX_S = 2.0


@dataclass(frozen=True)
class ArchiverState:
    """A row of ``pg_stat_archiver``: the last WAL file archived and the last that failed."""

    archived_count: int
    last_archived_wal: str | None
    failed_count: int
    last_failed_wal: str | None


def check_archiving(
    db_url: str,
    storage: Storage,
    layout: Layout,
    timeout_s: float,
    report: Callable[[str], None],
) -> str:
    """Switch WAL on the server ``db_url`` names and wait until the completed segment is in
    ``storage`` under ``layout``'s WAL root; its file name.

    Raises ``DatabaseUnreachable`` (exit 9) when the connection fails; ``ConfigError`` (exit 3)
    for a standby, ``archive_mode = off`` or a role not allowed to switch WAL;
    ``WalNotArchived`` (exit 19) when the segment is not there within ``timeout_s`` seconds
    (naming PostgreSQL's own failure report when it has one).
    """
    params = pgconn.ordinary_params(pgconn.parse_conninfo(db_url))
    target = pgconn.describe_target(params)
    password = params.get("password")
    try:
        conn = psycopg.connect(make_conninfo("", **params), autocommit=True)
    except psycopg.Error as exc:
        reason = pgconn.redact(pgconn.connect_reason(str(exc)), password)
        raise DatabaseUnreachable(f"cannot connect to postgres at {target}: {reason}") from exc
    with conn:
        try:
            before = _archiver(conn)
            segment = _switch(conn, target, params.get("user") or "<role>")
        except psycopg.Error as exc:
            raise DatabaseError(
                f"check on {target} failed: {pgconn.redact(pgconn.message(exc), password)}"
            ) from exc
        report(f"postgres at {target}: switched WAL; waiting for {segment} in the archive")
        where = f"{storage.url.rstrip('/')}/{layout.wal_root}"
        seen: list[ArchiverState] = [before]

        system = _system_identifier(conn)

        def archived() -> bool:
            if _stored(storage, layout, segment, system, where):
                return True
            seen[0] = _archiver(conn)
            _raise_if_failed(seen[0], before, segment, where)
            return False

        if wait_until(archived, timeout_s=timeout_s, first_s=POLL_FIRST_S, max_s=POLL_MAX_S,
                      factor=1.5):
            report(f"WAL archiving: ok ({segment} is in {where})")
            return segment
        raise WalNotArchived(_not_there(seen[0], segment, where, timeout_s))


def _switch(conn: psycopg.Connection[tuple[object, ...]], target: str, role: str) -> str:
    """The name of the segment a forced switch completed, after checking the server can."""
    row = conn.execute(
        "SELECT pg_is_in_recovery(), current_setting('archive_mode')"
    ).fetchone()
    assert row is not None  # one row, always
    in_recovery, archive_mode = row
    if in_recovery:
        raise ConfigError(
            f"postgres at {target} is a standby: run check against the primary (a standby "
            "cannot switch WAL)"
        )
    if archive_mode == "off":
        raise ConfigError(
            f"archive_mode is off on {target}: set archive_mode = on (needs a restart) and "
            "archive_command = 'cloud-dump wal-push %p %f ...'"
        )
    try:
        # A switch with nothing written since the last one switches nothing: committing a
        # transaction that has an id writes a commit record first.
        conn.execute("SELECT txid_current()")
        switched = conn.execute("SELECT pg_switch_wal()").fetchone()
    except pgerrors.InsufficientPrivilege as exc:
        raise ConfigError(
            f"role '{role}' may not switch WAL on {target}: connect as a superuser or "
            f"GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {role}"
        ) from exc
    assert switched is not None
    # pg_switch_wal() returns the end of the segment it completed (plus one byte): the segment
    # holding the byte before it is the one to wait for.
    end = parse_lsn(str(switched[0]))
    name = conn.execute(
        "SELECT pg_walfile_name(%s::pg_lsn)", (format_lsn(end - 1),)
    ).fetchone()
    assert name is not None
    return str(name[0])


def _archiver(conn: psycopg.Connection[tuple[object, ...]]) -> ArchiverState:
    row = conn.execute(
        "SELECT archived_count, last_archived_wal, failed_count, last_failed_wal "
        "FROM pg_stat_archiver"
    ).fetchone()
    assert row is not None
    archived_count, last_archived, failed_count, last_failed = row
    return ArchiverState(
        int(str(archived_count)),
        None if last_archived is None else str(last_archived),
        int(str(failed_count)),
        None if last_failed is None else str(last_failed),
    )


def _system_identifier(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    row = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    assert row is not None
    return str(row[0])


def _stored(storage: Storage, layout: Layout, segment: str, system: str, where: str) -> bool:
    """Whether the archive holds ``segment`` (under any compression and encryption suffix),
    archived from this server. ``WalNotArchived`` when the object there says it comes from
    another system: two clusters share the archive, and this one's WAL is not being kept."""
    prefix = layout.wal_root + segment
    for info in storage.list(prefix):
        if wal_file_name(info.key[len(layout.wal_root):]) != segment:
            continue
        stored_by = (storage.head(info.key).metadata or {}).get(SYSTEM_IDENTIFIER)
        if stored_by is not None and stored_by != system:
            raise WalNotArchived(
                f"{where} holds a {segment} of system {stored_by}, not of this server's "
                f"({system}): another cluster archives there, so this one's WAL is not kept"
            )
        return True
    return False


def _raise_if_failed(now: ArchiverState, before: ArchiverState, segment: str, where: str) -> None:
    """``WalNotArchived`` when PostgreSQL has reported ``archive_command`` failing since the
    switch. It archives in order and retries the failed file, so a failure on an earlier file
    holds ``segment`` back as much as one on ``segment`` itself; the operator should know now
    rather than at the timeout."""
    if now.failed_count > before.failed_count:
        failures = now.failed_count - before.failed_count
        failed = now.last_failed_wal or "a WAL file"
        waiting = "" if failed == segment else f", which holds back {segment}"
        raise WalNotArchived(
            f"archive_command failed for {failed} ({failures} attempt(s) since the switch"
            f"{waiting}; it should store into {where}): see the server log for its output"
        )


def _not_there(state: ArchiverState, segment: str, where: str, timeout_s: float) -> str:
    if state.last_archived_wal is not None and state.last_archived_wal[:24] >= segment:
        return (
            f"PostgreSQL archived {segment} (pg_stat_archiver) but it is not in {where} after "
            f"{timeout_s:g} s: archive_command stores somewhere else (another storage, "
            "--cluster or --wal-prefix)"
        )
    return (
        f"{segment} was not archived within {timeout_s:g} s (it is not in {where}, and "
        f"PostgreSQL's last archived file is {state.last_archived_wal or 'none'}): is "
        "archive_command set, and is it this storage?"
    )
