"""Making URLs safe to print: credentials never reach a log line or an error message."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """``url`` with any password (or token in the user part) replaced by ``***``.

    ``redis://:secret@host:6379/0`` becomes ``redis://:***@host:6379/0``; URLs without
    credentials come back unchanged. Unparseable input is hidden entirely rather than risked.
    """
    try:
        parts = urlsplit(url)
        if parts.password is None and "@" not in parts.netloc:
            return url
        user, _, host = parts.netloc.rpartition("@")
        name = user.split(":", 1)[0] if ":" in user else ""
        return urlunsplit(parts._replace(netloc=f"{name}:***@{host}"))
    except ValueError:
        return "<unparseable url>"
