"""``tokenmill migrate``: the ledger to head, once; again changes nothing; a bad URL is
a clear error naming the database (password masked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from tokenmill.config import EXAMPLE_CONFIG

pytestmark = pytest.mark.timeout(120)


def _migrate(home: Path, database_url: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_")}
    env |= {"TOKENMILL_HOME": str(home), "TOKENMILL_CONFIG": str(EXAMPLE_CONFIG)}
    if database_url is not None:
        env["TOKENMILL_DATABASE_URL"] = database_url
    return subprocess.run([sys.executable, "-m", "tokenmill", "migrate"], env=env,
                          capture_output=True, text=True, timeout=90, check=False)  # fmt: skip


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrate_sqlite_then_again(tmp_path: Path) -> None:
    first = _migrate(tmp_path, None)
    assert first.returncode == 0, first.stderr
    assert "migrated empty" in first.stdout
    assert {"usage_records", "ledger_entries"} <= _tables(f"sqlite:///{tmp_path / 'ledger.db'}")
    again = _migrate(tmp_path, None)
    assert again.returncode == 0, again.stderr
    assert "already at" in again.stdout


def test_migrate_postgresql(tmp_path: Path, postgres_server: Any) -> None:
    postgres_server.admin("DROP DATABASE IF EXISTS tm_migrate_cmd WITH (FORCE)")
    postgres_server.admin("CREATE DATABASE tm_migrate_cmd")
    url = postgres_server.url("tm_migrate_cmd")
    for expected in ("migrated empty", "already at"):
        out = _migrate(tmp_path, url)
        assert out.returncode == 0, out.stderr
        assert expected in out.stdout
    assert "usage_records" in _tables(url.replace("postgresql://", "postgresql+psycopg://"))


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://tm:s3cret-pw@127.0.0.1:1/none", "connection"),
        ("mysql://tm:s3cret-pw@127.0.0.1/x", "unsupported ledger database"),
        ("not a url", "invalid database URL"),
    ],
)
def test_migrate_bad_url_is_a_clear_error(tmp_path: Path, url: str, says: str) -> None:
    out = _migrate(tmp_path, url)
    assert out.returncode == 1
    message = " ".join(out.stderr.split())
    assert "migrate: the ledger at" in message and says in message, message
    assert "s3cret-pw" not in out.stderr + out.stdout
