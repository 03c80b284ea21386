"""``tokenmill flower`` never runs open: real Flower processes on a real Redis.

Basic auth on every route (a generated password kept 0600 in the state directory,
reused; or ``--basic-auth`` / ``TOKENMILL_FLOWER_BASIC_AUTH``), no cross-origin
writes, ``FLOWER_UNAUTHENTICATED_API`` ignored, task arguments hidden.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import uuid
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from tokenmill.workers.celery_app import create_app, send_slice
from tokenmill.workers.flower_auth import (
    HIDDEN,
    check_basic_auth_value,
    is_cross_origin,
    load_or_create_credentials,
    redact_inspect_reply,
    refusal,
    valid_basic_auth,
)
from workers_helpers import WorkerProcess, chat_request, dispatches, wait_for, write_config

from tokenmill.errors import ConfigError
from tokenmill.stack import processes

MODELS = {"sim": {"engine": "sim", "max_in_flight": 8, "engine_args": {"decode_ms_per_step": 1.0}}}
EVIL = "http://evil.example"
TASK_NAME = "tokenmill.test_noop"  # only ever queued on a queue no worker reads
GET_ROUTES = [
    "/", "/workers", "/tasks", "/broker", "/tasks/datatable", "/worker/x", "/task/x",
    "/api/workers", "/api/tasks", "/api/task/types", "/api/queues/length", "/api/task/info/x",
    "/metrics", "/login", "/logout", "/no-such-page",
]  # fmt: skip
POST_ROUTES = [
    "/api/task/send-task/x", "/api/task/async-apply/x", "/api/task/apply/x",
    "/api/worker/shutdown/x", "/api/worker/pool/restart/x", "/api/task/revoke/x",
]  # fmt: skip


class FlowerProcess:
    """``python -m tokenmill.workers.commands flower`` as a child process."""

    def __init__(
        self, stack: dict, home: Path, *args: str, env: dict[str, str] | None = None
    ) -> None:
        self.port = processes.free_port()
        self.home = home
        self.log_path = Path(stack["logs"]) / f"flower-{uuid.uuid4().hex[:6]}.log"
        full_env = {
            key: value for key, value in os.environ.items()
            if key not in ("TOKENMILL_FLOWER_BASIC_AUTH", "FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API")
        }  # fmt: skip
        full_env.update({
            "TOKENMILL_CONFIG": str(stack["config"]),
            "TOKENMILL_HOME": str(home),
            "TOKENMILL_REDIS_URL": stack["redis_url"],
            **(env or {}),
        })  # fmt: skip
        argv = [
            sys.executable,
            "-m",
            "tokenmill.workers.commands",
            "flower",
            "--port",
            str(self.port),
            *args,
        ]
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(argv, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        try:
            wait_for(
                self._healthy,
                45,
                "flower answers /healthcheck",
                alive=lambda: self.proc.poll() is None,
            )
        except AssertionError as exc:
            self.stop()
            raise AssertionError(f"{exc}; log:\n{self.log()}") from None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url("/healthcheck"), timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def credentials(self) -> tuple[str, str]:
        user, _, password = (
            (self.home / "flower" / "credentials").read_text().strip().partition(":")
        )
        return user, password

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        processes.stop_pid(self.proc.pid)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> dict:
    root = tmp_path_factory.mktemp("flower")
    config = write_config(root / "tokenmill.toml", root / "home", MODELS)
    return {"config": config, "redis_url": redis_url, "logs": root, "root": root}


@pytest.fixture(scope="module")
def flower(stack: dict) -> Iterator[FlowerProcess]:
    """Flower with no credentials configured and FLOWER_UNAUTHENTICATED_API=true set."""
    proc = FlowerProcess(
        stack, stack["root"] / "home-open", env={"FLOWER_UNAUTHENTICATED_API": "true"}
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def sim_worker(stack: dict) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(
        "sim", config=stack["config"], redis_url=stack["redis_url"], kafka="",
        log_dir=stack["logs"], extra_args=["--events", "none"],
    )  # fmt: skip
    try:
        worker.wait_ready(60)
        worker.wait_consuming(30)
    except AssertionError:
        worker.stop()
        raise
    yield worker
    worker.stop()


def assert_no_cors(resp: httpx.Response) -> None:
    assert "access-control-allow-origin" not in resp.headers, dict(resp.headers)


def queued(client: redis.Redis, queue: str) -> list[bytes]:
    return list(client.scan_iter(match=f"{queue}*"))


# --- real Flower ----------------------------------------------------------------------


def test_every_route_needs_credentials(flower: FlowerProcess) -> None:
    user, _ = flower.credentials()
    for creds in (None, (user, "wrong-password"), ("nobody", "x")):
        for path in GET_ROUTES:
            resp = httpx.get(flower.url(path), auth=creds, timeout=10)
            assert resp.status_code == 401, (path, creds, resp.status_code, resp.text[:200])
            assert resp.headers.get("www-authenticate", "").startswith("Basic")
            assert_no_cors(resp)
        for path in POST_ROUTES:
            resp = httpx.post(flower.url(path), auth=creds, timeout=10)
            assert resp.status_code == 401, (path, creds, resp.status_code, resp.text[:200])
            assert_no_cors(resp)
    for method in ("HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"):
        resp = httpx.request(method, flower.url("/api/workers"), timeout=10)
        assert resp.status_code == 401, (method, resp.status_code)
        assert_no_cors(resp)
    # a malformed Authorization header is no way in either
    for header in ("Basic", "Basic !!!", "Bearer abc", "Basic " + b64encode(b"admin").decode()):
        resp = httpx.get(flower.url("/api/workers"), headers={"Authorization": header}, timeout=10)
        assert resp.status_code == 401, header


def test_the_right_credentials_open_ui_and_api(flower: FlowerProcess) -> None:
    auth = flower.credentials()
    resp = httpx.get(flower.url("/api/workers"), auth=auth, timeout=10)
    assert resp.status_code == 200 and isinstance(resp.json(), dict)
    assert_no_cors(resp)
    for path in ("/", "/tasks", "/metrics", "/api/tasks"):
        assert httpx.get(flower.url(path), auth=auth, timeout=10).status_code == 200, path


def test_unauthenticated_api_env_is_ignored_and_said(flower: FlowerProcess) -> None:
    # FLOWER_UNAUTHENTICATED_API=true was in Flower's environment: still 401, no CORS
    resp = httpx.get(flower.url("/api/workers"), headers={"Origin": EVIL}, timeout=10)
    assert resp.status_code == 401
    assert_no_cors(resp)
    pre = httpx.options(flower.url("/api/workers"), headers={
        "Origin": EVIL, "Access-Control-Request-Method": "POST"}, timeout=10)  # fmt: skip
    assert pre.status_code in (401, 403)
    assert_no_cors(pre)
    assert "ignoring FLOWER_UNAUTHENTICATED_API" in flower.log()


def test_cross_origin_posts_run_nothing(
    flower: FlowerProcess, sim_worker: WorkerProcess, rclient: redis.Redis, stack: dict
) -> None:
    auth = flower.credentials()
    worker = sim_worker.name()
    assert worker
    # Flower knows the worker (else shutdown would be a 404 for the wrong reason)
    wait_for(lambda: worker in httpx.get(flower.url("/api/workers"), params={"refresh": "1"},
                                         auth=auth, timeout=10).json(),
             45, "flower lists the worker")  # fmt: skip

    refused_queue = f"tokenmill.test-refused-{uuid.uuid4().hex[:8]}"
    cross_site = [
        {"Origin": EVIL},
        {"Origin": "null"},
        {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": f"http://127.0.0.1:{flower.port + 1}"},  # another port is another origin
    ]
    for headers in cross_site:
        for creds in (auth, None):
            for path, body in ((f"/api/task/send-task/{TASK_NAME}", {"queue": refused_queue}),
                               (f"/api/worker/shutdown/{worker}", None)):  # fmt: skip
                resp = httpx.post(
                    flower.url(path), json=body, headers=headers, auth=creds, timeout=10
                )
                assert resp.status_code in (401, 403), (path, headers, creds, resp.status_code)
                if creds is not None:
                    assert resp.status_code == 403, (path, headers)
                assert_no_cors(resp)
    assert queued(rclient, refused_queue) == []  # no task was sent
    # the worker did not shut down: it still answers a ping (broadcasts are in order)
    assert create_app(stack["redis_url"]).control.ping(destination=[worker], timeout=3.0)
    assert sim_worker.alive

    # control: the same request from Flower's own origin (or a non-browser) does run
    sent_queue = f"tokenmill.test-sent-{uuid.uuid4().hex[:8]}"
    for headers in (
        {"Origin": f"http://127.0.0.1:{flower.port}"},
        {"Sec-Fetch-Site": "same-origin"},
        {},
    ):
        resp = httpx.post(flower.url(f"/api/task/send-task/{TASK_NAME}"), json={"queue": sent_queue},
                          headers=headers, auth=auth, timeout=10)  # fmt: skip
        assert resp.status_code == 200, (headers, resp.status_code, resp.text[:200])
        assert_no_cors(resp)
    assert queued(rclient, sent_queue)
    for key in queued(rclient, sent_queue):
        rclient.delete(key)


def wait_events_flowing(flower: FlowerProcess, worker: WorkerProcess, auth: tuple[str, str]) -> None:
    """Flower records a task only from events it receives, so wait until its event
    receiver has heard the worker (a heartbeat) before sending one."""
    name = worker.wait_ready()

    def alive() -> bool:
        got = httpx.get(flower.url("/api/workers"), params={"status": "1"}, auth=auth, timeout=5)
        return got.status_code == 200 and got.json().get(name) is True

    wait_for(alive, 45, "flower receives the worker's events")


def test_task_arguments_are_hidden(
    flower: FlowerProcess, sim_worker: WorkerProcess, stack: dict
) -> None:
    auth = flower.credentials()
    wait_events_flowing(flower, sim_worker, auth)
    secret = f"my secret prompt {uuid.uuid4().hex}"
    task_id = send_slice(
        create_app(stack["redis_url"]),
        "sim",
        dispatches([chat_request("sim", secret, max_tokens=2)]),
    )

    def seen() -> dict | None:
        got = httpx.get(flower.url(f"/api/task/info/{task_id}"), auth=auth, timeout=5)
        return (
            got.json() if got.status_code == 200 and got.json().get("state") == "SUCCESS" else None
        )

    task = wait_for(seen, 30, "flower sees the task succeed")
    assert task["args"] == HIDDEN and task["kwargs"] == HIDDEN
    listing = httpx.get(flower.url("/api/tasks"), auth=auth, timeout=10)
    page = httpx.get(flower.url(f"/task/{task_id}"), auth=auth, timeout=10)
    search = httpx.get(flower.url("/api/tasks"), params={"search": "secret"}, auth=auth, timeout=10)
    worker = httpx.get(flower.url(f"/worker/{sim_worker.name()}"), auth=auth, timeout=10)
    for resp in (listing, page, search, worker):
        assert resp.status_code == 200
        assert secret not in resp.text and "my secret prompt" not in resp.text
    assert task_id in listing.text and task_id in page.text
    assert task_id not in search.text  # nothing to find in hidden arguments


def test_task_arguments_shown_when_configured(stack: dict, sim_worker: WorkerProcess) -> None:
    proc = FlowerProcess(stack, stack["root"] / "home-open", "--show-task-args")
    try:
        auth = proc.credentials()
        wait_events_flowing(proc, sim_worker, auth)
        secret = f"shown prompt {uuid.uuid4().hex}"
        request = chat_request("sim", secret, max_tokens=2)
        task_id = send_slice(create_app(stack["redis_url"]), "sim", dispatches([request]))

        def seen() -> dict | None:
            got = httpx.get(proc.url(f"/api/task/info/{task_id}"), auth=auth, timeout=5)
            ok = got.status_code == 200 and got.json().get("state") == "SUCCESS"
            return got.json() if ok else None

        task = wait_for(seen, 30, "flower sees the task succeed")
        # Shown as the task events carry them: a slice's events carry its size (argsrepr),
        # so prompts never travel in events at all.
        assert task["args"] != HIDDEN and re.fullmatch(r"<slice: \d+ bytes>", task["args"])
        assert secret not in task["args"]
    finally:
        proc.stop()


def test_credentials_file_is_private_and_reused(stack: dict) -> None:
    home = stack["root"] / f"home-{uuid.uuid4().hex[:6]}"
    first = FlowerProcess(stack, home)
    try:
        path = home / "flower" / "credentials"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        line = path.read_text()
        user, _, password = line.strip().partition(":")
        assert user == "admin" and len(password) >= 24 and line.count("\n") == 1
        assert str(path) in first.log()  # says where
        assert password not in first.log()  # never the password
        assert (
            httpx.get(first.url("/api/workers"), auth=(user, password), timeout=10).status_code
            == 200
        )
    finally:
        first.stop()
    inode = path.stat().st_ino
    second = FlowerProcess(stack, home)
    try:
        assert path.read_text() == line and path.stat().st_ino == inode
        assert "read from" in second.log() and password not in second.log()
        assert (
            httpx.get(second.url("/api/workers"), auth=(user, password), timeout=10).status_code
            == 200
        )
        assert (
            httpx.get(second.url("/api/workers"), auth=(user, "other"), timeout=10).status_code
            == 401
        )
    finally:
        second.stop()


def test_basic_auth_from_the_environment_wins(stack: dict) -> None:
    home = stack["root"] / f"home-{uuid.uuid4().hex[:6]}"
    proc = FlowerProcess(stack, home, "--address", "127.0.0.1",
                         env={"TOKENMILL_FLOWER_BASIC_AUTH": "alice:s3cret-pass"})  # fmt: skip
    try:
        assert not (home / "flower" / "credentials").exists()
        assert (
            httpx.get(
                proc.url("/api/workers"), auth=("alice", "s3cret-pass"), timeout=10
            ).status_code
            == 200
        )
        assert httpx.get(proc.url("/api/workers"), timeout=10).status_code == 401
        assert "s3cret-pass" not in proc.log()
    finally:
        proc.stop()


# --- the pieces -----------------------------------------------------------------------


def test_credentials_file_created_once(tmp_path: Path) -> None:
    path = tmp_path / "state" / "flower" / "credentials"
    old_umask = os.umask(0)
    try:
        line, created = load_or_create_credentials(path)
    finally:
        os.umask(old_umask)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_credentials(path) == (line, False)
    path.chmod(0o644)
    assert load_or_create_credentials(path) == (line, False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # narrowed again
    path.write_text("garbage\n")
    with pytest.raises(ConfigError, match="user:password"):
        load_or_create_credentials(path)


def test_basic_auth_values() -> None:
    assert check_basic_auth_value(" a:b ", "x") == "a:b"
    assert check_basic_auth_value("a:b,c:d", "x") == "a:b,c:d"
    for bad in ("nopassword", "a:", ":b", "a:b,", "a:b,c"):
        with pytest.raises(ConfigError) as err:
            check_basic_auth_value(bad, "--basic-auth")
        assert bad not in str(err.value)  # never echoes a value
    token = "Basic " + b64encode(b"a:b").decode()
    assert valid_basic_auth(token, ["x:y", "a:b"])
    assert not valid_basic_auth(token, ["a:bb"]) and not valid_basic_auth(token, [])
    assert not valid_basic_auth(None, ["a:b"]) and not valid_basic_auth("Basic ###", ["a:b"])


def test_cross_origin_rules() -> None:
    host = "127.0.0.1:5555"
    assert not is_cross_origin({}, host)
    assert not is_cross_origin({"Origin": "http://127.0.0.1:5555"}, host)
    assert not is_cross_origin({"Sec-Fetch-Site": "same-origin"}, host)
    assert not is_cross_origin({"Sec-Fetch-Site": "none"}, host)
    assert is_cross_origin({"Origin": EVIL}, host)
    assert is_cross_origin({"Origin": "null"}, host)
    assert is_cross_origin({"Sec-Fetch-Site": "same-site"}, host)
    ok = "Basic " + b64encode(b"a:b").decode()
    assert refusal("POST", "/api/x", {"Origin": EVIL, "Authorization": ok}, host, ["a:b"]) == (
        403,
        "Cross-origin request refused",
    )
    assert refusal("POST", "/api/x", {"Authorization": ok}, host, ["a:b"]) is None
    assert refusal("GET", "/metrics", {}, host, ["a:b"])[0] == 401  # type: ignore[index]
    assert refusal("GET", "/healthcheck", {}, host, ["a:b"]) is None
    assert refusal("POST", "/healthcheck", {}, host, ["a:b"])[0] == 401  # type: ignore[index]
    assert refusal("GET", "/", {"Authorization": ok}, host, []) == (401, "Authentication required")


def test_inspect_replies_lose_their_arguments() -> None:
    reply = [{"id": "1", "args": ["prompt"], "kwargs": {"k": "v"}}]
    assert redact_inspect_reply("reserved", reply) == [
        {"id": "1", "args": HIDDEN, "kwargs": HIDDEN}
    ]
    sched = [{"eta": None, "request": {"id": "1", "args": "['prompt']", "kwargs": "{}"}}]
    assert redact_inspect_reply("scheduled", sched)[0]["request"]["args"] == HIDDEN
    assert redact_inspect_reply("stats", {"args": 1}) == {"args": 1}
