"""``--config FILE``: KEY=VALUE settings loaded into the environment before anything else.

Precedence, in the full CLI and in ``coordinator.cli.fastpath`` alike: a flag on the command line,
then the config file, then the environment the process inherited. A file named with
``--config`` is a deliberate choice; an inherited environment often is not (a server started
from a shell that had ``CLOUD_DUMP_STORAGE`` set would otherwise archive to, or recover from,
that storage instead of the one its archive_command/restore_command names).

The file's values end up in ``os.environ``, so this module also remembers which file and line
each one came from: a message about a bad value (``describe``) then points at that line, not
at an environment variable the operator never set.

Standard library only, and not even pathlib: the wal-push fast path (``coordinator.cli.fastpath``)
reads the config file too, on every archive_command call.
"""

from __future__ import annotations

import os

from coordinator.envfile import assignments, decode, is_malformed
from options.declared import ENV_PREFIX, env_names

# ``collections.abc`` for annotations only: importing it costs the fast path ~2 ms (it loads
# ``collections``), and ``typing.TYPE_CHECKING`` would cost more; type checkers take this name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

# What the last load_config_file set: variable -> (file, line, value). The value is kept so
# that a variable changed since (a test's monkeypatch, a caller's os.environ) is not blamed
# on the file.
_ORIGINS: dict[str, tuple[str, int, str]] = {}

# The file holds secrets (CLOUD_DUMP_PASSPHRASE, AWS_SECRET_ACCESS_KEY), and a malformed line may
# be one: a value continued on its own line, a pasted key. So an error shows of the line only a
# word that looks like a variable name and not like a secret: upper case letters, digits and a
# separator ('_' or '-'), starting with a letter. Passwords and base64 have lower case letters;
# upper case hex and base32 (TOTP seeds) have no separator.
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def load_config_file(argv: Sequence[str]) -> list[str]:
    """Load ``--config FILE`` (or ``CLOUD_DUMP_CONFIG``) into the environment; return the
    warnings about it (a key set twice), for the caller to show where it can.

    KEY=VALUE lines, as a systemd EnvironmentFile (``coordinator.envfile``): ``#`` comments,
    optional ``export`` and quotes, a UTF-8 byte order mark ignored, the last of a key's lines
    winning; the first malformed line refuses the file. The file's values replace variables
    inherited from the environment; flags win over both (their defaults are read from the
    environment afterwards). This is how archive_command and restore_command get their
    settings and credentials without a secret on the command line (``ps``) or in
    postgresql.auto.conf. Nothing is set when the file is refused.
    """
    _ORIGINS.clear()
    path = os.environ.get("CLOUD_DUMP_CONFIG")
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    if not path:
        return []
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        from storage.errors import ConfigError

        raise ConfigError(f"cannot read config file '{path}': {exc.strerror}") from exc
    try:
        text = decode(data)
    except UnicodeDecodeError as exc:
        from storage.errors import ConfigError

        number = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"config file '{path}' line {number}: not UTF-8 text") from None
    values: dict[str, tuple[int, str]] = {}
    lines: dict[str, list[int]] = {}
    for number, key, sep, value in assignments(text):
        if is_malformed(key, sep):
            from storage.errors import ConfigError

            problem = _malformed(key, sep)
            raise ConfigError(f"config file '{path}' line {number}: expected KEY=VALUE{problem}")
        values[key] = (number, value)
        lines.setdefault(key, []).append(number)
    for key, (number, value) in values.items():
        os.environ[key] = value
        _ORIGINS[key] = (path, number, value)
    warnings = [_duplicate(path, key, numbers) for key, numbers in lines.items()
                if len(numbers) > 1]
    known = env_names()
    for key, (number, _) in values.items():
        if key not in known and (key.startswith(ENV_PREFIX) or ENV_PREFIX + key.upper() in known):
            warnings.append(_unknown(path, number, key, known))
    return warnings


def _unknown(path: str, number: int, key: str, known: frozenset[str]) -> str:
    """A key cloud-dump does not read: a typo would otherwise be a setting silently unset
    (a misspelt cluster key archiving into the flat layout). Other keys (``AWS_*``, libpq's
    ``PG*``) are the environment of the libraries underneath and are passed on as they are."""
    import difflib

    guess = ENV_PREFIX + key.upper() if ENV_PREFIX + key.upper() in known else None
    guess = guess or next(iter(difflib.get_close_matches(key.upper(), sorted(known), n=1)), None)
    hint = f" (did you mean {guess}?)" if guess else ""
    return f"config file '{path}' line {number}: {key} is not a cloud-dump setting{hint}"


def _malformed(key: str, sep: str) -> str:
    """Why a line is not KEY=VALUE, to follow "expected KEY=VALUE" (``key``: the line up to its
    first '=', ``sep``: that '=' if any), quoting only a word that looks like a variable name."""
    words = key.replace(":", " ").split(maxsplit=1)  # the "KEY VALUE" and "KEY: VALUE" typos
    if not words or not _showable(words[0]):
        return " (the line is not shown: it may hold a secret)"
    if not sep or key != words[0]:
        return f": '{words[0]}' is not followed by '='"
    return f": '{words[0]}' is not a variable name (letters, digits and '_')"


def _showable(word: str) -> bool:
    return (
        0 < len(word) <= 64
        and word[0].isalpha()
        and set(word) <= _NAME_CHARS
        and ("_" in word or "-" in word)
    )


def _duplicate(path: str, key: str, numbers: list[int]) -> str:
    where = ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"
    return (f"config file '{path}' sets {key} on lines {where}: the value on line "
            f"{numbers[-1]} is used")


def describe(name: str, text: str) -> str:
    """Variable ``name`` with the value ``text`` read from the environment, for a message:
    ``NAME='text' (config file 'FILE' line N)`` when the config file set it, else
    ``environment variable NAME='text'``. Only for values that are not secrets (numbers,
    switches)."""
    origin = _ORIGINS.get(name)
    if origin is not None and origin[2] == text:
        return f"{name}='{text}' (config file '{origin[0]}' line {origin[1]})"
    return f"environment variable {name}='{text}'"


def from_config_file(name: str) -> bool:
    """Whether variable ``name`` holds the value the config file gave it."""
    origin = _ORIGINS.get(name)
    return origin is not None and os.environ.get(name) == origin[2]
