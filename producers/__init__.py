"""Producers: the Python client and request validation."""

from .client import AsyncClient, Client, Handle, RequestTimeout

__all__ = ["AsyncClient", "Client", "Handle", "RequestTimeout"]
