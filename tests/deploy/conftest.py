"""Fixtures of the deploy tests: the ledger suite's PostgreSQL server (loaded from
tests/ledger/conftest.py under a name of its own, so the two conftests do not collide)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_LEDGER_CONFTEST = Path(__file__).resolve().parents[1] / "ledger" / "conftest.py"


def _load_ledger_fixtures() -> object:
    name = "tests_ledger_fixtures"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _LEDGER_CONFTEST)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


postgres_server = _load_ledger_fixtures().postgres_server  # type: ignore[attr-defined]
