"""Batch objects and output expiry, without a stack: ``batch_json`` and the webhook's
``batch_data`` parse as ``openai.types.Batch`` with every field OpenAI defines; a
batch's output files expire ``output_expires_after`` after they are made, the cleanup
(``expire_outputs``) removes them then — and only them — and the batch says so; the
batch runner looks for expired outputs at most every ``expire_every_s``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, cast

import openai
import pytest
from tokenmill.config.settings import load_settings
from tokenmill.gateway.batches import batch_json
from tokenmill.ledger import BatchSummary, batch_file_id, get_file, shared_factory, transaction
from tokenmill.producers import batch_runner
from tokenmill.producers.batch_files import BatchDir
from tokenmill.producers.batch_runner import BatchRunner
from tokenmill.producers.batches import (
    Batches,
    BatchView,
    OutputExpired,
    batch_data,
    expire_outputs,
)

from tokenmill.errors import NotFound
from tokenmill.wire import Batch, BatchStatus, Endpoint, RequestCounts

HOUR = 3600


def strict_batch(data: dict[str, Any]) -> openai.types.Batch:
    """``data`` as OpenAI's Batch, every field of it present (None counts)."""
    b = openai.types.Batch.model_validate(data)
    missing = set(openai.types.Batch.model_fields) - b.model_fields_set
    assert not missing, f"batch object lacks {sorted(missing)}"
    return b


def test_batch_objects_have_every_openai_field() -> None:
    now = time.time()
    running = Batch(id="batch_x", tenant="alpha", endpoint=Endpoint.chat_completions,
                    status=BatchStatus.in_progress, input_file="/x", created_at=now, expires_at=now + 60,
                    in_progress_at=now, request_counts=RequestCounts(total=3, completed=1, failed=1),
                    metadata={"k": "v"})  # fmt: skip
    fresh = BatchSummary(input_file_id="file-1", model=None, input_tokens=0, output_tokens=0)
    error = {"code": "invalid_json", "line": 2, "message": "line 2: bad", "param": None}
    b = strict_batch(batch_json(BatchView(running, fresh, [error])))
    assert b.errors is not None and b.errors.data and b.errors.data[0].line == 2
    assert b.usage is not None and b.usage.total_tokens == 0

    ended = running.model_copy(update={"status": BatchStatus.completed, "completed_at": now + 5,
                                       "output_file": "/o", "error_file": "/e"})  # fmt: skip
    done = BatchSummary(input_file_id="file-1", model="sim", input_tokens=7, output_tokens=5,
                        output_expires_after={"anchor": "created_at", "seconds": HOUR},
                        output_expires_at=now + 5 + HOUR)  # fmt: skip
    raw = batch_json(BatchView(ended, done, []))
    b = strict_batch(raw)
    assert (b.output_file_id, b.error_file_id) == (batch_file_id("batch_x", "output"), batch_file_id("batch_x", "error"))
    assert b.usage is not None and (b.usage.input_tokens, b.usage.output_tokens, b.usage.total_tokens) == (7, 5, 12)
    assert raw["output_expires_after"] == {"anchor": "created_at", "seconds": HOUR}
    assert raw["output_expires_at"] == int(now + 5 + HOUR) and raw["output_expired_at"] is None
    json.dumps(raw)

    hook = batch_data(ended, done)  # the webhook's data: the same object, less the errors list
    assert {k: v for k, v in hook.items() if k != "output_expires_at"} == {
        k: v for k, v in raw.items() if k not in ("errors", "output_expires_after", "output_expires_at",
                                                  "output_expired_at")}  # fmt: skip
    strict_batch({**hook, "errors": None})
    assert "usage" not in batch_data(ended), "no summary, no usage"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    for key in [k for k in os.environ if k.startswith("TOKENMILL_")]:
        monkeypatch.delenv(key)
    return load_settings(home=tmp_path)


def invalid_only(n: int) -> bytes:
    """A batch file of ``n`` lines that are not JSON: the batch fails at creation, its
    error file made at once."""
    return b"".join(b"not json %d\n" % i for i in range(n))


def test_expired_outputs_are_removed_once_and_the_batch_says_so(settings: Any) -> None:
    soon = Batches(settings, "alpha").create(invalid_only(2), output_expires_after={"anchor": "created_at",
                                                                                    "seconds": HOUR})
    later = Batches(settings, "beta").create(invalid_only(1), output_expires_after={"anchor": "created_at",
                                                                                    "seconds": 2 * HOUR})
    never = Batches(settings, "beta").create(invalid_only(1))
    assert soon.status is BatchStatus.failed
    alpha = Batches(settings, "alpha")
    view = alpha.view(soon.id)
    assert view.summary.output_expires_at == pytest.approx(soon.created_at + HOUR)
    assert not view.summary.output_expired(time.time())
    page = alpha.partial(soon.id)
    assert [r.kind for r in page.rows] == ["error", "error"] and page.ended and not page.has_more
    factory = shared_factory(settings.ledger_url)
    with transaction(factory) as s:
        f = get_file(s, "alpha", batch_file_id(soon.id, "error"))
    assert f.expires_at == pytest.approx(soon.created_at + HOUR) and not f.expired(time.time())

    assert expire_outputs(settings) == [], "nothing due yet"
    at = soon.created_at + HOUR + 1
    assert expire_outputs(settings, now=at) == [soon.id]
    d = BatchDir.of(settings.home, soon.id)
    assert not d.output.exists() and not d.errors.exists()
    assert d.input.exists() and d.invalid.exists(), "the input and the batch's line errors stay"
    view = alpha.view(soon.id)
    assert view.summary.output_expired_at == pytest.approx(at) and view.summary.output_expired(time.time())
    assert len(view.errors) == 2, "the batch object keeps its errors"
    raw = batch_json(view)
    strict_batch(raw)
    assert raw["output_expired_at"] == int(at) and raw["error_file_id"] == batch_file_id(soon.id, "error")
    with pytest.raises(OutputExpired) as exc:
        alpha.partial(soon.id)
    assert "expired" in str(exc.value) and isinstance(exc.value, NotFound)
    with transaction(factory) as s:  # the rows are marked expired by the cleanup's time
        for kind in ("output", "error"):
            assert get_file(s, "alpha", batch_file_id(soon.id, kind)).expired(at)

    assert expire_outputs(settings, now=at + 1) == [], "removed once"
    for other in (later, never):  # another tenant's batches: not due, or no expiry
        d = BatchDir.of(settings.home, other.id)
        assert d.output.exists() and d.errors.exists()
        assert Batches(settings, "beta").view(other.id).summary.output_expired_at is None
        assert len(Batches(settings, "beta").partial(other.id).rows) == 1
    with pytest.raises(NotFound) as other_tenant:
        Batches(settings, "beta").partial(soon.id)
    assert not isinstance(other_tenant.value, OutputExpired), "another tenant's id says nothing of it"
    assert expire_outputs(settings, now=later.created_at + 2 * HOUR + 1) == [later.id]
    assert BatchDir.of(settings.home, never.id).errors.exists()


def test_the_runner_looks_for_expired_outputs_at_most_every_expire_every_s(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[float] = []
    due = {"n": 0}

    def fake(_settings: Any, *, factory: Any, limit: int) -> list[str]:
        calls.append(time.monotonic())
        n, due["n"] = due["n"], 0
        return [f"b{i}" for i in range(n)]

    monkeypatch.setattr(batch_runner, "expire_outputs", fake)
    runner = BatchRunner(settings, cast(Any, None), expire_every_s=3600)
    runner.factory = None
    runner._expire_outputs()
    runner._expire_outputs()
    assert len(calls) == 1, "once per expire_every_s"
    runner._expire_next = 0.0
    due["n"] = batch_runner._EXPIRE_LIMIT  # a full page: more may be due
    runner._expire_outputs()
    runner._expire_outputs()
    runner._expire_outputs()
    assert len(calls) == 3, "a full page looks again on the next poll, then waits"
