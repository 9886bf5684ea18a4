"""A reader of cloud-dump's report that goes away (``cloud-dump list | head``) is not an error:
the report stops, the command ends with its own outcome, and nothing is printed about it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from devrig.services import VENV_BIN


def run_with_stdout_closed(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run cloud-dump with the read end of its stdout closed before it can write (its
    interpreter takes far longer to start than closing a pipe)."""
    proc = subprocess.Popen([str(VENV_BIN / "cloud-dump"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    return proc.wait(timeout=60), err


def test_list_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    env = {"CLOUD_DUMP_STORAGE": f"file://{tmp_path}", "PYTHONUNBUFFERED": ""}
    for flags in ([], ["--json"]):
        code, err = run_with_stdout_closed("list", *flags, env=env)
        assert (code, err) == (0, ""), err


def test_a_failing_command_keeps_its_exit_code_with_stdout_closed(tmp_path: Path) -> None:
    env = {"CLOUD_DUMP_STORAGE": f"file://{tmp_path}"}
    code, err = run_with_stdout_closed("verify", env=env)
    assert code == 11 and "nothing to verify" in err, err
