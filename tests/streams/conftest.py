"""Fixtures for the stream-processor tests: the ledger fixtures of ``tests/ledger``
(SQLite and a real PostgreSQL, each test a fresh migrated database), and real
``tokenmill streams`` worker processes on the session's broker, isolated per test by
their own topic, consumer group and home."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from tokenmill.config import EXAMPLE_CONFIG, Settings
from tokenmill.ledger.streams import LedgerSink

sys.path.insert(0, str(Path(__file__).parent))  # streams_helpers
from streams_helpers import Workers


def _load_ledger_fixtures() -> object:
    path = Path(__file__).resolve().parent.parent / "ledger" / "conftest.py"
    spec = importlib.util.spec_from_file_location("tm_ledger_fixtures", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_ledger = _load_ledger_fixtures()
# Re-exported: pytest collects fixtures from this module's namespace.
postgres_server = _ledger.postgres_server  # type: ignore[attr-defined]
sqlite_template = _ledger.sqlite_template  # type: ignore[attr-defined]
backend = _ledger.backend  # type: ignore[attr-defined]
ledger_url = _ledger.ledger_url  # type: ignore[attr-defined]
engine = _ledger.engine  # type: ignore[attr-defined]
sessions = _ledger.sessions  # type: ignore[attr-defined]


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """The example config (tenants alpha/beta/gamma; models sim and smollm2)."""
    for name in ("TOKENMILL_DATABASE_URL", "TOKENMILL_KAFKA_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOKENMILL_CONFIG", str(EXAMPLE_CONFIG))  # named: tests set service URLs
    return Settings(home=tmp_path / "home")


@pytest.fixture
def sink(sessions: sessionmaker[Session], settings: Settings) -> LedgerSink:
    s = LedgerSink(sessions, settings)
    s.prepare()
    return s


@pytest.fixture
def workers(
    tmp_path: Path,
    kafka_bootstrap: str,
    ledger_url: str,
    unique: str,
    redis_url: str,
    request: pytest.FixtureRequest,
) -> Iterator[Workers]:
    w = Workers(tmp_path, kafka_bootstrap, ledger_url, unique, redis_url)
    yield w
    codes = [worker.stop() for worker in w.started]
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(w.logs())
    assert all(c in (0, -9, None) for c in codes), f"worker exit codes {codes}\n{w.logs()}"


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)
