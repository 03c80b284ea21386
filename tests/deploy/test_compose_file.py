"""docker-compose.yml validates against the Compose specification (the real Docker
Compose binary) and names only real tokenmill commands and flags; the stack it declares
has the shape the deployment needs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from compose_file import (
    COMPOSE_FILE,
    REPO,
    TEST_ENV,
    check_command,
    resolved,
    run_compose,
    tokenmill_services,
)

pytestmark = pytest.mark.timeout(120)


def test_the_file_validates() -> None:
    out = run_compose("config", "-q", env=TEST_ENV)
    assert out.returncode == 0, out.stderr
    out = run_compose("--profile", "gpu", "config", "-q", env=TEST_ENV)
    assert out.returncode == 0, out.stderr


def test_the_validator_refuses_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE_FILE.read_text().replace(
            "condition: service_completed_successfully", "condition: service_finished", 1
        )
    )
    out = run_compose("config", "-q", env=TEST_ENV, file=broken)
    assert out.returncode != 0
    assert "service_finished" in out.stderr or "condition" in out.stderr


@pytest.mark.parametrize("unset", sorted(TEST_ENV))
def test_no_secret_has_a_default(unset: str) -> None:
    env = {k: v for k, v in TEST_ENV.items() if k != unset}
    out = run_compose("config", "-q", env=env)
    assert out.returncode != 0 and unset in out.stderr, out.stderr


def test_every_command_and_flag_exists() -> None:
    config = resolved(TEST_ENV, profiles=("gpu",))
    services = tokenmill_services(config)
    assert {s.name for s in services} >= {
        "migrate", "gateway", "scheduler", "streams", "batch-runner", "webhooks",
        "worker-sim", "worker-gpu", "flower",
    }  # fmt: skip
    problems = [f"{s.name}: {why}" for s in services if (why := check_command(s.command))]
    assert not problems, "\n".join(problems)


def test_the_command_check_catches_a_wrong_flag() -> None:
    assert check_command(["flower", "--adress", "0.0.0.0"]) is not None
    assert check_command(["migrate-all"]) is not None
    assert check_command(["worker"]) is not None  # --model is required
    assert check_command(["flower", "--address", "0.0.0.0", "--port", "5555"]) is None


def test_the_stack_has_the_declared_shape() -> None:
    config = resolved(TEST_ENV, profiles=("gpu",))
    services = {s.name: s for s in tokenmill_services(config)}
    replicas = {name: s.replicas for name, s in services.items()}
    assert replicas == {
        "migrate": 1, "gateway": 1, "scheduler": 2, "streams": 2, "batch-runner": 2,
        "webhooks": 2, "worker-sim": 1, "worker-gpu": 1, "flower": 1,
    }  # fmt: skip
    assert services["migrate"].one_shot and services["migrate"].command == ["migrate"]
    for name, service in services.items():
        if name == "migrate":
            continue
        assert service.depends_on.get("migrate") == "service_completed_successfully", name
        assert service.healthcheck, f"{name}: no health check"
        assert not service.one_shot, f"{name}: not restarted"
    gpu = config["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu[0]["driver"] == "nvidia" and "gpu" in gpu[0]["capabilities"]
    assert config["services"]["worker-gpu"]["profiles"] == ["gpu"]
    for infra in ("kafka", "redis", "postgres"):
        assert config["services"][infra].get("healthcheck"), infra
    assert "--appendonly" in config["services"]["redis"]["command"][-1]
    # Flower: basic auth from the environment, published on loopback unless told otherwise
    flower = services["flower"]
    assert flower.environment["TOKENMILL_FLOWER_BASIC_AUTH"] == TEST_ENV["FLOWER_BASIC_AUTH"]
    assert [p["host_ip"] for p in config["services"]["flower"]["ports"]] == ["127.0.0.1"]
    moved = resolved({**TEST_ENV, "FLOWER_ADDRESS": "10.1.2.3"})
    assert [p["host_ip"] for p in moved["services"]["flower"]["ports"]] == ["10.1.2.3"]


def test_secrets_stay_out_of_the_image() -> None:
    config = resolved(TEST_ENV)
    for service in tokenmill_services(config):
        assert service.environment["TOKENMILL_CONFIG"] == "/run/secrets/tokenmill.toml"
        assert [s["source"] for s in service.spec["secrets"]] == ["tokenmill-config"]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert not re.search(r"(?i)(password|secret|tokenmill\.toml)\S*\s*=", dockerfile)
    assert not re.search(r"(?im)^\s*(COPY|ADD)\b.*(tokenmill\.toml|\.env)", dockerfile)
