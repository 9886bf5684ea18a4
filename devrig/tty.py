"""Answering a program's terminal prompt, as a person at a keyboard would.

The ``age`` CLI reads passphrases only from the controlling terminal, never from stdin, so
the documented passphrase-mode commands are tested by running age on a pseudo-terminal.
"""

from __future__ import annotations

import os
import pty
import subprocess
import time
from collections.abc import Sequence


def run_with_prompt_answer(argv: Sequence[str], prompt: bytes, answer: str,
                           timeout_s: float = 60) -> int:
    master, slave = pty.openpty()
    tty_name = os.ttyname(slave)

    def become_terminal_owner() -> None:
        # A new session that then opens the tty gets it as its controlling terminal.
        os.setsid()
        os.close(os.open(tty_name, os.O_RDWR))

    proc = subprocess.Popen(list(argv), stdin=slave, stdout=slave, stderr=slave,
                            preexec_fn=become_terminal_owner)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + timeout_s
    try:
        while prompt not in seen.lower():
            if time.monotonic() > deadline:
                raise AssertionError(f"no prompt {prompt!r} from {argv[0]}: {seen!r}")
            seen += os.read(master, 1024)
        os.write(master, answer.encode() + b"\n")
        return proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
