"""Producers: the Python client (over the gateway), request validation, and the trusted
in-cluster producer (:mod:`.trusted`)."""

from .client import AsyncClient, Batch, Client, Handle, PreparedRequest, RequestTimeout

__all__ = ["AsyncClient", "Batch", "Client", "Handle", "PreparedRequest", "RequestTimeout"]
