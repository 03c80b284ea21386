"""Run the tokenmill services of a resolved compose file as local processes.

Each container becomes a process ``python -m tokenmill <command>`` with the service's
environment, translated the way the container's world maps onto this machine:

* service host names (``kafka:9092``, ``redis:6379``, ``postgres:5432``) → the test's
  loopback servers;
* a secret's target (``/run/secrets/<target>``) → the secret's file; a named volume's
  mount point (``/data``) → one directory per volume, shared like the volume;
* each container has a network namespace of its own, so a copy's listening port
  (``--port N``, ``--metrics-port N``) becomes a free loopback port of its own, and
  ``0.0.0.0`` becomes loopback.

A process runs in a session of its own, so SIGKILL of its group is a container dying.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compose_file import Service

from tokenmill.stack import processes

_PORT_FLAGS = ("--port", "--metrics-port")


@dataclass
class Copy:
    """One running copy (a container) of a service."""

    service: str
    index: int
    argv: list[str]
    env: dict[str, str]
    log: Path
    ports: dict[int, int]  #: container port → loopback port
    proc: subprocess.Popen[bytes] | None = None
    kills: int = 0

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group, as a container dies."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.alive():
            processes.stop_pid(self.proc.pid, timeout_s=10.0)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  {self.name}| {line}" for line in text[-lines:])


@dataclass
class Translation:
    """How the compose world maps onto this machine."""

    hosts: Mapping[str, str]  #: ``kafka:9092`` → ``127.0.0.1:PORT``
    secrets_dir: Mapping[str, Path]  #: container path → host path (secrets, volumes)
    base_env: Mapping[str, str]
    logs: Path
    used_ports: set[int] = field(default_factory=set)

    def text(self, value: str) -> str:
        for container, host in self.hosts.items():
            value = value.replace(container, host)
        for container, host in self.secrets_dir.items():
            if value == container or value.startswith(container + "/"):
                value = str(host) + value[len(container):]
        return value

    def copy(self, service: Service, index: int) -> Copy:
        ports: dict[int, int] = {}
        argv: list[str] = []
        command = service.command
        for i, arg in enumerate(command):
            if i > 0 and command[i - 1] in _PORT_FLAGS and arg.isdigit():
                port = processes.free_port()
                while port in self.used_ports:
                    port = processes.free_port()
                self.used_ports.add(port)
                ports[int(arg)] = port
                arg = str(port)
            elif arg == "0.0.0.0":
                arg = processes.LOOPBACK
            argv.append(self.text(arg))
        env = {**self.base_env, **{k: self.text(v) for k, v in service.environment.items()}}
        log = self.logs / f"{service.name}-{index}.log"
        return Copy(service.name, index, [sys.executable, "-m", "tokenmill", *argv], env, log, ports)


def volume_and_secret_paths(
    config: Mapping[str, Any], service: Service, root: Path
) -> dict[str, Path]:
    """Container path → host path for the service's secrets and named volumes."""
    out: dict[str, Path] = {}
    for secret in service.spec.get("secrets") or []:
        source = config["secrets"][secret["source"]]["file"]
        target = secret.get("target") or secret["source"]
        out[target if target.startswith("/") else f"/run/secrets/{target}"] = Path(source)
    for volume in service.spec.get("volumes") or []:
        if volume.get("type") == "volume":
            path = root / "volumes" / volume["source"]
            path.mkdir(parents=True, exist_ok=True)
            out[volume["target"]] = path
    return out


def wait_for(what: str, condition: Any, timeout_s: float, interval_s: float = 0.25) -> Any:
    """Poll ``condition()`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)
