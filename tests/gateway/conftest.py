"""A whole local stack per test module, reached only through its gateway, as tenants
reach it: the official ``openai`` SDK and plain HTTP with the demo keys."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "batch"))
from batch_stack import Stack, running_stack, stack_config

#: the example config's demo keys
KEYS = {"alpha": "tm-alpha-demo-key", "beta": "tm-beta-demo-key", "gamma": "tm-gamma-demo-key"}


# One stack for the modules that take it as it is (a module needing another config
# defines its own): each starts in ~10 s, and their tests read only their own requests.
@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("gateway-stack"), stack_config()) as s:
        yield s


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> str:
    """The gateway's base URL (``http://127.0.0.1:PORT``)."""
    return stack.address("gateway")


@pytest.fixture
def sdk(gateway: str) -> Iterator[Callable[[str], openai.OpenAI]]:
    """``sdk("alpha")``: the official client with that tenant's key."""
    made: list[openai.OpenAI] = []

    def make(tenant: str) -> openai.OpenAI:
        client = openai.OpenAI(base_url=gateway + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=60)
        made.append(client)
        return client

    yield make
    for c in made:
        c.close()


@pytest.fixture
def http(gateway: str) -> Iterator[Callable[[str | None], httpx.Client]]:
    """``http("alpha")``: plain HTTP with that tenant's key (None: no key)."""
    made: list[httpx.Client] = []

    def make(tenant: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
        client = httpx.Client(base_url=gateway, headers=headers, timeout=60)
        made.append(client)
        return client

    yield make
    for c in made:
        c.close()
