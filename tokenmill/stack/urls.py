"""Service URLs: normalizing Kafka bootstrap addresses and masking secrets for display."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from ..errors import ConfigError

KAFKA_DEFAULT_PORT = 9092
# Schemes people write in front of a Kafka bootstrap address; aiokafka wants none.
_KAFKA_SCHEMES = ("kafka://", "tcp://", "plaintext://")

# ``scheme://user:secret@`` and ``scheme://:secret@`` (Redis's form).
_USERINFO = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/?#@\s]*):[^@/?#\s]*@")
# ``?password=...`` and friends in query strings (libpq, some Redis clients).
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&](?:password|passwd|pwd|secret|token)=)[^&#\s]*", re.IGNORECASE
)


def normalize_kafka_url(url: str) -> str:
    """``kafka://h:p``, ``h:p`` or a comma-separated list of either, as aiokafka's
    ``host:port[,host:port]`` bootstrap string.

    Raises:
        ConfigError: empty, carries credentials (SASL is not configured by URL), or a
            bad port.
    """
    hosts: list[str] = []
    for part in url.split(","):
        part = part.strip()
        for scheme in _KAFKA_SCHEMES:
            if part.lower().startswith(scheme):
                part = part[len(scheme) :]
                break
        part = part.rstrip("/")
        if not part:
            continue
        if "@" in part:
            raise ConfigError(
                f"kafka_url: credentials in the URL are not supported ({mask_url(url)})"
            )
        parsed = urlsplit(f"//{part}")
        try:
            port = parsed.port or KAFKA_DEFAULT_PORT
        except ValueError as exc:
            raise ConfigError(f"kafka_url: bad port in {part!r}") from exc
        if not parsed.hostname:
            raise ConfigError(f"kafka_url: no host in {part!r}")
        host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
        hosts.append(f"{host}:{port}")
    if not hosts:
        raise ConfigError(f"kafka_url: no broker address in {url!r}")
    return ",".join(hosts)


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``; safe to log or print."""
    masked = _USERINFO.sub(lambda m: f"{m['head']}:***@", url)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}***", masked)


def mask_text(text: str, *urls: str) -> str:
    """``text`` (an error message, say) with each of ``urls`` replaced by its masked form,
    then any remaining URL passwords masked."""
    for url in urls:
        if url:
            text = text.replace(url, mask_url(url))
    return mask_url(text)
