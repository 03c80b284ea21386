"""Typed settings: tenants, tiers, models, price cards, SLA classes."""

from .models import (
    Budget,
    EngineKind,
    ModelConfig,
    PriceCard,
    RateLimit,
    SlaClass,
    Tenant,
    Tier,
    hash_api_key,
)
from .settings import EXAMPLE_CONFIG, Settings, config_path, load_settings

__all__ = [
    "EXAMPLE_CONFIG",
    "Budget",
    "EngineKind",
    "ModelConfig",
    "PriceCard",
    "RateLimit",
    "Settings",
    "SlaClass",
    "Tenant",
    "Tier",
    "config_path",
    "hash_api_key",
    "load_settings",
]
