"""The allowed range of every numeric setting: each flag with its environment variable, and
the environment-only tuning variables of the WAL commands.

Declared once, here. ``coordinator.cli.main`` turns each row into the flag's argparse ``type=``, so
a value from the command line or from the environment is checked while the command line is
parsed, before anything is opened or connected (exit 3, one line naming the flag or the
variable and the range). ``coordinator.cli.fastpath`` asks ``acceptable`` before it answers a WAL
command without the full CLI, so that both paths accept the same values.

Standard library only, and not even ``typing``: the fast path imports this module on every
``archive_command`` and ``restore_command`` call.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

from coordinator.cli.configfile import describe

DAY_S = 86_400.0
HOUR_S = 3_600.0


class Limit:
    """A number of ``kind`` from ``low`` to ``high``; ``above`` excludes ``low`` itself."""

    __slots__ = ("above", "env", "high", "kind", "low")

    def __init__(
        self,
        kind: type[int] | type[float],
        low: float,
        high: float,
        env: str | None = None,
        *,
        above: bool = False,
    ) -> None:
        self.kind = kind
        self.low = low
        self.high = high
        self.env = env
        self.above = above

    def describe(self) -> str:
        """The range in words: "a whole number from 1 to 64", "a number above 0, at most 60"."""
        what = "a whole number" if self.kind is int else "a number"
        low, high = _plain(self.low), _plain(self.high)
        if self.above:
            return f"{what} above {low}, at most {high}"
        return f"{what} from {low} to {high}"

    def describe_short(self) -> str:
        """The range for --help: "1-64", "above 0, up to 86400"."""
        low, high = _plain(self.low), _plain(self.high)
        return f"above {low}, up to {high}" if self.above else f"{low}-{high}"

    def problem(self, text: str) -> str | None:
        """Why ``text`` is not an acceptable value; None when it is."""
        value = self.parse(text)
        if value is None:
            return "is not a whole number" if self.kind is int else "is not a number"
        too_low = value <= self.low if self.above else value < self.low
        if too_low or value > self.high:
            return f"is out of range: expected {self.describe()}"
        return None

    def parse(self, text: str) -> int | float | None:
        """``text`` as a number of this kind (finite), None when it is not one."""
        try:
            value = self.kind(text.strip())
        except ValueError:
            return None
        return value if math.isfinite(value) else None


def _plain(number: float) -> str:
    return str(int(number)) if number == int(number) else str(number)


# Every numeric flag, by its name; ``env`` is the variable that supplies it when the flag is
# absent (``check --timeout`` has none: cli.py declares it without one). Upper bounds are
# where a larger value is a typo or a resource problem, not a wish:
LIMITS: dict[str, Limit] = {
    # backup: 2N parts of --part-size-mib in memory (and in Redis); restore: N ranges of at
    # least 64 MiB in memory.
    "--parallel": Limit(int, 1, 64, "CLOUD_DUMP_PARALLEL"),
    # S3's smallest part (storage.base.S3_MIN_PART_SIZE_BYTES); a part is staged in Redis,
    # whose largest value is 512 MiB, and 2 x --parallel of them are held in memory.
    "--part-size-mib": Limit(int, 5, 512, "CLOUD_DUMP_PART_SIZE_MIB"),
    "--part-timeout": Limit(float, 0, DAY_S, "CLOUD_DUMP_PART_TIMEOUT", above=True),
    "--task-timeout": Limit(float, 0, DAY_S, "CLOUD_DUMP_TASK_TIMEOUT", above=True),
    # wal-push (PostgreSQL's archiver, and a fast shutdown, wait this long) and check.
    "--timeout": Limit(float, 0, DAY_S, "CLOUD_DUMP_WAL_PUSH_TIMEOUT", above=True),
    # Segments in flight or spooled ahead of PostgreSQL: 16 MiB each, up to 1 GiB.
    "--look-ahead": Limit(int, 0, 64, "CLOUD_DUMP_WAL_LOOK_AHEAD"),
    "--prefetch": Limit(int, 0, 64, "CLOUD_DUMP_WAL_PREFETCH"),
    # storage.base.MIN_CONFIGURABLE_PART_COUNT .. S3_MAX_PART_COUNT
    "--s3-max-parts": Limit(int, 1000, 10_000, "CLOUD_DUMP_S3_MAX_PARTS"),
    "--storage-max-attempts": Limit(int, 1, 20, "CLOUD_DUMP_STORAGE_MAX_ATTEMPTS"),
    # The widest of the algorithms' ranges; ``compression_level_problem`` narrows it.
    "--compression-level": Limit(int, 1, 22, "CLOUD_DUMP_COMPRESSION_LEVEL"),
}

# Environment-only tuning of the WAL commands, by the command that reads them.
ENV_ONLY: dict[str, dict[str, Limit]] = {
    "wal-push": {"CLOUD_DUMP_WAL_RETRY_S": Limit(float, 0, HOUR_S, above=True)},
    "wal-fetch": {
        "CLOUD_DUMP_WAL_FETCH_RETRIES": Limit(int, 1, 20),
        "CLOUD_DUMP_WAL_PREFETCH_WAIT": Limit(float, 0, HOUR_S),
        "CLOUD_DUMP_WAL_PREFETCH_IDLE_EXIT": Limit(float, 0, HOUR_S),
    },
}


def flag_problem(flag: str, text: str, env: str | None = None) -> str | None:
    """One line saying what is wrong with ``text`` for ``flag`` (given on the command line, or,
    with ``env``, read from that variable, which the config file may have set); None when it
    is acceptable."""
    problem = LIMITS[flag].problem(text)
    if problem is None:
        return None
    if env is not None:
        return f"{describe(env, text)} {problem} ({flag})"
    return f"{flag} '{text}' {problem}"


def env_only_problems(command: str) -> list[str]:
    """What is wrong with the environment-only variables ``command`` reads."""
    problems = []
    for name, limit in ENV_ONLY.get(command, {}).items():
        text = os.environ.get(name)
        if text and (problem := limit.problem(text)) is not None:
            problems.append(f"{describe(name, text)} {problem}")
    return problems


def acceptable(command: str, flags: Iterable[str], given: dict[str, str]) -> bool:
    """Whether every numeric setting of ``command`` is in range: each numeric one of its
    ``flags``, from its command line (``given``) or else from its environment variable, and
    the command's environment-only variables. The fast path's question: False sends the call
    to the full CLI, which names the value."""
    for flag in flags:
        limit = LIMITS.get(flag)
        if limit is None:
            continue
        text = given[flag] if flag in given else os.environ.get(limit.env or "")
        if text and limit.problem(text) is not None:
            return False
    return not env_only_problems(command)

DEFAULT_PREFETCH = 8
