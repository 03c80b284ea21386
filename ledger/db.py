"""Engines, sessions, transactions and migrations of the ledger.

SQLite (the embedded default) runs in WAL mode with foreign keys on and a busy
timeout, and every transaction starts with ``BEGIN IMMEDIATE``: writers queue for
the one write lock at BEGIN instead of failing to upgrade a read lock mid-transaction,
so read-then-write operations (state advances) are serialized. The price: on SQLite
a read-only transaction waits for writers too (fine for the embedded ledger; deploy
PostgreSQL for concurrency). PostgreSQL runs at
READ COMMITTED through psycopg 3; idempotent inserts rely on ``ON CONFLICT``.

Ledger functions never commit: the caller owns the transaction (use
:func:`transaction` or :func:`run_transaction`) and commits before acknowledging
the message that caused the write.
"""

from __future__ import annotations

import fcntl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, pool, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from tokenmill.errors import LedgerError

from .errors import LedgerConflict, translate
from .models import Base

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_S = 30.0
# Any constant: serializes concurrent `migrate` calls on one PostgreSQL database.
_MIGRATE_LOCK_KEY = 0x746F6B656E6D696C  # "tokenmil"


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL, choosing the psycopg 3 driver for plain PostgreSQL URLs.

    Raises:
        LedgerError: the URL cannot be parsed or names an unsupported database.
    """
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError as exc:
        raise LedgerError(f"invalid database URL: {exc}") from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise LedgerError(f"unsupported ledger database {parsed.get_backend_name()!r}")
    return parsed


def make_engine(url: str | URL, *, echo: bool = False) -> Engine:
    """An engine for the ledger at ``url`` (``sqlite:///path`` or ``postgresql://...``).

    Parameters:
        url: database URL; a SQLite file's parent directory is created if missing.
        echo: log every statement.

    Raises:
        LedgerError: bad URL, or the driver cannot be loaded.

    Returns:
        A configured engine (SQLite: WAL, foreign keys, busy timeout, BEGIN IMMEDIATE).
    """
    parsed = normalize_url(url)
    try:
        if parsed.get_backend_name() == "sqlite":
            return _sqlite_engine(parsed, echo)
        return create_engine(parsed, echo=echo, pool_pre_ping=True)
    except (sa_exc.SQLAlchemyError, ImportError) as exc:
        raise LedgerError(f"cannot create ledger engine for {parsed!r}: {exc}") from exc


def _sqlite_engine(url: URL, echo: bool) -> Engine:
    in_memory = url.database in (None, "", ":memory:")
    kwargs: dict[str, Any] = {
        "connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
    }
    if in_memory:
        # One shared connection, or every connection would see its own empty database.
        kwargs["poolclass"] = pool.StaticPool
    elif url.database:
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, echo=echo, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module; "begin" below emits it.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        if not in_memory:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``; objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


_SHARED: dict[str, sessionmaker[Session]] = {}
_SHARED_LOCK = threading.Lock()


def shared_factory(url: str) -> sessionmaker[Session]:
    """One migrated engine's session factory per URL per process (for services and
    clients that open the ledger by URL; the first call migrates it to head).

    Raises:
        LedgerError: bad URL or the migration failed.
    """
    with _SHARED_LOCK:
        factory = _SHARED.get(url)
        if factory is None:
            engine = make_engine(url)
            migrate(engine)
            factory = _SHARED[url] = session_factory(engine)
        return factory


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session in one transaction: committed on success, rolled back on error.

    Raises:
        LedgerConflict: a transient conflict; retry the whole transaction.
        LedgerError: any other database error.
    """
    with factory() as session:
        try:
            yield session
            session.commit()
        except sa_exc.SQLAlchemyError as exc:
            session.rollback()
            raise translate(exc, "transaction") from exc
        except BaseException:
            session.rollback()
            raise


def run_transaction(
    factory: sessionmaker[Session],
    work: Callable[[Session], T],
    *,
    attempts: int = 5,
    backoff_s: float = 0.02,
) -> T:
    """Run ``work(session)`` in a transaction, retrying it on transient conflicts.

    Parameters:
        factory: session factory.
        work: the transaction's body; it may run more than once, so keep it free of
            effects outside the database.
        attempts: tries in all.
        backoff_s: first pause between tries, doubled each time.

    Raises:
        LedgerConflict: still conflicting after ``attempts`` tries.
        LedgerError: any other database error.

    Returns:
        What ``work`` returned.
    """
    for attempt in range(1, attempts + 1):
        try:
            with transaction(factory) as session:
                return work(session)
        except LedgerConflict:
            if attempt == attempts:
                raise
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def migrate(target: str | URL | Engine, revision: str = "head") -> None:
    """Upgrade the ledger schema to ``revision`` with Alembic (safe to call at every start).

    Parameters:
        target: a database URL or an engine from :func:`make_engine`.
        revision: Alembic revision to upgrade to.

    Raises:
        LedgerError: the migration failed.
    """
    _run_alembic(target, lambda cfg: _command().upgrade(cfg, revision))


def downgrade(target: str | URL | Engine, revision: str) -> None:
    """Downgrade the ledger schema to ``revision`` (``"base"`` drops every table).

    Raises:
        LedgerError: the migration failed.
    """
    _run_alembic(target, lambda cfg: _command().downgrade(cfg, revision))


def _command() -> Any:
    from alembic import command

    return command


@contextmanager
def _sqlite_migration_lock(engine: Engine) -> Iterator[None]:
    """SQLite's counterpart of the PostgreSQL advisory lock: a file lock beside the
    database, so concurrent starts migrate one at a time instead of failing with
    "database is locked" while the first one converts the file to WAL and creates tables."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_alembic(target: str | URL | Engine, run: Callable[[Any], None]) -> None:
    engine = target if isinstance(target, Engine) else make_engine(target)
    try:
        with _sqlite_migration_lock(engine), engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Services migrate at start; let one do it while the others wait.
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATE_LOCK_KEY})
            run(_alembic_config(conn))
    except sa_exc.SQLAlchemyError as exc:
        raise translate(exc, "migrate") from exc
    finally:
        if engine is not target:
            engine.dispose()


def schema_diff(engine: Engine) -> list[Any]:
    """Differences between the mapped models and the migrated database (empty when
    they agree), as Alembic's ``compare_metadata`` reports them."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))
