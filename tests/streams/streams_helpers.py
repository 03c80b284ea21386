"""Helpers of the stream-processor tests."""

from __future__ import annotations

from pathlib import Path

from tokenmill.ledger.streams import testing as st


class Workers:
    """Starts stream-processor workers for one test and stops them at its end."""

    def __init__(self, tmp_path: Path, bootstrap: str, database_url: str, unique: str) -> None:
        self.tmp_path = tmp_path
        self.bootstrap = bootstrap
        self.database_url = database_url
        self.topic = f"t.{unique}.token-events"
        self.app_id = f"streams-{unique}"
        self.started: list[st.WorkerProcess] = []

    def start(self, **extra_env: str) -> st.WorkerProcess:
        n = len(self.started)
        env = st.worker_env(home=self.tmp_path / f"home{n}", bootstrap=self.bootstrap,
                            database_url=self.database_url, app_id=self.app_id,
                            topic=self.topic, extra=extra_env)  # fmt: skip
        worker = st.WorkerProcess(env, self.tmp_path / f"worker{n}.log").start()
        self.started.append(worker)
        return worker

    def publish(self, events: list[dict], *, spread: bool = False) -> None:
        """Publish keyed by tenant, as workers do, or with ``spread`` keyed by request id
        (three tenants hash to at most three of the eight partitions)."""
        if spread:
            st.publish(self.bootstrap, self.topic,
                       ((e["request_id"].encode(), st.encode(e)) for e in events))  # fmt: skip
        else:
            st.publish_events(self.bootstrap, self.topic, events)

    def wait_ready(self, worker: st.WorkerProcess, *, timeout_s: float = 60.0) -> None:
        """Until the worker has joined the group and got its partitions."""
        st.wait_until(lambda: "[^Worker]: Ready" in worker.log(), timeout_s=timeout_s,
                      what="the worker ready")  # fmt: skip

    def wait_recorded(self, n: int, *, timeout_s: float = 90.0) -> None:
        def done() -> bool:
            for w in self.started:
                if w.proc is not None and w.proc.poll() not in (None, -9):
                    raise AssertionError(f"worker exited {w.proc.returncode}:\n{w.log()[-4000:]}")
            return st.usage_count(self.database_url) >= n

        st.wait_until(done, timeout_s=timeout_s, interval_s=0.25, what=f"{n} usage records")

    def metrics(self, index: int = 0) -> dict[str, float]:
        """The worker's Prometheus samples (``name{labels}`` → value), from its endpoint."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        port_file = self.tmp_path / f"home{index}" / "streams" / f"{self.app_id}.metrics-port"
        text = httpx.get(f"http://127.0.0.1:{port_file.read_text()}/metrics", timeout=5).text
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}"] = sample.value
        return out

    def logs(self) -> str:
        return "\n".join(
            f"--- worker {i} ---\n{w.log()[-6000:]}" for i, w in enumerate(self.started)
        )
