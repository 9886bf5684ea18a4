"""KEY=VALUE files, as a systemd EnvironmentFile: the syntax of ``cloud-dump --config``.

One parser for the two readers of such a file: ``coordinator.cli.configfile`` loads the file of
this call into the environment and refuses it whole at its first malformed line (a setting
silently dropped would archive somewhere else); ``coordinator.restore.archiving`` reads the file
a restored copy's archive_command names, only to say which archive the copy will push into,
and skips a malformed line (a warning about the copy must not fail the restore).

Syntax: UTF-8 with an optional byte order mark; lines split at ``\\n`` alone (as editors number
them), blanks and ``#`` comments skipped; ``KEY=VALUE`` with an optional ``export``, spaces
around both trimmed, and one pair of matching quotes around the value removed. A key is letters,
digits and ``_``.

Standard library only, and no import at all: the wal-push fast path reads the config file on
every archive_command call.
"""

from __future__ import annotations


def decode(data: bytes) -> str:
    """The file's text; ``UnicodeDecodeError`` when it is not UTF-8 (an editor's byte order
    mark is not part of the first key)."""
    return data.decode("utf-8-sig")


def assignments(text: str) -> list[tuple[int, str, str, str]]:
    """Every line of ``text`` that is not blank or a comment, in order, as ``(line number,
    key, '=', value)``, the value unquoted; for a malformed line ``(line number, text before
    its first '=' or the whole line, '=' or '', '')`` (``is_malformed`` tells them apart)."""
    found: list[tuple[int, str, str, str]] = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not _is_name(key):
            found.append((number, key, sep, ""))
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        found.append((number, key, sep, value))
    return found


def is_malformed(key: str, sep: str) -> bool:
    """Whether an entry of ``assignments`` is a line that is not KEY=VALUE."""
    return not sep or not _is_name(key)


def values(text: str) -> dict[str, str]:
    """The KEY=VALUE lines of ``text`` as a mapping, the last of a key's lines winning and
    malformed lines skipped."""
    return {key: value for _, key, sep, value in assignments(text) if not is_malformed(key, sep)}


def _is_name(key: str) -> bool:
    return key.replace("_", "").isalnum()
