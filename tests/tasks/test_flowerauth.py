"""Flower never starts open by mistake: where its logins come from, and when it refuses.

``tasks.flowerauth`` decides; the last test runs the Procfile's Flower line without a login to
show the decision is what Flower itself applies (``tasks/flowerconfig.py``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from devrig.procs import ServerProcess, free_port, port_open
from devrig.services import REPO_ROOT, VENV_BIN, procfile_command, procfile_process
from storage.errors import ConfigError
from tasks.flowerauth import flower_access


def test_logins_come_from_the_file_one_per_line(tmp_path: Path) -> None:
    logins = tmp_path / "flower-basic-auth"
    logins.write_text("ops:pa,ss:word\n\n  dev:other  \n")
    access = flower_access({"FLOWER_BASIC_AUTH_FILE": str(logins)}, "", None)
    # A comma belongs to the password in the file (FLOWER_BASIC_AUTH splits on commas).
    assert access.basic_auth == ["ops:pa,ss:word", "dev:other"]
    assert access.address == "127.0.0.1"


def test_logins_from_flowers_own_variable_pass_through() -> None:
    access = flower_access({}, "0.0.0.0", ["ops:secret"])
    assert access == type(access)("0.0.0.0", ["ops:secret"])


@pytest.mark.parametrize(
    ("env", "address", "given", "message"),
    [
        ({}, "", None, "flower has no credentials"),
        ({}, "0.0.0.0", [], "flower has no credentials"),
        ({"FLOWER_UNAUTHENTICATED": "loopback"}, "0.0.0.0", None, "would listen on '0.0.0.0'"),
        ({"FLOWER_UNAUTHENTICATED": "yes"}, "", None, "not understood"),
        ({}, "", ["ops"], "FLOWER_BASIC_AUTH (or --basic-auth) is not a user:password entry"),
        ({"FLOWER_BASIC_AUTH_FILE": "/nonexistent/logins"}, "", None, "cannot read"),
    ],
    ids=["none", "none-public", "open-on-public", "unknown-exemption", "no-password",
         "missing-file"],
)
def test_refused(env: dict[str, str], address: str, given: list[str] | None,
                 message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        flower_access(env, address, given)


def test_a_file_and_the_variable_together_are_refused(tmp_path: Path) -> None:
    logins = tmp_path / "logins"
    logins.write_text("ops:one\n")
    with pytest.raises(ConfigError, match="given twice"):
        flower_access({"FLOWER_BASIC_AUTH_FILE": str(logins)}, "", ["ops:two"])


def test_a_bad_line_is_named_by_number_never_shown(tmp_path: Path) -> None:
    logins = tmp_path / "logins"
    logins.write_text("ops:fine\nhunter2\n")
    with pytest.raises(ConfigError) as refused:
        flower_access({"FLOWER_BASIC_AUTH_FILE": str(logins)}, "", None)
    assert "line 2 of" in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    logins = tmp_path / "logins"
    logins.write_text("\n")
    with pytest.raises(ConfigError, match="holds no user:password line"):
        flower_access({"FLOWER_BASIC_AUTH_FILE": str(logins)}, "", None)


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.0.1", "::1", "localhost"])
def test_open_on_loopback_when_told(address: str) -> None:
    access = flower_access({"FLOWER_UNAUTHENTICATED": "loopback"}, address, None)
    assert access.basic_auth == []


def test_procfile_flower_without_a_login_exits_3_before_it_listens(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    flower = procfile_process("flower", tmp_path / "flower.log", {**env, "FLOWER_PORT": str(port)})
    try:
        assert flower.proc.wait(timeout=60) == 3
    finally:
        flower.stop()
    assert not port_open(port)
    log = (tmp_path / "flower.log").read_text()
    assert "flower: error: flower has no credentials" in log, log


def test_a_login_on_the_command_line_is_warned_about(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    # "admin" alone is no user:password entry: Flower stops at once, after the warning.
    flower = ServerProcess(
        "flower", ["bash", "-c", f"exec {procfile_command('flower')} --basic-auth=admin"],
        tmp_path / "flower.log", env={**env, "FLOWER_PORT": str(port),
                                      "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"},
        cwd=REPO_ROOT)
    try:
        assert flower.proc.wait(timeout=60) == 3
    finally:
        flower.stop()
    log = (tmp_path / "flower.log").read_text()
    assert "--basic-auth on the command line is visible to every user in 'ps'" in log, log
