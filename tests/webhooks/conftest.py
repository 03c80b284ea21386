from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "batch"))
from batch_stack import Stack, running_stack, stack_config, use_stack
from webhook_helpers import MAX_ATTEMPTS, TIMEOUT_S, Receiver, serve_receiver


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = stack_config(max_attempts=MAX_ATTEMPTS, backoff_base_s=0.1, timeout_s=TIMEOUT_S)
    with running_stack(tmp_path_factory.mktemp("webhook-stack"), config) as s:
        yield s


@pytest.fixture
def client_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    return use_stack(stack, monkeypatch)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serve_receiver() as rec:
        yield rec
