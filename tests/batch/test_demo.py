"""``tokenmill demo``: the main job's steps, run end to end on the simulated engine (the
real demo uses SmolLM2 on vLLM; the flow is the same)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from batch_stack import stack_config
from tokenmill.producers.demo import EXAMPLE_BATCH, split_by_tenant


def test_example_batch_splits_into_one_file_per_tenant_unchanged() -> None:
    data = EXAMPLE_BATCH.read_bytes()
    groups = split_by_tenant(data, {"alpha", "beta", "gamma"})
    assert set(groups) == {"alpha", "beta", "gamma"}
    lines = [ln for g in groups.values() for ln in g.splitlines()]
    assert sorted(lines) == sorted(data.splitlines())
    for tenant, group in groups.items():
        assert all(json.loads(ln)["custom_id"].startswith(tenant + "-") for ln in group.splitlines())
    swapped = split_by_tenant(data, {"alpha", "beta", "gamma"}, model="sim")
    assert {json.loads(ln)["body"]["model"] for g in swapped.values() for ln in g.splitlines()} == {"sim"}


@pytest.mark.slow
def test_demo_runs_the_main_job_end_to_end(tmp_path: Path) -> None:
    cfg = tmp_path / "tokenmill.toml"
    cfg.write_text(stack_config())
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_")}
    env.update(TOKENMILL_HOME=str(tmp_path / "home"), TOKENMILL_CONFIG=str(cfg), COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "tokenmill", "demo", "--model", "sim"], env=env,
                          capture_output=True, text=True, timeout=240, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for step in ("1. tokenmill up --model sim", "2. example_batch.jsonl through the gateway with the openai SDK", "3. a streamed chat completion",
                 "sample of the output", "usage and bill per tenant", "tokenmill down", "stopped:"):
        assert step in out, step
    assert out.count(" completed ") >= 3
    assert "(ledger, this month)" in out, "the bill should come from the ledger's invoices"
    assert not (tmp_path / "home" / "stack.json").exists(), "the demo stops the stack"
