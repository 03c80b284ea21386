"""Alembic environment of the ledger.

:func:`tokenmill.ledger.db.migrate` passes an open connection in
``config.attributes["connection"]`` (inside its transaction, holding the migration
lock). Run from the ``alembic`` command line instead, the URL comes from
``sqlalchemy.url`` or ``TOKENMILL_DATABASE_URL``.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection
from tokenmill.ledger.db import make_engine
from tokenmill.ledger.models import Base

config = context.config
target_metadata = Base.metadata


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("TOKENMILL_DATABASE_URL")
    if not url:
        raise SystemExit("set sqlalchemy.url or TOKENMILL_DATABASE_URL")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            _configure_and_run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("the ledger migrations run online only")
run_migrations_online()
