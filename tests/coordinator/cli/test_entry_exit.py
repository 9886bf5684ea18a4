"""The console script's exit (``coordinator.cli.fastpath.entry``): it leaves out the
interpreter's last teardown (garbage collection, modules torn down) and nothing before it.

- the command's exit code is the process's, for success and for a documented error;
- a thread that is not a daemon, still running when the command returned, finishes first;
- ``atexit`` functions registered while the command ran still run, ``logging``'s included
  (a handler's buffered record is written);
- an object left for the teardown to finalize is not (what the skip saves: 150-200 ms with
  Celery or boto3 loaded), while ``python`` running ``main`` the old way still finalizes it:
  the proof that this test can tell the two exits apart.

The command is the real CLI (``--version``, or a backup without a database: exit 3), wrapped
in a script that adds the thread, the ``atexit`` function and the object around it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from coordinator.cli.exitcodes import ExitCode

# argv[1]: "entry" or "main" (how the script ends); the rest: the command line.
_SCRIPT = textwrap.dedent("""
    import atexit, logging, sys, threading
    from coordinator.cli import fastpath
    import coordinator.cli.main as cli

    class Finalized:
        def __del__(self):
            print("finalized in teardown", flush=True)

    def command(argv):
        code = cli_main(argv)
        kept.append(Finalized())  # reachable until the modules are torn down
        atexit.register(print, "atexit function ran", flush=True)
        # Held until flushed: by logging.shutdown, an atexit function of logging's own.
        memory = logging.handlers.MemoryHandler(100, target=logging.StreamHandler(sys.stdout))
        probe = logging.getLogger("probe")
        probe.propagate = False
        probe.addHandler(memory)
        probe.warning("buffered record written")
        thread = threading.Thread(target=finish_after_input)  # not a daemon
        thread.start()
        print("command returned", flush=True)
        return code

    def finish_after_input():
        sys.stdin.readline()  # the test answers once it saw "command returned"
        print("thread finished", flush=True)

    import logging.handlers
    kept = []
    cli_main, cli.main = cli.main, command
    how, sys.argv = sys.argv[1], ["cloud-dump", *sys.argv[2:]]
    if how == "entry":
        fastpath.entry()
    sys.exit(fastpath.main())
""")


def _run(how: str, *command: str) -> subprocess.CompletedProcess[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, how, *command],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PATH": "/usr/bin:/bin", "CLOUD_DUMP_DB_URL": ""},
    )  # fmt: skip
    assert child.stdout is not None and child.stdin is not None
    seen = []
    for line in child.stdout:  # until the command returned, then let the thread finish
        seen.append(line)
        if line == "command returned\n":
            child.stdin.write("go\n")
            child.stdin.flush()
            break
    out, err = child.communicate(timeout=60)
    return subprocess.CompletedProcess(child.args, child.returncode, "".join(seen) + out, err)


def test_entry_keeps_code_threads_and_atexit_but_not_the_teardown() -> None:
    done = _run("entry", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("cloud-dump "), done.stdout
    lines = done.stdout.splitlines()
    assert lines.index("command returned") < lines.index("thread finished"), done.stdout
    assert "atexit function ran" in lines, done.stdout
    assert "buffered record written" in lines, done.stdout  # logging.shutdown flushed it
    assert "finalized in teardown" not in lines, done.stdout


def test_entry_exits_with_the_commands_error_code() -> None:
    done = _run("entry", "backup", "--name", "b1")  # no database given
    assert done.returncode == ExitCode.CONFIG, (done.returncode, done.stderr)
    assert "cloud-dump: error: no database given" in done.stderr
    assert "thread finished" in done.stdout.splitlines(), done.stdout


def test_main_alone_still_tears_down() -> None:
    """The same script ending in ``main``: the interpreter's full exit finalizes the object."""
    done = _run("main", "--version")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "finalized in teardown" in lines, done.stdout
    assert "thread finished" in lines, done.stdout
