"""tokenmill: queue-based batch and stream processing for self-hosted LLM inference."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Client", "TokenmillError", "__version__"]

from .errors import TokenmillError

if TYPE_CHECKING:
    from .producers.client import AsyncClient, Client


def __getattr__(name: str) -> Any:
    # The clients pull in httpx and pydantic models; import them only when asked for.
    if name in ("Client", "AsyncClient"):
        from .producers import client

        return getattr(client, name)
    raise AttributeError(name)
