"""Helpers for the local-stack tests (imported by name: ``tests/`` is not a package)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

from tokenmill.stack import processes


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def all_dead(pids: list[int]) -> bool:
    return not any(processes.pid_alive(pid) for pid in pids)


def tokenmill(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real CLI entry point, ``python -m tokenmill``, in this environment."""
    return subprocess.run(
        [sys.executable, "-m", "tokenmill", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=dict(os.environ),
    )
