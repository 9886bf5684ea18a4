"""``--db-url``: the one parse of a database URL or conninfo, and what a failed connection says.

Shared by the replication connection (``coordinator.backup.replication``), the ordinary
connection the backup opens to look for in-place tablespaces (``coordinator.backup.inplace``)
and ``check --db-url`` (``coordinator.ops.archivecheck``), so that all three read the same URL the
same way and never show its password: libpq quotes fragments of a malformed conninfo, and a
fragment may be the password, so neither that message nor any other carries it.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from storage.errors import ConfigError

CONNECT_TIMEOUT_S = 15
# What libpq's connection failures mean for an operator, by a phrase of the server's message.
CONNECT_HINTS = {
    "max_wal_senders": "raise max_wal_senders on the server: each backup needs a free walsender",
    "pg_hba.conf": "allow it with a 'host replication <user> <address> scram-sha-256' line",
    "replication role": "grant it with ALTER ROLE <user> REPLICATION",
}
# A physical replication login names no database; an ordinary one made from it needs one.
_NO_DATABASE = (None, "", "replication")


def parse_conninfo(dsn: str) -> dict[str, str]:
    """A URL (``postgres://...``) or ``key=value`` conninfo as libpq's keywords, with
    ``connect_timeout`` (15 s) and ``application_name`` (cloud-dump) unless given.

    Raises ``ConfigError`` (exit 3) when libpq cannot parse it (the message hides libpq's,
    which may quote the password) or a port is not a number from 1 to 65535.
    """
    try:
        params = {key: str(value) for key, value in conninfo_to_dict(dsn).items()}
    except psycopg.Error as exc:
        raise ConfigError(
            "invalid database url or conninfo (details hidden: may hold a password)"
        ) from exc
    # libpq takes a bad port for a connection failure; it is a typo in the URL (one port per
    # host, comma-separated).
    ports = params.get("port", "").split(",") if params.get("port") else []
    if any(not p.strip().isdigit() or not 0 < int(p) < 65536 for p in ports):
        raise ConfigError(f"invalid port '{params['port']}' in the database url or conninfo")
    params.setdefault("connect_timeout", str(CONNECT_TIMEOUT_S))
    params.setdefault("application_name", "cloud-dump")
    return params


def has_password(dsn: str) -> bool:
    """Whether the URL or conninfo itself holds a password (which ``ps`` would show)."""
    if "://" in dsn:
        try:
            return urlsplit(dsn).password is not None
        except ValueError:
            return False
    return "password=" in dsn


def ordinary_params(params: Mapping[str, str]) -> dict[str, str]:
    """The same login for an ordinary (SQL) connection: no ``replication``, and the database
    ``postgres`` where a replication URL named none."""
    ordinary = {key: value for key, value in params.items() if key != "replication"}
    if ordinary.get("dbname") in _NO_DATABASE:
        ordinary["dbname"] = "postgres"
    return ordinary


def describe_target(params: Mapping[str, str]) -> str:
    """``host:port`` for messages (never the user or password)."""
    host = params.get("host") or params.get("hostaddr") or "the default socket"
    return f"{host}:{params.get('port') or '5432'}"


def first_line(text: str) -> str:
    """A server message's first line without its ``FATAL:``/``ERROR:`` prefix."""
    line = text.strip().splitlines()[0] if text.strip() else "no error message"
    return line.removeprefix("FATAL:").removeprefix("ERROR:").strip()


def connect_reason(message: str) -> str:
    """The reason out of libpq's ``connection to server at "h", port p failed: <reason>``,
    with a hint where the reason is a known one."""
    first = message.strip().splitlines()[0] if message.strip() else "no error message"
    reason = first.rsplit(" failed: ", 1)[-1].removeprefix("connection failed: ")
    reason = _lower_first(first_line(reason))
    hints = [hint for key, hint in CONNECT_HINTS.items() if key in reason]
    return "; ".join([reason, *hints])


def message(exc: psycopg.Error) -> str:
    """The server's message (first line), or psycopg's when the server sent none."""
    return first_line(exc.diag.message_primary or str(exc))


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` (a password) replaced by ``***``."""
    return text.replace(secret, "***") if secret else text


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[1:2].islower() else text
