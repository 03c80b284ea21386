"""Pure parts of the stack: URL handling, service ordering, spec validation, resolver."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tokenmill.config.settings import Settings

from tokenmill.errors import ConfigError, StackError
from tokenmill.stack import ServiceSpec, endpoints
from tokenmill.stack.spec import start_order
from tokenmill.stack.urls import mask_url, normalize_kafka_url


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("127.0.0.1:9092", "127.0.0.1:9092"),
        ("kafka://broker:19092", "broker:19092"),
        ("kafka://a:1,kafka://b:2/", "a:1,b:2"),
        ("PLAINTEXT://a:1", "a:1"),
        ("broker", "broker:9092"),
        ("kafka://[::1]:9093", "[::1]:9093"),
    ],
)
def test_kafka_url_normalized_for_aiokafka(given: str, expected: str) -> None:
    assert normalize_kafka_url(given) == expected


@pytest.mark.parametrize("bad", ["", "kafka://", "kafka://u:p@h:1", "h:port"])
def test_bad_kafka_url_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError):
        normalize_kafka_url(bad)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("postgresql+psycopg://user:pw@db/ledger", "postgresql+psycopg://user:***@db/ledger"),
        ("redis://h:1/0?password=pw&db=1", "redis://h:1/0?password=***&db=1"),
        ("sqlite:////tmp/ledger.db", "sqlite:////tmp/ledger.db"),
        ("127.0.0.1:9092", "127.0.0.1:9092"),
    ],
)
def test_mask_url(given: str, expected: str) -> None:
    assert mask_url(given) == expected


def _spec(name: str, *deps: str) -> ServiceSpec:
    return ServiceSpec(name=name, argv=lambda launch: ["true"], depends_on=deps)


def test_start_order_puts_dependencies_first_and_keeps_order_otherwise() -> None:
    specs = [_spec("worker", "scheduler", "redis"), _spec("flower"), _spec("scheduler", "kafka")]
    order = start_order(specs, satisfied={"kafka", "redis"})
    assert [s.name for s in order] == ["flower", "scheduler", "worker"]


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([_spec("a"), _spec("a")], "defined twice"),
        ([_spec("a", "ghost")], "unknown service 'ghost'"),
        ([_spec("a", "b"), _spec("b", "a")], "cycle"),
    ],
)
def test_start_order_rejects(specs: list[ServiceSpec], message: str) -> None:
    with pytest.raises(StackError, match=message):
        start_order(specs)


def test_spec_validates_name_and_probe() -> None:
    with pytest.raises(StackError, match="unknown health probe"):
        ServiceSpec(name="x", argv=lambda launch: ["true"], probe="telepathy")
    with pytest.raises(StackError, match="bad service name"):
        ServiceSpec(name="../etc", argv=lambda launch: ["true"])


def test_configured_urls_win(
    settings: Callable[[], Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENMILL_KAFKA_URL", "kafka://k:1")
    monkeypatch.setenv("TOKENMILL_REDIS_URL", "redis://r:2/0")
    ep = endpoints(settings())
    assert (ep.kafka_bootstrap, ep.redis_url) == ("k:1", "redis://r:2/0")
    assert ep.database_url.startswith("sqlite:///") and ep.database_url.endswith("ledger.db")


def test_nothing_configured_nor_up_says_run_up(settings: Callable[[], Settings]) -> None:
    with pytest.raises(StackError, match="run `tokenmill up` first"):
        endpoints(settings())
