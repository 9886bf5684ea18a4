"""Range checks of the numeric settings, from their rows in ``options.declared``.

``coordinator.cli.main`` turns each numeric row into its flag's argparse ``type=``, so a value
from the command line or from the environment is checked while the command line is parsed,
before anything is opened or connected (exit 3, one line naming the flag or the variable and the
range). ``coordinator.cli.fastpath`` asks ``acceptable`` before it answers a WAL command without
the full CLI, so that both paths accept the same values.

Standard library only, and not even ``typing``: the fast path imports this module on every
``archive_command`` and ``restore_command`` call.
"""

from __future__ import annotations

import os

from coordinator.cli.configfile import describe
from options.declared import WAL_FETCH, WAL_PUSH, Option, option_for, options_of

# ``collections.abc`` for annotations only: importing it costs the fast path ~2 ms (it loads
# ``collections``), and ``typing.TYPE_CHECKING`` would cost more; type checkers take this name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

# The defaults the fast path applies itself: a spooled segment's call starts the prefetcher,
# and a wal-push call waits for the pusher only where the full CLI would use one.
_PREFETCH = option_for(WAL_FETCH, "--prefetch")
assert _PREFETCH is not None and isinstance(_PREFETCH.default, int)
DEFAULT_PREFETCH: int = _PREFETCH.default
_LOOK_AHEAD = option_for(WAL_PUSH, "--look-ahead")
assert _LOOK_AHEAD is not None and isinstance(_LOOK_AHEAD.default, int)
DEFAULT_LOOK_AHEAD: int = _LOOK_AHEAD.default


def flag_problem(option: Option, text: str, env: str | None = None) -> str | None:
    """One line saying what is wrong with ``text`` for ``option`` (given on the command line,
    or, with ``env``, read from that variable, which the config file may have set); None when
    it is acceptable."""
    assert option.limit is not None
    problem = option.limit.problem(text)
    if problem is None:
        return None
    if env is not None:
        return f"{describe(env, text)} {problem} ({option.flag})"
    return f"{option.flag} '{text}' {problem}"


def env_only_problems(command: str) -> list[str]:
    """What is wrong with the environment-only numeric variables ``command`` reads."""
    problems = []
    for option in options_of(command):
        if option.flag is None and option.env and option.limit is not None:
            text = os.environ.get(option.env)
            if text and (problem := option.limit.problem(text)) is not None:
                problems.append(f"{describe(option.env, text)} {problem}")
    return problems


def acceptable(command: str, flags: Iterable[str], given: dict[str, str]) -> bool:
    """Whether every numeric setting of ``command`` is in range: each numeric one of its
    ``flags``, from its command line (``given``) or else from its environment variable, and
    the command's environment-only variables. The fast path's question: False sends the call
    to the full CLI, which names the value."""
    for flag in flags:
        option = option_for(command, flag)
        if option is None or option.limit is None:
            continue
        text = given[flag] if flag in given else os.environ.get(option.env or "")
        if text and option.limit.problem(text) is not None:
            return False
    return not env_only_problems(command)
