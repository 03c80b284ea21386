"""Engine kind → engine. The kind is an enum in the config (:class:`EngineKind`), so an
unknown engine fails when the settings load; bad ``engine_args`` fail here, before
the worker consumes anything.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydantic

from ...config.models import EngineKind, ModelConfig
from ...errors import ConfigError
from ...wire import describe_validation_error
from .base import Engine

__all__ = ["create_engine", "engine_slots", "resolve_home_path"]

HOME_PREFIX = "@home/"


def engine_slots(cfg: ModelConfig) -> int:
    """Sequences an engine of ``cfg`` runs at once: ``max_in_flight`` plus the slots
    only interactive requests take (the scheduler keeps them for those)."""
    return cfg.max_in_flight + cfg.interactive_headroom


def resolve_home_path(value: str, home: Path) -> str:
    """``@home/x`` → ``<home>/x`` (absolute); anything else unchanged."""
    if value.startswith(HOME_PREFIX):
        return str((home / value[len(HOME_PREFIX):]).resolve())
    return value


def _sim(name: str, cfg: ModelConfig, home: Path) -> Engine:
    from .sim import SimEngine, SimTiming

    return SimEngine(SimTiming(**cfg.engine_args), capacity=engine_slots(cfg))


def _vllm(name: str, cfg: ModelConfig, home: Path) -> Engine:
    from .vllm_engine import VllmEngine

    return VllmEngine.from_config(name, cfg, home=home)


def _openai(name: str, cfg: ModelConfig, home: Path) -> Engine:
    from .openai_remote import OpenAIRemoteEngine

    return OpenAIRemoteEngine.from_config(name, cfg)


_BUILDERS: dict[EngineKind, Callable[[str, ModelConfig, Path], Engine]] = {
    EngineKind.sim: _sim,
    EngineKind.vllm: _vllm,
    EngineKind.openai: _openai,
}


def create_engine(model: str, cfg: ModelConfig, *, home: Path) -> Engine:
    """The engine for ``model`` as configured (not started yet).

    Raises:
        ConfigError: ``engine_args`` are invalid for the engine.
    """
    try:
        return _BUILDERS[cfg.engine](model, cfg, home)
    except pydantic.ValidationError as exc:
        raise ConfigError(
            f"models.{model}.engine_args: {describe_validation_error(exc)}"
        ) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"models.{model}.engine_args: {exc}") from exc
