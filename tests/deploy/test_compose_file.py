"""docker-compose.yml validates against the Compose specification (the real Docker
Compose binary) and names only real tokenmill commands and flags; the stack it declares
has the shape the deployment needs."""

from __future__ import annotations

import itertools
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


# -- monitoring: Prometheus and Grafana ---------------------------------------------

DEPLOY = REPO / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
#: PromQL words that are not metric names
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "irate", "increase",
    "histogram_quantile", "label_values", "and", "or", "unless", "on", "ignoring",
    "group_left", "group_right", "clamp_min", "clamp_max", "topk", "bottomk",
}  # fmt: skip


def exported_names() -> set[str]:
    """Every sample name the stream processors and the gateway can export, from their
    collectors (counters as ``_total``, histograms as ``_bucket``/``_sum``/``_count``)."""
    from prometheus_client import CollectorRegistry
    from tokenmill.gateway.metrics import GatewayMetrics
    from tokenmill.ledger.streams.metrics import StreamMetrics

    registry = CollectorRegistry()
    StreamMetrics(registry)
    GatewayMetrics(None, registry)
    names = set()
    for family in registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: its identifiers, less label matchers,
    grouping labels, ranges, strings and PromQL's own words."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"label_values\(([^,)]*),[^)]*\)", r"\1", expr)  # Grafana's: (metric, label)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    return {w for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr) if w not in PROMQL_WORDS}


def dashboard_queries(dashboard: dict) -> list[str]:
    panels = [p for p in dashboard["panels"] for p in (p, *p.get("panels", []))]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    variables = dashboard.get("templating", {}).get("list", [])
    return exprs + [v["query"]["query"] for v in variables if v.get("type") == "query"]


def test_the_dashboards_query_only_exported_metrics() -> None:
    import json

    assert DASHBOARDS, "no dashboard under deploy/grafana/dashboards"
    exported = exported_names()
    assert {"tokenmill_fairness_jain_index", "tokenmill_fair_share_received_ratio",
            "tokenmill_time_to_first_token_seconds_bucket"} <= exported  # fmt: skip
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        queries = dashboard_queries(dashboard)
        assert len(queries) >= 10, path.name
        for expr in queries:
            names = metric_names(expr)
            assert names, f"{path.name}: {expr!r} reads no metric"
            assert names <= exported, f"{path.name}: {expr!r} reads {names - exported}"
        datasources = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
        assert datasources == {"prometheus"}, path.name


def test_the_metric_name_check_catches_a_typo() -> None:
    assert metric_names('max by (tenant) (tokenmil_fairness_jain_index{priority=~"$p"})') == {
        "tokenmil_fairness_jain_index"
    }
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m])))") == {"x_bucket"}
    assert metric_names("label_values(x, tenant)") == {"x"}


def listening_port(service: dict, port: int) -> bool:
    """Whether the service's command listens on ``port`` (``--port``/``--metrics-port``)."""
    command = [str(a) for a in service.get("command") or []]
    return any(flag in ("--port", "--metrics-port") and value == str(port)
               for flag, value in itertools.pairwise(command))  # fmt: skip


def test_prometheus_scrapes_real_services_and_grafana_reads_it() -> None:
    import yaml

    config = resolved(TEST_ENV)
    services = config["services"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = []
    for job in scrape["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets += [tuple(t.rsplit(":", 1)) for t in static["targets"]]
        for sd in job.get("dns_sd_configs", []):
            targets += [(name, str(sd["port"])) for name in sd["names"]]
        auth = job.get("authorization")
        if auth:  # the gateway's metrics key: a compose secret of the Prometheus service
            mounted = {f"/run/secrets/{s['target']}" for s in services["prometheus"]["secrets"]}
            assert auth["credentials_file"] in mounted, job["job_name"]
    assert {host for host, _ in targets} == {"streams", "gateway"}
    for host, port in targets:
        assert host in services and listening_port(services[host], int(port)), f"{host}:{port}"
    mounts = {v["target"]: v["source"] for v in services["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == str(DEPLOY / "prometheus" / "prometheus.yml")

    provisioning = DEPLOY / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    [source] = sources["datasources"]
    assert (source["uid"], source["url"]) == ("prometheus", "http://prometheus:9090")
    providers = yaml.safe_load((provisioning / "dashboards" / "tokenmill.yml").read_text())
    [provider] = providers["providers"]
    grafana = services["grafana"]
    mounts = {v["target"]: v["source"] for v in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == str(provisioning)
    assert mounts[provider["options"]["path"]] == str(DEPLOY / "grafana" / "dashboards")


def test_operator_uis_are_on_loopback_and_grafana_is_locked() -> None:
    config = resolved(TEST_ENV)
    for name in ("prometheus", "grafana"):
        assert [p["host_ip"] for p in config["services"][name]["ports"]] == ["127.0.0.1"], name
        assert config["services"][name].get("healthcheck"), name
    env = config["services"]["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == TEST_ENV["GRAFANA_ADMIN_PASSWORD"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    moved = resolved({**TEST_ENV, "GRAFANA_ADDRESS": "10.1.2.3"})
    assert [p["host_ip"] for p in moved["services"]["grafana"]["ports"]] == ["10.1.2.3"]
