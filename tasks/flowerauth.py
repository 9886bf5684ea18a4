"""Who may open Flower and where it listens: the decisions ``tasks/flowerconfig.py`` applies.

Flower shows every task of the fleet with its arguments and results and can shut workers down,
so it never runs open by mistake:

- Credentials come from ``FLOWER_BASIC_AUTH`` (Flower's own variable, ``user:password`` entries
  separated by commas) or from the file ``FLOWER_BASIC_AUTH_FILE`` names: one ``user:password``
  per line, blank lines ignored (a compose secret, mounted at ``/run/secrets/<name>``; a
  password may hold commas there). ``--basic-auth=user:password`` works too, but shows in
  ``ps``. Never both a file and the others: which one counts would be a guess.
- Without credentials Flower does not start, unless ``FLOWER_UNAUTHENTICATED=loopback`` and it
  listens on a loopback address (a developer's own machine): then the pages are open to every
  local user, and the HTTP API stays closed unless Flower's ``FLOWER_UNAUTHENTICATED_API`` is
  set as well.
- It listens on ``FLOWER_ADDRESS`` (or ``--address``), 127.0.0.1 when unset: Flower's own
  default is every interface.

Errors are ``ConfigError`` naming the variable or file, never a credential.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from storage.errors import ConfigError

AUTH_FILE_ENV = "FLOWER_BASIC_AUTH_FILE"
UNAUTHENTICATED_ENV = "FLOWER_UNAUTHENTICATED"
UNAUTHENTICATED_LOOPBACK = "loopback"
DEFAULT_ADDRESS = "127.0.0.1"
# The tasks page's columns: Flower's defaults with what each task was given and answered.
TASKS_COLUMNS = "name,uuid,state,args,result,received,runtime,worker"


@dataclass(frozen=True)
class FlowerAccess:
    """Flower's ``address`` and ``basic_auth`` options (``user:password`` entries; empty only
    when it was told to run unauthenticated on loopback)."""

    address: str
    basic_auth: list[str]


def flower_access(
    env: Mapping[str, str], address: str | None, basic_auth: Sequence[str] | None
) -> FlowerAccess:
    """What Flower may start with, given the environment and the ``address`` and ``basic_auth``
    options Flower read from its command line and ``FLOWER_*`` variables (empty when unset).

    Raises ``ConfigError`` when there are no credentials and no loopback-only exemption, when
    credentials come from two places, or when an entry is not ``user:password``.
    """
    address = address or DEFAULT_ADDRESS
    given = [entry for entry in basic_auth or () if entry]
    path = env.get(AUTH_FILE_ENV)
    if path and given:
        raise ConfigError(
            f"flower credentials given twice: {AUTH_FILE_ENV} and FLOWER_BASIC_AUTH (or "
            "--basic-auth); keep one"
        )
    credentials = read_credentials(Path(path)) if path else given
    for entry in given:
        _require_entry(entry, "FLOWER_BASIC_AUTH (or --basic-auth)")
    exemption = env.get(UNAUTHENTICATED_ENV, "")
    if exemption not in ("", UNAUTHENTICATED_LOOPBACK):
        raise ConfigError(
            f"{UNAUTHENTICATED_ENV}='{exemption}' is not understood: the only value is "
            f"'{UNAUTHENTICATED_LOOPBACK}'"
        )
    if not credentials:
        if not exemption:
            raise ConfigError(
                f"flower has no credentials: set {AUTH_FILE_ENV} (a file of user:password "
                f"lines) or FLOWER_BASIC_AUTH, or {UNAUTHENTICATED_ENV}={UNAUTHENTICATED_LOOPBACK}"
                f" to run it without a login on a loopback address"
            )
        if not is_loopback(address):
            raise ConfigError(
                f"{UNAUTHENTICATED_ENV}={UNAUTHENTICATED_LOOPBACK}, but flower would listen on "
                f"'{address}': without credentials it listens on a loopback address only"
            )
    return FlowerAccess(address, credentials)


def read_credentials(path: Path) -> list[str]:
    """The ``user:password`` lines of ``path``; raises ``ConfigError`` naming the file (and a
    bad entry's line number, never its text) when unreadable, empty or malformed."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read the flower credentials file '{path}' ({reason})") from None
    credentials = []
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if entry:
            _require_entry(entry, f"line {number} of '{path}'")
            credentials.append(entry)
    if not credentials:
        raise ConfigError(f"the flower credentials file '{path}' holds no user:password line")
    return credentials


def is_loopback(address: str) -> bool:
    """Whether ``address`` (an IP address or ``localhost``) is reachable from this host only."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _require_entry(entry: str, where: str) -> None:
    user, colon, password = entry.partition(":")
    if not (user and colon and password):
        raise ConfigError(f"{where} is not a user:password entry")
