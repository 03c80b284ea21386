"""Ledger fixtures: every test runs against SQLite and a real PostgreSQL server; the
ledger's one write path (``sink``) on it.

PostgreSQL is started once per session from Debian's server binaries (as the
``postgres`` user when we are root, which postgres refuses to run as), on a free
loopback port with fsync off and trust auth. Each test gets a fresh database cloned
from a migrated template (``CREATE DATABASE ... TEMPLATE``), and SQLite a copy of a
migrated file, so no test sees another's rows. Missing binaries skip the PostgreSQL
half locally and fail it in CI (``CI`` set).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from tokenmill.config import EXAMPLE_CONFIG, Settings
from tokenmill.ledger import make_engine, migrate, session_factory
from tokenmill.ledger.streams import LedgerSink

from tokenmill.stack import processes

sys.path.insert(0, str(Path(__file__).parent))  # ledger_events
from ledger_events import CARDS

TEMPLATE_DB = "tm_ledger_template"


def _pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    for candidate in [*reversed(found), os.path.dirname(shutil.which("pg_ctl") or "")]:
        if candidate and (Path(candidate) / "postgres").exists():
            return Path(candidate)
    return None


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(reason)


@dataclass
class PostgresServer:
    port: int

    def url(self, database: str) -> str:
        return f"postgresql://postgres@{processes.LOOPBACK}:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host=processes.LOOPBACK, port=self.port, user="postgres", dbname="postgres",
            autocommit=True,
        ) as conn:  # fmt: skip
            conn.execute(sql)

    def ready(self) -> bool:
        try:
            self.admin("SELECT 1")
            return True
        except Exception:  # noqa: BLE001  (not up yet)
            return False


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server with a migrated template database."""
    bindir = _pg_bindir()
    if bindir is None:
        _missing("PostgreSQL server binaries not found (apt install postgresql)")
    assert bindir is not None
    as_postgres: list[str] = []
    # On tmpfs where there is one: CREATE DATABASE per test drops from ~0.4 s to ~0.02 s.
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="tm-ledger-pg-", dir=shm if shm.is_dir() else None))
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            _missing("running as root and runuser is missing")
        as_postgres = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, user="postgres")
    data = root / "data"
    init = subprocess.run(
        [*as_postgres, str(bindir / "initdb"), "-D", str(data), "-A", "trust",
         "-U", "postgres", "--no-sync", "-E", "UTF8"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed: {init.stderr.strip()}")
    server = PostgresServer(processes.free_port())
    proc = processes.spawn(
        "postgres",
        [*as_postgres, str(bindir / "postgres"), "-D", str(data),
         "-p", str(server.port), "-c", f"listen_addresses={processes.LOOPBACK}",
         "-c", f"unix_socket_directories={root}", "-c", "fsync=off",
         "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
         "-c", "max_connections=200", "-c", "deadlock_timeout=50ms"],
        root / "postgres.log",
        server.ready,
    )  # fmt: skip
    try:
        server.admin(f"CREATE DATABASE {TEMPLATE_DB}")
        migrate(server.url(TEMPLATE_DB))  # disposes its engine: the template is unused
        yield server
    finally:
        subprocess.run(
            [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "stop", "-m", "immediate"],
            capture_output=True, check=False,
        )
        processes.stop_pid(proc.pid)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite ledger file to copy."""
    path = tmp_path_factory.mktemp("ledger-template") / "ledger.db"
    migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def backend(request: pytest.FixtureRequest) -> str:
    """Which database the test runs on."""
    return str(request.param)


def _fresh_pg_database(request: pytest.FixtureRequest, template: str | None) -> Iterator[str]:
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = "t_" + uuid.uuid4().hex[:16]
    server.admin(
        f"CREATE DATABASE {name}" + (f" TEMPLATE {template} STRATEGY FILE_COPY" if template else "")
    )
    yield server.url(name)
    server.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def empty_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, empty (unmigrated) database."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        yield from _fresh_pg_database(request, None)


@pytest.fixture
def ledger_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh database migrated to head."""
    if backend == "sqlite":
        path = tmp_path / "ledger.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
    else:
        yield from _fresh_pg_database(request, TEMPLATE_DB)


@pytest.fixture
def engine(ledger_url: str) -> Iterator[Engine]:
    eng = make_engine(ledger_url)
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """The example config (tenants alpha/beta/gamma: tiers gold/silver/bronze), with
    the price cards of :data:`ledger_events.CARDS` (sim's price changes on March 1st)."""
    monkeypatch.setenv("TOKENMILL_CONFIG", str(EXAMPLE_CONFIG))
    return Settings(home=tmp_path / "home", price_cards=CARDS)


@pytest.fixture
def sink(sessions: sessionmaker[Session], settings: Settings) -> LedgerSink:
    """The ledger's one write path, on the test's database, its price cards stored."""
    s = LedgerSink(sessions, settings)
    s.prepare()
    return s
