"""Prompt tokens are counted before reserving exactly as the engine bills them (sim,
vLLM) or bounded from above (remote servers), for prompts whose token count is far
from their characters ÷ 4."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenmill.config.models import EngineKind, ModelConfig

from tokenmill.tokens import counter_for, sim_prompt_tokens

HERE = Path(__file__).resolve().parent
#: prompts whose token count is far above chars/4: one-letter words, digits, CJK
DENSE = [
    "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 4,
    " ".join(str(d) for d in range(200)),
    "漢字かな交じり文、東京都の天気は晴れです。" * 5,
    "ü é ñ ø ß 🙂 🙂 🙂",
]
BODIES = [
    {"messages": [{"role": "user", "content": "hello world"}]},
    {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": DENSE[0]},
        ]
    },
    {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": DENSE[2]}, {"type": "text", "text": DENSE[1]}],
            }
        ]
    },
    {
        "messages": [
            {"role": "user", "content": DENSE[3]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "x"},
        ]
    },
    {"prompt": DENSE[1]},
    {"prompt": "x"},
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenmill.workers.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_sim_counts_words_so_dense_prompts_count_above_chars_over_4() -> None:
    count = counter_for("sim", ModelConfig(engine=EngineKind.sim), Path("."))
    body = {"messages": [{"role": "user", "content": DENSE[0]}]}
    assert count(body) == 104 + 4 + 2 > len(DENSE[0]) // 4 + 6
    assert count({"prompt": DENSE[1]}) == 200
    assert (
        sim_prompt_tokens(
            [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a b"}, {"type": "text", "text": "c"}],
                }
            ]
        )
        == 3 + 4 + 2
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.text(st.sampled_from("ab 0123456789漢字かなü🙂\n\t.,"), max_size=200),
        min_size=1,
        max_size=5,
    )
)
def test_remote_bound_is_above_a_real_tokenizers_count(
    tiny_model: Path, contents: list[str]
) -> None:
    vllm = counter_for(
        "tiny",
        ModelConfig(engine=EngineKind.vllm, engine_args={"model": str(tiny_model)}),
        Path("."),
    )
    remote = counter_for("remote", ModelConfig(engine=EngineKind.openai), Path("."))
    chat = {"messages": [{"role": "user", "content": c} for c in contents]}
    assert remote(chat) >= vllm(chat)
    prompt = {"prompt": "".join(contents) or "x"}
    assert remote(prompt) >= vllm(prompt)


@pytest.mark.vllm
def test_vllm_count_equals_the_engines_prompt_tokens(tiny_model: Path, tmp_path: Path) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"vLLM is missing in CI: {exc}")
        pytest.skip(f"vLLM is not installed: {exc}")
    run = subprocess.run(
        [
            sys.executable,
            str(HERE / "vllm_prompt_counts.py"),
            str(tiny_model),
            str(tmp_path),
            json.dumps(BODIES),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("COUNTS ")), None)
    assert line is not None, run.stdout[-2000:] + run.stderr[-4000:]
    counts = json.loads(line.removeprefix("COUNTS "))
    assert len(counts) == len(BODIES)
    for (engine, ours), body in zip(counts, BODIES):
        assert engine == ours, body
    assert counts[4][0] > len(DENSE[1]) // 4 + 1  # the old chars/4 estimate fell short
