"""Fixtures of the fault suite: one local stack per module (``tokenmill up`` in a home under
pytest's tmp dir), brought back to health before each case, and the webhook receiver."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fault_stack import FaultStack, running
from sizes import Size, chosen
from webhook_receiver import Receiver, receiving


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "faults: a fault drill on a whole local stack (size: $FAULTS_SIZE, small or full)",
    )


@pytest.fixture(scope="session")
def size() -> Size:
    return chosen()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with receiving() as rec:
        yield rec


@pytest.fixture(scope="module")
def module_stack(tmp_path_factory: pytest.TempPathFactory, size: Size) -> Iterator[FaultStack]:
    with running(tmp_path_factory.mktemp("faults"), size) as stack:
        yield stack


@pytest.fixture
def stack(module_stack: FaultStack) -> Iterator[FaultStack]:
    """The module's stack with every service of ``up`` running (a case before may have
    left it otherwise); services a case started by hand are stopped after it."""
    module_stack.restore()
    yield module_stack
    module_stack.stop_alone()
