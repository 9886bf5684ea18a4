"""Helpers shared by the benchmark scripts: timed child processes, /proc accounting, formatting.

- ``run_timed`` runs a command in its own session, through a small launcher that reaps it with
  ``os.wait4``: the wall time, the CPU seconds and the peak RSS (``ru_maxrss``) of the command
  and of every descendant it waited for. On an interrupt the command's process group is stopped.
- ``become_subreaper`` and ``reap_helpers``: the WAL commands leave detached helpers (the WAL
  pusher, the WAL prefetcher) running after they exit. As a child subreaper the benchmark
  inherits them when their parent exits, waits for them at the end of a row and counts their
  CPU seconds (``wait4``), which would otherwise be invisible.
- ``tree_cpu_seconds`` and ``vm_hwm_bytes`` read ``/proc`` for servers that outlive one run
  (PostgreSQL, Redis, moto, Celery workers): CPU as utime+stime of every live process in the
  tree plus cutime+cstime (children already reaped), in seconds; memory as ``VmHWM``.

Linux only. Sizes are in MB = 10^6 bytes throughout.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import pytest
import redis

from coordinator.wait import wait_until
from devrig.procs import ServerProcess, free_port, port_open

if TYPE_CHECKING:
    from devrig.services import WorkerPool

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MB = 1_000_000


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and carries the log tail."""


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- timed child processes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Timed:
    """One finished command: wall seconds, CPU seconds (user+system) and peak RSS in bytes."""

    wall_s: float
    cpu_s: float
    max_rss: int


# Peak RSS is measured by this launcher, not by wait4 in the benchmark itself: Linux folds the
# memory of the process that forked a command into the command's ru_maxrss (exec records the
# high-water mark of the address space it replaces), so a command forked from the benchmark's
# ~100 MB interpreter would never report less than that. Forked from this launcher (Python
# started with -I -S: ~7 MB), a command's peak RSS is its own, or at least ~7 MB.
_LAUNCHER = """
import os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - started
with open(out, "w") as f:
    f.write(f"{wall} {ru.ru_utime + ru.ru_stime} {ru.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def run_timed(
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    what: str | None = None,
) -> Timed:
    """Run ``argv`` to completion; raise ``BenchError`` with the log tail if it fails.

    Wall time, CPU and peak RSS are those of ``argv`` and of every descendant it waited for.
    The command gets its own session so that a Ctrl-C of the benchmark does not hit it halfway
    through our own clean-up: on any exception (KeyboardInterrupt included) we send SIGTERM to
    its process group, then SIGKILL, and reap it.
    """
    result = log_path.with_name(f"{log_path.name}.rusage")
    with log_path.open("ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(result), *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
        try:
            proc.wait()
        except BaseException:
            stop_group(proc)
            raise
    if proc.returncode != 0:
        raise BenchError(
            f"{what or argv[0]} exited with status {proc.returncode}; log {log_path}:\n"
            f"{log_tail(log_path)}"
        )
    wall, cpu, max_rss_kib = result.read_text().split()
    result.unlink()
    return Timed(float(wall), float(cpu), int(max_rss_kib) * 1024)


def stop_group(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """SIGTERM the process group led by ``proc`` (our own child), SIGKILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout_s)
            return
        except subprocess.TimeoutExpired:
            continue


# --- the servers both benchmarks start ------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PYTHON = str(VENV_BIN / "python")
CLOUD_DUMP = str(VENV_BIN / "cloud-dump")
# The local S3 server (moto) takes any credentials: these never leave this machine.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class Services:
    """A private redis-server and moto_server, stopped by the ExitStack they were started on."""

    redis_pid: int
    redis_port: int
    moto_pid: int
    moto_endpoint: str
    moto_log: Path


def start_services(stack: contextlib.ExitStack[bool | None], workdir: Path, logs: Path) -> Services:
    """Redis (no persistence) and moto, each on a free loopback port."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not installed: run `make setup`")
    redis_dir = workdir / "redis"
    redis_dir.mkdir()
    redis_port = free_port()
    redis_pid = _start_server(stack, logs, "redis-server",
                              [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save",
                               "", "--appendonly", "no", "--dir", str(redis_dir)],
                              redis_port)  # fmt: skip
    moto_port = free_port()
    moto_pid = _start_server(stack, logs, "moto_server",
                             [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p",
                              str(moto_port)],
                             moto_port)  # fmt: skip
    return Services(redis_pid, redis_port, moto_pid, f"http://127.0.0.1:{moto_port}",
                    logs / "moto_server.log")  # fmt: skip


def _start_server(stack: contextlib.ExitStack[bool | None], logs: Path, name: str,
                  argv: list[str], port: int) -> int:  # fmt: skip
    server = ServerProcess(name, argv, logs / f"{name}.log")
    stack.callback(server.stop)
    server.wait_until(lambda: port_open(port), timeout_s=30)
    return server.pid


def start_worker(pool: WorkerPool, name: str, env: Mapping[str, str], log_path: Path) -> None:
    """One Celery worker on both queues, one process, as devrig/services.py runs them."""
    pool.processes.append(
        ServerProcess(
            f"celery worker {name}",
            [str(VENV_BIN / "celery"), "-A", "tasks.app", "worker", "-Q", "parts,wal", "-c", "1",
             "-n", name, "-l", "info", "--without-gossip", "--without-mingle",
             "--without-heartbeat"],
            log_path,
            env=dict(env),
            cwd=REPO_ROOT,
        )
    )  # fmt: skip
    pool.names.append(name)


# --- detached helpers -----------------------------------------------------------------------------

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def become_subreaper() -> None:
    """Orphaned descendants are reparented to this process instead of init."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def reap_helpers(modules: Sequence[str], timeout_s: float = 60.0) -> float:
    """Wait for our adopted children running ``python -m <module>`` to exit; their CPU seconds.

    Only children whose command line names one of ``modules`` are waited for (servers started
    with Popen are children too, and stay alive). Zombie children are reaped whatever they were:
    an adopted helper's command line is gone once it has exited.
    """
    deadline = time.monotonic() + timeout_s
    cpu_s = 0.0
    while True:
        alive = False
        for pid in _children_map().get(os.getpid(), []):
            fields = _stat_fields(pid)
            if fields is None:
                continue
            if fields[0] == "Z":
                # Other orphans end here too (a postmaster that pg_ctl started): only the
                # Python helpers count. The name must be read before the reap removes it.
                python = _comm(pid).startswith("python")
                with contextlib.suppress(ChildProcessError):
                    _, _, usage = os.wait4(pid, 0)
                    if python:
                        cpu_s += usage.ru_utime + usage.ru_stime
                continue
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                alive = alive or any(m.encode() in argv for m in modules)
        if not alive:
            return cpu_s
        if time.monotonic() > deadline:
            raise BenchError(f"helpers {', '.join(modules)} still running after {timeout_s:.0f} s")
        time.sleep(0.05)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# --- /proc accounting -----------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3, the state, is index 0)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def walsenders_reaped(postmaster_pid: int) -> bool:
    """Whether the postmaster has no walsender left, running or exited and not yet reaped.

    A child's CPU shows in its parent's (cutime, cstime) only once the parent has reaped it.
    An exited child (a zombie) has no command line left to tell what it was: any counts.
    """
    for child in _children_map().get(postmaster_pid, []):
        fields = _stat_fields(child)
        if fields is None:
            continue  # reaped meanwhile
        if fields[0] == "Z":
            return False
        with contextlib.suppress(OSError):
            if b"walsender" in Path(f"/proc/{child}/cmdline").read_bytes():
                return False
    return True


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants, parents first."""
    children = _children_map()
    tree, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        tree.append(current)
        queue.extend(sorted(children.get(current, [])))
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of the tree under ``pid``: live processes plus the children they reaped."""
    ticks = 0
    for member in process_tree(pid):
        fields = _stat_fields(member)
        if fields is not None:
            ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return ticks / CLOCK_TICKS


def vm_hwm_bytes(pid: int) -> int | None:
    """Peak resident set size of a live process (VmHWM), None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def directory_bytes(path: Path) -> int:
    """Apparent size of every regular file under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).lstat().st_size
    return total


# --- formatting -----------------------------------------------------------------------------------


def mb(size: float) -> str:
    return f"{size / MB:,.0f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def run_bench(name: str, started: float, keep_logs: bool,
              body: Callable[[Path, contextlib.ExitStack[bool | None]], None]) -> int:
    """Run ``body(workdir, stack)``: whatever it registers on ``stack`` (servers, clusters) is
    stopped at the end, also on Ctrl-C or SIGTERM. Returns the exit status: 0, 1 when a step
    failed, 130 when interrupted. Logs go to ``workdir/logs``, copied to ./bench-logs-<time>
    with ``keep_logs``."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix=f"cloud-dump-bench-{name}-", dir="/tmp"))
    try:
        with contextlib.ExitStack() as stack:
            logs = workdir / "logs"
            logs.mkdir()
            if keep_logs:
                stack.callback(_keep_logs, logs)
            try:
                body(workdir, stack)
            finally:
                # A second Ctrl-C must not cut the clean-up short (the servers run in their
                # own sessions: the terminal's signals do not reach them).
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except KeyboardInterrupt:
        print("\ninterrupted: everything started was stopped", file=sys.stderr)
        return 130
    except (BenchError, pytest.fail.Exception, redis.RedisError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ntotal {time.monotonic() - started:.0f} s; load average at end {load_average()}")
    return 0


def _raise_interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


def _keep_logs(logs: Path) -> None:
    target = Path.cwd() / f"bench-logs-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.copytree(logs, target)
    print(f"logs kept in {target}")


# A request line of moto's log: `"GET /bucket/key HTTP/1.1" 200`, where moto colours the method
# and the protocol with terminal escapes (one or two codes before the method).
_MOTO_REQUEST = re.compile(r'"(?:\x1b\[[\d;]*m)*([A-Z]+) /\S* HTTP/[\d.]+(?:\x1b\[0m)?" \d{3}')


def moto_requests_since(s3: Any, bucket: str, moto_log: Path, offset: int) -> Counter[str]:
    """The requests moto logged in ``moto_log`` since byte ``offset``, by method ("GET",
    "PUT", "DELETE", "POST", ...).

    moto logs a request after its response: the count waits until the log shows a marker
    request sent after every measured one (``s3``, a boto3 client, lists a prefix of ``bucket``
    that nothing has), and counts what comes before it. ``BenchError`` if it never shows.
    """
    marker = f"bench-log-marker-{uuid.uuid4().hex}"
    s3.list_objects_v2(Bucket=bucket, Prefix=marker)

    def logged_before_marker() -> tuple[str] | None:
        with moto_log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        at = text.find(marker)
        return (text[: text.rfind("\n", 0, at) + 1],) if at >= 0 else None

    logged = wait_until(logged_before_marker, timeout_s=30, first_s=0.005)
    if logged is None:
        raise BenchError(f"moto's log did not show the request for '{marker}' within 30 s")
    return Counter(m.group(1) for m in _MOTO_REQUEST.finditer(logged[0]))
