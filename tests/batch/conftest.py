from __future__ import annotations

from collections.abc import Iterator

import pytest
from batch_stack import Stack, running_stack, stack_config, use_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("batch-stack"), stack_config()) as s:
        yield s


@pytest.fixture
def client_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    return use_stack(stack, monkeypatch)
