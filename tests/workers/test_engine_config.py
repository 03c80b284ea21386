"""Engine construction from the config, sampling parameters and response bodies
(no engine is started here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenmill.config.models import EngineKind, ModelConfig
from tokenmill.workers.engines.base import prompt_of, sampling_options
from tokenmill.workers.engines.factory import create_engine, resolve_home_path
from tokenmill.workers.engines.openai_remote import OpenAIRemoteEngine
from tokenmill.workers.engines.sim import SimEngine
from tokenmill.workers.responses import completion_body
from workers_helpers import chat_request, completion_request

from tokenmill.errors import ConfigError, ValidationError
from tokenmill.wire import Usage


def test_factory_builds_each_kind(tmp_path: Path) -> None:
    sim = create_engine("sim", ModelConfig(engine=EngineKind.sim, max_in_flight=5), home=tmp_path)
    assert isinstance(sim, SimEngine) and sim.simulated and sim.capacity == 5
    remote = create_engine(
        "m", ModelConfig(engine=EngineKind.openai, engine_args={"base_url": "http://127.0.0.1:1/v1"}),
        home=tmp_path,
    )
    assert isinstance(remote, OpenAIRemoteEngine) and remote.model == "m" and not remote.simulated


def test_interactive_headroom_adds_engine_slots(tmp_path: Path) -> None:
    """The headroom slots are the engine's too: the scheduler keeps them for interactive
    requests, the engine runs them like any other."""
    cfg = ModelConfig(engine=EngineKind.sim, max_in_flight=5, interactive_headroom=2)
    assert create_engine("sim", cfg, home=tmp_path).capacity == 7
    remote = ModelConfig(engine=EngineKind.openai, max_in_flight=5, interactive_headroom=2,
                         engine_args={"base_url": "http://127.0.0.1:1/v1"})  # fmt: skip
    assert create_engine("m", remote, home=tmp_path).capacity == 7


HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")
def test_vllm_engine_args_resolve_home(tmp_path: Path) -> None:
    cfg = ModelConfig(
        engine=EngineKind.vllm, max_in_flight=12,
        engine_args={"model": "@home/models/x", "dtype": "float32", "frontend": "inproc", "batch_interval": 32},
    )
    engine = create_engine("x", cfg, home=tmp_path)
    assert engine.engine_args["model"] == str((tmp_path / "models" / "x").resolve())  # type: ignore[attr-defined]
    assert engine.engine_args["max_num_seqs"] == 12 == engine.capacity  # type: ignore[attr-defined]
    assert "frontend" not in engine.engine_args and engine.batch_interval == 32  # type: ignore[attr-defined]
    assert engine.engine_args["served_model_name"] == "x"  # type: ignore[attr-defined]
    assert engine.engine_args["scheduling_policy"] == "priority"  # type: ignore[attr-defined]
    headroom = create_engine(
        "x", cfg.model_copy(update={"interactive_headroom": 3, "engine_args": {
            **cfg.engine_args, "scheduling_policy": "fcfs"}}), home=tmp_path,
    )  # fmt: skip
    assert headroom.engine_args["max_num_seqs"] == 15 == headroom.capacity  # type: ignore[attr-defined]
    assert headroom.engine_args["scheduling_policy"] == "fcfs"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kind", "args"),
    [
        (EngineKind.sim, {"decode_ms": 1}),
        (EngineKind.sim, {"decode_ms_per_step": -1}),
        (EngineKind.openai, {}),
        (EngineKind.openai, {"base_url": "http://x/v1", "retries": 2}),
        (EngineKind.vllm, {"dtype": "float32"}),
        (EngineKind.vllm, {"model": "m", "frontend": "grpc"}),
    ],
)
def test_bad_engine_args_fail_before_serving(tmp_path: Path, kind: EngineKind, args: dict) -> None:
    with pytest.raises(ConfigError, match="models.m.engine_args"):
        create_engine("m", ModelConfig(engine=kind, engine_args=args), home=tmp_path)


def test_resolve_home_path(tmp_path: Path) -> None:
    assert resolve_home_path("@home/a/b", tmp_path) == str((tmp_path / "a" / "b").resolve())
    assert resolve_home_path("/abs/model", tmp_path) == "/abs/model"


def test_sampling_options_are_read_and_checked() -> None:
    opts = sampling_options(chat_request("m", max_tokens=9, temperature=0.2, stop="x", seed=3, top_k=5))
    assert (opts.max_tokens, opts.temperature, opts.stop, opts.seed, opts.top_k) == (9, 0.2, ("x",), 3, 5)
    for bad in ({"n": 2}, {"temperature": 3}, {"top_p": "a"}, {"stop": [1]}, {"logprobs": True},
                {"seed": 1.5}, {"temperature": True}):
        with pytest.raises(ValidationError):
            sampling_options(chat_request("m", **bad))


def test_prompt_of_each_endpoint() -> None:
    assert prompt_of(completion_request("m", "hi")) == "hi"
    assert prompt_of(completion_request("m", ["one"])) == "one"  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        prompt_of(completion_request("m", [1, 2]))  # type: ignore[list-item]
    assert prompt_of(chat_request("m", "yo")) == [{"role": "user", "content": "yo"}]


@given(prompt=st.integers(0, 10_000), completion=st.integers(0, 10_000), sim=st.booleans())
def test_response_bodies_are_openai_shaped(prompt: int, completion: int, sim: bool) -> None:
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion)
    chat = completion_body(chat_request("m"), "hey", "stop", usage, simulated=sim)
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-req_")
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hey"}
    assert chat["usage"]["total_tokens"] == prompt + completion
    assert chat.get("simulated", False) is sim and (chat["system_fingerprint"] == "simulated") is sim
    text = completion_body(completion_request("m"), "hey", "length", usage)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "hey"


@given(key=st.binary(min_size=1, max_size=64), n=st.integers(1, 64))
def test_key_partition_matches_kafkas_default(key: bytes, n: int) -> None:
    from aiokafka.partitioner import DefaultPartitioner

    from tokenmill.kafka import key_partition

    parts = list(range(n))
    assert key_partition(key, parts, parts) == DefaultPartitioner()(key, parts, parts)
    assert key_partition(key, parts, []) == key_partition(key, parts, parts)  # cached
