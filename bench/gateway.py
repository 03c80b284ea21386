"""The gateway benchmark: tenants' HTTP through the whole pipeline, against the
trusted direct-Kafka path and a bare uvicorn endpoint, on one fresh local stack.

* ``http_requests_per_s``: non-streamed chat completions/s end to end (gateway → Kafka
  → scheduler → Celery worker on the zero-cost SIMULATED engine → result → HTTP answer)
  from many concurrent keep-alive connections;
* ``direct_requests_per_s``: the same requests through the trusted producer
  (``bench/pipeline.py``'s end-to-end figure), measured in the same run;
* ``bare_http_requests_per_s``: the same load generator against a uvicorn endpoint
  that answers a fixed JSON at once — what HTTP itself costs on this machine;
* ``http_added_latency_p50_ms`` / ``_p99_ms``: at 20 requests/s, a chat completion's
  round trip through the gateway minus the same request's round trip through the
  trusted producer (medians and 99th percentiles of each path);
* ``batch_lines_per_s``: batch lines/s through the Files and Batches API (upload,
  create, run, completed; output downloaded).

    python bench/gateway.py [--requests 20000] [--connections 512] [--lines 20000]

The load generator writes HTTP/1.1 by hand on asyncio streams so that the client costs
little of the machine's two cores. Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import LocalStack, e2e_throughput, pct

from tokenmill import loops

KEY = "tm-alpha-demo-key"


def _request(host: str, path: str, body: bytes, key: str = KEY) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> tuple[int, bytes]:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, await reader.readexactly(length)


async def load(url: str, path: str, bodies: list[bytes], connections: int) -> float:
    """Send every body once over ``connections`` keep-alive connections; requests/s."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    raws = [_request(f"{host}:{port}", path, b) for b in bodies]
    next_i = 0
    failures: list[str] = []

    async def one_connection() -> None:
        nonlocal next_i
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while next_i < len(raws):
                i, next_i = next_i, next_i + 1
                status, body = await _exchange(reader, writer, raws[i])
                if status != 200:
                    failures.append(f"{status}: {body[:200]!r}")
        finally:
            writer.close()

    t0 = time.perf_counter()
    async with asyncio.timeout(900):
        await asyncio.gather(*(one_connection() for _ in range(connections)))
    elapsed = time.perf_counter() - t0
    if failures:
        raise SystemExit(f"{len(failures)} of {len(raws)} requests failed, first: {failures[0]}")
    return len(raws) / elapsed


def _chat(i: int, model: str = "bench") -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": f"p{i}"}],
                       "max_tokens": 1}).encode()


# -- the bare baseline ------------------------------------------------------------------


_BARE_BODY = b'{"object":"chat.completion","choices":[]}'


async def _bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A plain ASGI endpoint: reads the body, answers a fixed JSON."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(_BARE_BODY)).encode())]})
    await send({"type": "http.response.body", "body": _BARE_BODY})


def _bare_server(port: int) -> None:
    import uvicorn

    uvicorn.run(_bare_app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False)


def bare_http(n: int, connections: int) -> float:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = multiprocessing.get_context("spawn").Process(target=_bare_server, args=(port,), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the bare uvicorn server did not start") from None
                time.sleep(0.05)
        return loops.run(load(f"http://127.0.0.1:{port}", "/v1/chat/completions",
                              [_chat(i) for i in range(n)], connections))
    finally:
        proc.terminate()
        proc.join(10)


# -- latency at low load --------------------------------------------------------------------


async def http_latencies(url: str, n: int, rate: float) -> list[float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    reader, writer = await asyncio.open_connection(host, port)
    out = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            status, body = await _exchange(reader, writer, _request(f"{host}:{port}", "/v1/chat/completions",
                                                                     _chat(i)))
            if status != 200:
                raise SystemExit(f"latency request failed: {status} {body[:200]!r}")
            out.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(max(0.0, 1 / rate - (time.perf_counter() - t0)))
    finally:
        writer.close()
    return out


async def direct_latencies(n: int, rate: float) -> list[float]:
    from tokenmill.producers.trusted import TrustedProducer

    out = []
    async with TrustedProducer("alpha") as producer:
        for i in range(n):
            t0 = time.perf_counter()
            [h] = await producer.submit_many([producer.build("bench", messages=[{"role": "user", "content": f"p{i}"}],
                                                             max_tokens=1)])
            await producer.result(h, timeout=60)
            out.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(max(0.0, 1 / rate - (time.perf_counter() - t0)))
    return out


# -- batches ------------------------------------------------------------------------------


def batch_lines(url: str, lines: int) -> float:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    data = b"".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": json.loads(_chat(i))}).encode() + b"\n" for i in range(lines))
    t0 = time.perf_counter()
    f = client.files.create(file=("bench.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 900
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        if time.monotonic() > deadline:
            raise SystemExit(f"batch still {batch.status} after 900 s")
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    if batch.status != "completed" or batch.output_file_id is None:
        raise SystemExit(f"batch ended {batch.status}: {batch.errors}")
    out = client.files.content(batch.output_file_id).content
    elapsed = time.perf_counter() - t0
    got = out.count(b"\n")
    if got != lines:
        raise SystemExit(f"output has {got} rows for {lines} lines")
    return lines / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--connections", type=int, default=512)
    ap.add_argument("--lines", type=int, default=20_000)
    ap.add_argument("--latency-requests", type=int, default=200)
    args = ap.parse_args()
    figures: dict[str, Any] = {}
    figures["bare_http_requests_per_s"] = bare_http(args.requests, args.connections)
    print(f"baseline: bare uvicorn endpoint          {figures['bare_http_requests_per_s']:>9,.0f} requests/s")
    with LocalStack(["bench"]) as stack:
        url = next(s["address"] for s in json.loads((stack.home / "stack.json").read_text())["services"]
                   if s["name"] == "gateway")
        print(f"local stack up in {stack.home}, gateway at {url}")
        loops.run(load(url, "/v1/chat/completions", [_chat(i) for i in range(200)], 16))  # warm
        figures["http_requests_per_s"] = loops.run(
            load(url, "/v1/chat/completions", [_chat(i) for i in range(args.requests)], args.connections))
        print(f"gateway: chat completions over HTTP     {figures['http_requests_per_s']:>9,.0f} requests/s"
              f"  = {figures['http_requests_per_s'] / figures['bare_http_requests_per_s']:.2f}× bare uvicorn")
        figures["direct_requests_per_s"] = loops.run(e2e_throughput(args.requests))
        print(f"baseline: trusted direct-Kafka producer {figures['direct_requests_per_s']:>9,.0f} requests/s"
              f"  (HTTP = {figures['http_requests_per_s'] / figures['direct_requests_per_s']:.2f}× direct)")
        via_http = loops.run(http_latencies(url, args.latency_requests, 20.0))
        direct = loops.run(direct_latencies(args.latency_requests, 20.0))
        figures["http_latency_p50_ms"], figures["http_latency_p99_ms"] = statistics.median(via_http), pct(via_http, 0.99)
        figures["direct_latency_p50_ms"], figures["direct_latency_p99_ms"] = statistics.median(direct), pct(direct, 0.99)
        figures["http_added_latency_p50_ms"] = figures["http_latency_p50_ms"] - figures["direct_latency_p50_ms"]
        figures["http_added_latency_p99_ms"] = figures["http_latency_p99_ms"] - figures["direct_latency_p99_ms"]
        print(f"gateway: round trip at 20 req/s          p50 {figures['http_latency_p50_ms']:.1f} ms, "
              f"p99 {figures['http_latency_p99_ms']:.1f} ms (direct p50 {figures['direct_latency_p50_ms']:.1f}, "
              f"p99 {figures['direct_latency_p99_ms']:.1f}): added p50 {figures['http_added_latency_p50_ms']:.1f} ms, "
              f"p99 {figures['http_added_latency_p99_ms']:.1f} ms")
        figures["batch_lines_per_s"] = batch_lines(url, args.lines)
        print(f"gateway: batch lines via Files+Batches  {figures['batch_lines_per_s']:>9,.0f} lines/s")
    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
