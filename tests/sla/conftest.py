"""One local stack for the SLA tests: the isolation benchmark's (tests/harness), with its
SLA-aware timed sim model; the fault suite's webhook receiver."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(_ROOT / "tests"), str(_ROOT / "tests" / "faults")]

from harness.isolation_stack import IsolationStack, sim_model
from webhook_receiver import Receiver, receiving


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with receiving() as rec:
        yield rec


@pytest.fixture(scope="module")
def stack() -> Iterator[IsolationStack]:
    with IsolationStack([sim_model("iso", sla_aware=True)], ["iso"]) as s:
        yield s
