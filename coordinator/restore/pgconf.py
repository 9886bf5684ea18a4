"""Reading PostgreSQL's configuration files in a restored data directory, as the server would.

The syntax is PostgreSQL's (``guc-file.l``): one setting a line, ``name = value`` or
``name value``; ``#`` starts a comment outside quotes; a value is a bare token or a quoted string
(``''`` or ``\\'`` for a quote, C-style backslash escapes); names ignore case; ``include``,
``include_if_exists`` and ``include_dir`` read other files (relative to the including file,
``.conf`` files of a directory in name order, at most 10 levels deep). The last occurrence of a
setting wins, and ``postgresql.auto.conf`` is read after ``postgresql.conf``.

Restore reads what it can see: the files in PGDATA and the files they include. Settings given on
the server's command line (``-c``, ``pg_ctl -o``) or in a ``config_file`` outside PGDATA (Debian
keeps postgresql.conf in /etc/postgresql/<major>/<cluster>/) are not visible here;
``ConfigView.unseen`` says what could not be read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

POSTGRESQL_CONF = "postgresql.conf"
AUTO_CONF = "postgresql.auto.conf"
_MAX_DEPTH = 10  # CONF_FILE_MAX_DEPTH
_LINE_RE = re.compile(
    r"\s*(?P<name>[A-Za-z_][A-Za-z0-9_$]*(?:\.[A-Za-z_][A-Za-z0-9_$]*)?)"
    r"(?:\s*=\s*|\s+)"
    r"(?P<value>'(?:[^'\\\n]|\\.|'')*'|[^\s#']+)"
    r"\s*(?:#.*)?",
    re.ASCII,
)
_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_INCLUDES = ("include", "include_if_exists", "include_dir")


@dataclass(frozen=True)
class ConfLine:
    """One setting line: the name in lower case and the value as the server reads it."""

    name: str
    value: str


def parse_line(line: str) -> ConfLine | None:
    """The setting on ``line``; None for blank lines, comments and what PostgreSQL rejects."""
    match = _LINE_RE.fullmatch(line)
    if match is None:
        return None
    raw = match["value"]
    value = _unquote(raw[1:-1]) if raw.startswith("'") else raw
    return ConfLine(match["name"].lower(), value)


def _unquote(body: str) -> str:
    """PostgreSQL's DeescapeQuotedString: '' and backslash escapes, octal \\ooo."""
    out: list[str] = []
    i = 0
    while i < len(body):
        char = body[i]
        if char == "'" and body[i + 1 : i + 2] == "'":
            out.append("'")
            i += 2
            continue
        if char != "\\" or i + 1 == len(body):
            out.append(char)
            i += 1
            continue
        nxt = body[i + 1]
        octal = re.match(r"[0-7]{1,3}", body[i + 1 :])
        if octal is not None:
            out.append(chr(int(octal.group(), 8)))
            i += 1 + len(octal.group())
        else:
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
    return "".join(out)


def quote(value: str) -> str:
    """A string literal the server reads back as ``value`` (as ALTER SYSTEM writes it)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


@dataclass(frozen=True)
class Setting:
    value: str
    path: Path  # the file that sets it last


@dataclass
class ConfigView:
    """The settings the files in a data directory give, and what could not be read."""

    settings: dict[str, Setting] = field(default_factory=dict)
    unseen: list[str] = field(default_factory=list)

    def get(self, name: str) -> Setting | None:
        return self.settings.get(name)


def read_config(pgdata: Path) -> ConfigView:
    """postgresql.conf (with what it includes), then postgresql.auto.conf, of ``pgdata``."""
    view = ConfigView()
    main = pgdata / POSTGRESQL_CONF
    if main.is_file():
        _read_file(main, view, depth=0)
    else:
        view.unseen.append(
            f"PGDATA has no {POSTGRESQL_CONF} (Debian keeps it in /etc/postgresql/<major>/"
            "<cluster>/): the server's main configuration is elsewhere"
        )
    auto = pgdata / AUTO_CONF
    if auto.is_file():
        _read_file(auto, view, depth=0)
    return view


def _read_file(path: Path, view: ConfigView, depth: int) -> None:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        view.unseen.append(f"could not read '{path}': {(exc.strerror or str(exc)).lower()}")
        return
    for line in text.splitlines():
        setting = parse_line(line)
        if setting is None:
            continue
        if setting.name in _INCLUDES:
            _include(path, setting, view, depth)
        else:
            view.settings[setting.name] = Setting(setting.value, path)


def _include(path: Path, directive: ConfLine, view: ConfigView, depth: int) -> None:
    if depth + 1 > _MAX_DEPTH:
        view.unseen.append(f"'{path}' nests includes deeper than PostgreSQL allows")
        return
    target = Path(directive.value)
    if not target.is_absolute():
        target = path.parent / target
    if directive.name == "include_dir":
        if not target.is_dir():
            view.unseen.append(f"'{path}' includes directory '{target}', which is not here")
            return
        files = sorted(p for p in target.iterdir()
                       if p.name.endswith(".conf") and not p.name.startswith(".") and p.is_file())
        for file in files:
            _read_file(file, view, depth + 1)
    elif target.is_file():
        _read_file(target, view, depth + 1)
    elif directive.name == "include":
        view.unseen.append(f"'{path}' includes '{target}', which is not here")
