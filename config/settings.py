"""Settings: ``TOKENMILL_*`` environment variables over a TOML file.

The file is ``$TOKENMILL_CONFIG``, else ``./tokenmill.toml``, else the shipped
example (``config/example.toml``). A bad file fails at start with one line naming
the file, the key and the reason (:class:`~tokenmill.errors.ConfigError`).
"""

from __future__ import annotations

import hmac
import os
import tomllib
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import pydantic
from pydantic import Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from ..errors import ConfigError
from ..pricing import PriceBook
from .models import (
    BatchSettings,
    GatewaySettings,
    ModelConfig,
    PriceCard,
    SchedulerSettings,
    SlaClass,
    Tenant,
    Tier,
    WebhookSettings,
    hash_api_key,
)

EXAMPLE_CONFIG = Path(__file__).with_name("example.toml")


#: set to any of these, the services are a deployment, not the embedded local stack
_EXTERNAL = ("TOKENMILL_KAFKA_URL", "TOKENMILL_REDIS_URL", "TOKENMILL_DATABASE_URL")


def config_path() -> Path:
    """``$TOKENMILL_CONFIG``, else ``./tokenmill.toml``, else — for the embedded local
    stack only — the shipped example.

    Raises:
        ConfigError: no config and external services configured: a deployment must not
            run with the example's published demo keys.
    """
    explicit = os.environ.get("TOKENMILL_CONFIG")
    if explicit:
        return Path(explicit)
    local = Path("tokenmill.toml")
    if local.exists():
        return local
    external = [name for name in _EXTERNAL if os.environ.get(name)]
    if external:
        raise ConfigError(
            f"no config file: {', '.join(external)} point at a deployment, so set TOKENMILL_CONFIG "
            "or put a tokenmill.toml here (the shipped example, with its published demo keys, "
            "serves only the embedded local stack)"
        )
    return EXAMPLE_CONFIG


class _TomlSource(PydanticBaseSettingsSource):
    """Reads the TOML file once; syntax errors name the file and the line."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path):
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ returns the whole mapping

    def __call__(self) -> dict[str, Any]:
        try:
            with self.path.open("rb") as fh:
                return tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"{self.path}: config file not found") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{self.path}: invalid TOML: {exc}") from exc


class Settings(BaseSettings):
    """All of tokenmill's settings."""

    model_config = SettingsConfigDict(
        env_prefix="TOKENMILL_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    #: state directory of the local stack (broker/redis data, ledger.db, logs, caches)
    home: Path = Path(".tokenmill")
    #: external services; empty means "use the embedded local stack"
    kafka_url: str | None = None
    redis_url: str | None = None
    database_url: str | None = None
    log_level: str = "INFO"

    tiers: dict[str, Tier] = Field(default_factory=dict)
    tenants: dict[str, Tenant] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    price_cards: list[PriceCard] = Field(default_factory=list)
    sla: dict[str, SlaClass] = Field(default_factory=dict)
    scheduler: SchedulerSettings = SchedulerSettings()
    batch: BatchSettings = BatchSettings()
    webhooks: WebhookSettings = WebhookSettings()
    gateway: GatewaySettings = GatewaySettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls, config_path()))

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        for name, tier in self.tiers.items():
            if tier.sla not in self.sla:
                raise ValueError(f"tiers.{name}.sla: unknown SLA class {tier.sla!r}")
        for name, tenant in self.tenants.items():
            if tenant.tier not in self.tiers:
                raise ValueError(f"tenants.{name}.tier: unknown tier {tenant.tier!r}")
        for i, card in enumerate(self.price_cards):
            if card.model not in self.models:
                raise ValueError(f"price_cards.{i}.model: unknown model {card.model!r}")
            if "output_per_million" not in card.model_fields_set and self.models[card.model].generates:
                raise ValueError(
                    f"price_cards.{i}.output_per_million: required for {card.model!r}, a model that "
                    "generates text (only an embedding model's card may leave it out)"
                )
        starts: dict[tuple[str, datetime], int] = {}
        for i, card in enumerate(self.price_cards):
            first = starts.setdefault((card.model, card.effective_from), i)
            if first != i:  # which would be in force there is undefined
                raise ValueError(
                    f"price_cards.{i}: same model and effective_from as price_cards.{first}"
                )
        for name in self.models:
            if not any(c.model == name for c in self.price_cards):
                raise ValueError(f"models.{name}: no price card for this model")
        return self

    # -- derived views ---------------------------------------------------

    def tenant_weight(self, tenant: str) -> float:
        t = self.tenants[tenant]
        return t.weight if t.weight is not None else self.tiers[t.tier].weight

    def tenant_sla(self, tenant: str) -> SlaClass:
        return self.sla[self.tiers[self.tenants[tenant].tier].sla]

    def pool_of(self, model: str) -> str:
        return self.models[model].pool or model

    def price_card(self, model: str, at: datetime) -> PriceCard:
        """The card in force for ``model`` at ``at`` (see :class:`~tokenmill.pricing.PriceBook`).

        Raises:
            ConfigError: no card for the model had started by then.
        """
        card = self.price_book.in_force(model, at)  # the scheduler asks once per request
        if card is None:
            raise ConfigError(f"no price card for model {model!r} in force at {at.isoformat()}")
        return card

    @cached_property
    def price_book(self) -> PriceBook[PriceCard]:
        """The configured price cards, looked up by model and instant."""
        return PriceBook(self.price_cards)

    def tenant_for_key(self, api_key: str) -> str | None:
        """The tenant holding ``api_key``: its digest is compared with every stored one
        in constant time, so the time taken says nothing about which (if any) matched."""
        digest = hash_api_key(api_key)
        found = None
        for d, name in self._tenant_of_digest:
            if hmac.compare_digest(digest, d):
                found = name
        return found

    @cached_property
    def _tenant_of_digest(self) -> tuple[tuple[str, str], ...]:
        return tuple((d, name) for name, t in self.tenants.items() for d in t.api_key_sha256)

    @property
    def files_dir(self) -> Path:
        """Where uploaded files live."""
        return self.gateway.files_dir or self.home / "files"

    @cached_property
    def ledger_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'ledger.db').resolve()}"


def load_settings(**overrides: Any) -> Settings:
    """Load and validate settings, or raise :class:`ConfigError` with one clear line."""
    path = config_path()
    try:
        return Settings(**overrides)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "<top level>"
        msg = err["msg"].removeprefix("Value error, ")
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise ConfigError(f"{path}: {key}: {msg}{more}") from None
