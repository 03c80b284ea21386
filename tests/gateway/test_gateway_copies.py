"""Two gateway processes on different ports in front of one stack: a request accepted by
one is read, waited for, cancelled and scoped by the other; a batch made through one
(its file uploaded there) is run by the batch runner and its output read through the
other; both announce themselves with their address. Real processes, official SDK."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import redis
from batch_stack import Stack, wait_for
from conftest import KEYS

from tokenmill.presence import live_instances
from tokenmill.stack import processes


@pytest.fixture(scope="module")
def second(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Another gateway on the stack, on a port of its own: its base URL."""
    port = processes.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_")}
    env.update(stack.client_env())
    log = tmp_path_factory.mktemp("second-gateway") / "gateway.log"
    proc = processes.start([sys.executable, "-m", "tokenmill", "gateway", "--host", "127.0.0.1",
                            "--port", str(port)], log, env=env)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for("the second gateway ready", ready, timeout=60, every=0.3)
        yield url
    finally:
        processes.stop_pid(proc.pid)


def api(base: str, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=60)


def submit(client: httpx.Client, content: str, max_tokens: int, model: str = "sim") -> str:
    r = client.post("/v1/tokenmill/requests", json={
        "body": {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def test_both_copies_announce_their_address(stack: Stack, gateway: str, second: str) -> None:
    client = redis.Redis.from_url(stack.client_env()["TOKENMILL_REDIS_URL"])

    seen: set[str] = set()

    def both() -> bool:  # (a copy's announcement may lapse a moment on a loaded machine)
        seen.update(i.detail.get("address") for i in live_instances(client) if i.service == "gateway")
        return {gateway, second} <= seen

    wait_for("both gateways announced", both, timeout=30)
    assert seen == {gateway, second}


def test_a_request_taken_by_one_copy_is_served_by_the_other(gateway: str, second: str) -> None:
    with api(second, "alpha") as two, api(gateway, "alpha") as one, api(gateway, "beta") as other:
        rid = submit(two, "hello there", 4)
        got = one.get(f"/v1/tokenmill/requests/{rid}", params={"wait": 30}).json()
        assert (got["status"], got["usage"]["completion_tokens"]) == ("succeeded", 4)
        assert other.get(f"/v1/tokenmill/requests/{rid}").status_code == 404  # scoped on every copy
        # Cancelled through the copy that did not take it: it ends cancelled, early.
        slow = submit(one, "a long one", 400, model="slowsim")  # 20 ms a token: ~8 s
        started = time.monotonic()
        assert two.post(f"/v1/tokenmill/requests/{slow}/cancel").status_code == 200
        ended = one.get(f"/v1/tokenmill/requests/{slow}", params={"wait": 30}).json()
        assert ended["status"] == "cancelled" and time.monotonic() - started < 6


def test_a_batch_made_through_one_copy_is_read_through_the_other(gateway: str, second: str) -> None:
    lines = b"".join(
        b'{"custom_id": "c%d", "method": "POST", "url": "/v1/chat/completions", '
        b'"body": {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}\n' % i
        for i in range(10))
    two = openai.OpenAI(base_url=second + "/v1", api_key=KEYS["gamma"], max_retries=0, timeout=60)
    one = openai.OpenAI(base_url=gateway + "/v1", api_key=KEYS["gamma"], max_retries=0, timeout=60)
    upload = two.files.create(file=("in.jsonl", lines), purpose="batch")
    batch = two.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_for("the batch completes", lambda: (b := one.batches.retrieve(batch.id)).status == "completed" and b,
                    timeout=60, every=0.3)
    assert done.request_counts.completed == 10  # type: ignore[union-attr]
    output = one.files.content(done.output_file_id).text  # type: ignore[union-attr]
    assert [line.split('"custom_id":"')[1].split('"')[0] for line in output.splitlines()] == [
        f"c{i}" for i in range(10)]
    assert one.files.content(upload.id).content == lines  # the upload, through the other copy
