"""Every code example in the README runs, exactly as printed, against a local stack
started as the README says (`tokenmill up`, the example config, the gateway on 8080)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def blocks(language: str) -> list[str]:
    return [code for lang, code in BLOCK.findall(README.read_text()) if lang == language]


def runnable_sh() -> list[str]:
    """The shell examples; those calling `make` are the set-up and development commands
    that CI itself runs (`make test`) or that build the machine (`make demo`)."""
    return [b for b in blocks("sh") if not re.search(r"^make ", b, re.MULTILINE)]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENMILL_", "OPENAI_"))}
    env["TOKENMILL_HOME"] = str(home)  # where the examples' stack lives; the code is untouched
    return env


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("readme") / "home"
    tm = [sys.executable, "-m", "tokenmill"]
    up = subprocess.run([*tm, "up"], cwd=ROOT, env=_env(home), capture_output=True, text=True, timeout=180,
                        check=False)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        state = json.loads((home / "stack.json").read_text())
        gateway = next(s["address"] for s in state["services"] if s["name"] == "gateway")
        assert gateway == "http://127.0.0.1:8080", f"the README's examples need the gateway on 8080, got {gateway}"
        yield home
    finally:
        subprocess.run([*tm, "down"], cwd=ROOT, env=_env(home), capture_output=True, timeout=120, check=False)


def test_the_readme_has_the_examples_this_test_runs() -> None:
    assert len(blocks("python")) == 2
    assert "make demo" in blocks("sh")[0] and "make test" in blocks("sh")[0], "the README opens with them"
    assert len(runnable_sh()) == 1


def test_openai_sdk_example(home: Path) -> None:
    code = blocks("python")[0]
    assert 'OpenAI(base_url="http://127.0.0.1:8080/v1"' in code
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(home), capture_output=True,
                         text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("completed ") and "total=100" in lines[0] and "completed=100" in lines[0]
    assert re.match(r"q\d+ +\S", lines[1])
    assert len(lines[2].split()) == 16  # the streamed answer: 16 tokens of the simulated engine


def test_python_client_example(home: Path) -> None:
    run = subprocess.run([sys.executable, "-c", blocks("python")[1]], cwd=ROOT, env=_env(home),
                         capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout.splitlines()
    assert len(out[0].split()) == 8
    assert "200 tokens" in run.stdout  # 50 items x 4 tokens
    assert out[-1] == "completed 3 answers, 0 errors"


def test_command_line_example(home: Path) -> None:
    # Last: the block ends with `tokenmill down` (the fixture's down is then a no-op).
    [script] = runnable_sh()
    before = set(ROOT.iterdir())
    run = subprocess.run(["bash", "-e", "-c", script], cwd=ROOT, env={**_env(home), "COLUMNS": "200"},
                         capture_output=True, text=True, timeout=300, check=False)
    # `batch submit --wait` writes the batch's output and error files where it runs.
    written = set(ROOT.iterdir()) - before
    for path in written:
        path.unlink()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name.split("_", 2)[-1] for p in written) == ["errors.jsonl", "output.jsonl"]
    assert "completed" in run.stdout + run.stderr
    assert not (home / "stack.json").exists()
