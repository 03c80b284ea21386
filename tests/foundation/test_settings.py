"""Settings: the shipped example loads; bad files fail with one line naming file, key, reason."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from tokenmill.config import EXAMPLE_CONFIG, EngineKind, hash_api_key, load_settings
from tokenmill.errors import ConfigError


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def write(text: str) -> Path:
        path = tmp_path / "tokenmill.toml"
        path.write_text(text)
        monkeypatch.setenv("TOKENMILL_CONFIG", str(path))
        return path

    return write


def test_example_config_defines_the_demo_world(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENMILL_CONFIG", raising=False)
    monkeypatch.chdir(EXAMPLE_CONFIG.parent.parent)  # no ./tokenmill.toml there
    s = load_settings()
    assert {"alpha", "beta", "gamma"} <= set(s.tenants)
    assert len({s.tenants[t].tier for t in ("alpha", "beta", "gamma")}) == 3
    assert s.models["sim"].engine is EngineKind.sim
    assert s.models["smollm2"].engine is EngineKind.vllm
    assert s.tenant_for_key("tm-alpha-demo-key") == "alpha"
    assert s.tenant_for_key("tm-alpha-demo-keyX") is None
    card = s.price_card("sim", datetime(2026, 11, 1, tzinfo=timezone.utc))
    assert isinstance(card.input_per_million, Decimal)
    # the embedding model: no text endpoints, and a card that bills input tokens only
    assert s.models["minilm"].embeds and not s.models["minilm"].generates
    assert s.models["sim"].embeds and s.models["sim"].generates and not s.models["smollm2"].embeds
    embed = s.price_card("minilm", datetime(2026, 11, 1, tzinfo=timezone.utc))
    assert embed.output_per_million == 0 < embed.input_per_million


def test_env_overrides_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKENMILL_CONFIG", str(EXAMPLE_CONFIG))  # named, so no fallback question
    monkeypatch.setenv("TOKENMILL_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))
    monkeypatch.setenv("TOKENMILL_SCHEDULER__AGING_S", "7")
    s = load_settings()
    assert s.redis_url == "redis://127.0.0.1:1/0"
    assert s.home == tmp_path and s.scheduler.aging_s == 7
    assert s.ledger_url.endswith("ledger.db")


def test_api_keys_are_stored_hashed() -> None:
    text = EXAMPLE_CONFIG.read_text()
    assert "tm-alpha-demo-key\"" not in text.split("\n", 5)[-1]  # only digests below the header
    assert hash_api_key("tm-alpha-demo-key") in text


MINIMAL = """
[sla.s]
ttft_ms = 1
tpot_ms = 1
e2e_ms = 1
[tiers.t]
weight = 1.0
sla = "s"
[tenants.a]
tier = "t"
[models.m]
engine = "sim"
[[price_cards]]
model = "m"
effective_from = 2026-01-01T00:00:00Z
input_per_million = "1"
output_per_million = "2"
"""


def test_minimal_config_loads(config_file) -> None:
    config_file(MINIMAL)
    assert load_settings().tenant_weight("a") == 1.0


@pytest.mark.parametrize(
    ("mutate", "key", "reason"),
    [
        (lambda t: t.replace('tier = "t"', 'tier = "nope"'), "tenants.a.tier", "unknown tier"),
        (lambda t: t.replace("weight = 1.0", "weight = -1.0"), "tiers.t.weight", "greater than 0"),
        (lambda t: t.replace('engine = "sim"', 'engine = "tpu"'), "models.m.engine", "sim"),
        (lambda t: t.replace('input_per_million = "1"', "input_per_million = 0.1"),
         "price_cards.0.input_per_million", "not a float"),
        (lambda t: t + "\nbogus_key = 1\n", "bogus_key", "not permitted"),
        (lambda t: t.replace('model = "m"', 'model = "x"'), "price_cards.0.model", "unknown model"),
        (lambda t: t.replace('output_per_million = "2"', ""), "price_cards.0.output_per_million",
         "required for 'm', a model that generates text"),
    ],
)
def test_bad_config_fails_with_one_clear_line(config_file, mutate, key: str, reason: str) -> None:
    path = config_file(mutate(MINIMAL))
    with pytest.raises(ConfigError) as info:
        load_settings()
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(str(path)) and key in msg and reason in msg


def test_toml_syntax_error_names_file_and_line(config_file) -> None:
    path = config_file(MINIMAL + "\n[tiers.t\n")
    with pytest.raises(ConfigError, match=rf"{path}.*line \d+"):
        load_settings()


@pytest.mark.parametrize("variable", ["TOKENMILL_KAFKA_URL", "TOKENMILL_REDIS_URL", "TOKENMILL_DATABASE_URL"])
def test_a_deployment_without_a_config_refuses_the_example(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str
) -> None:
    # The example's demo keys are published: only the embedded local stack may use them.
    monkeypatch.delenv("TOKENMILL_CONFIG", raising=False)
    for name in ("TOKENMILL_KAFKA_URL", "TOKENMILL_REDIS_URL", "TOKENMILL_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no ./tokenmill.toml
    assert load_settings().tenants  # local stack: the example
    monkeypatch.setenv(variable, "redis://127.0.0.1:1/0" if "REDIS" in variable else "x:1")
    with pytest.raises(ConfigError, match=f"no config file: {variable}"):
        load_settings()
