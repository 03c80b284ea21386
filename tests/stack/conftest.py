"""Fixtures for the local-stack tests: an isolated home with no service URLs set, and
helpers for processes the tests start themselves."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tokenmill.config.settings import Settings, load_settings

from tokenmill.stack import manager

URL_VARS = ("TOKENMILL_KAFKA_URL", "TOKENMILL_REDIS_URL", "TOKENMILL_DATABASE_URL")


@pytest.fixture
def home(tm_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty TOKENMILL_HOME with no external URLs; whatever a test left up is
    brought down afterwards, so a failing test never leaks processes."""
    for var in URL_VARS:
        monkeypatch.delenv(var, raising=False)
    yield tm_home
    manager.down(load_settings())


@pytest.fixture
def settings(home: Path) -> Callable[[], Settings]:
    """Settings as of now (call again after changing the environment)."""
    return load_settings


@pytest.fixture
def sleeper() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start ``sleep``-like processes in their own session; killed at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait(5)
