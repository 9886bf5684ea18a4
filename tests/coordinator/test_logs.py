"""coordinator.logs: the command line's and the helpers' log lines, and the libraries kept quiet."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest

from coordinator.logs import NOISY_LOGGERS, setup_cli_logging, setup_helper_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, noisy_level in levels.items():
        logging.getLogger(name).setLevel(noisy_level)


def _reset_noisy() -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)


def test_the_cli_writes_one_line_with_the_level_in_lower_case(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_cli_logging("info")
    logging.getLogger("cloud_dump").warning("disk %s", "full")
    logging.getLogger("coordinator.x").debug("not shown")
    assert capsys.readouterr().err == "cloud-dump: warning: disk full\n"


def test_a_helper_writes_time_and_process_id(capsys: pytest.CaptureFixture[str]) -> None:
    setup_helper_logging("info")
    logging.getLogger("cloud-dump.pusher").info("WAL pusher started (look-ahead %d)", 8)
    line = capsys.readouterr().err
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[\d+\] INFO: WAL pusher started \(look-ahead 8\)\n",
        line,
    ), line


@pytest.mark.parametrize("level", ["info", "debug"])
def test_helpers_always_keep_the_libraries_quiet(level: str) -> None:
    _reset_noisy()
    setup_helper_logging(level)
    assert {logging.getLogger(n).level for n in NOISY_LOGGERS} == {logging.ERROR}


def test_the_cli_lets_the_libraries_speak_only_at_debug() -> None:
    _reset_noisy()
    setup_cli_logging("debug")
    assert {logging.getLogger(n).level for n in NOISY_LOGGERS} == {logging.NOTSET}
    setup_cli_logging("warning")
    assert {logging.getLogger(n).level for n in NOISY_LOGGERS} == {logging.ERROR}


def test_one_handler_whatever_the_number_of_setups() -> None:
    setup_cli_logging("warning")
    setup_cli_logging("info")
    assert len(logging.getLogger().handlers) == 1
