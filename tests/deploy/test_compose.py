"""docker-compose.yml and its config files under deploy/compose/, checked offline (no Docker engine).

The file is read as Compose reads it: YAML merge keys, then ``${VAR:-default}`` interpolation with every
variable unset (the defaults are what `docker compose up` runs without an .env file).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest
from deploy_helpers import (
    COMPOSE_FILE,
    DASHBOARD_DIR,
    REPO,
    app_routes,
    check_settings_env,
    load_yaml,
    parse_segquant,
)

from service.registry import Registry

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$\$")


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        current = env.get(name)
        if op in (":-", "-"):
            return current if current or (op == "-" and current is not None) else (arg or "")
        if op in (":?", "?"):
            assert current, f"compose requires {name}: {arg}"
        return current or ""

    return _VAR.sub(sub, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _interpolate(load_yaml(COMPOSE_FILE), {})


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume entry."""
    out = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            out.append((entry.get("source", ""), entry["target"]))
        else:
            source, target = entry.split(":")[:2]
            out.append((source, target))
    return out


def _host_file(source: str) -> Any:
    assert source.startswith("./"), f"{source}: bind mounts are relative to the compose file"
    return REPO / source[2:]


def _port(target: str) -> int:
    return int(str(target).split(":")[-1].split("/")[0])


SEGQUANT = ("api", "worker", "worker-gpu")


# ---------------------------------------------------------------------------------------------- services
def test_expected_services_and_no_obsolete_version_key(compose: dict[str, Any], services: dict[str, Any]) -> None:
    assert {"redis", "api", "worker", "worker-gpu", "prometheus", "grafana"} <= set(services)
    assert "version" not in compose, "the top-level version key is obsolete in Compose v2"


def test_api_and_workers_share_one_image_built_from_the_dockerfile(services: dict[str, Any]) -> None:
    cpu = {services[s]["image"] for s in ("api", "worker")}
    assert len(cpu) == 1, f"API and CPU workers must run the same image: {cpu}"
    assert services["worker-gpu"]["image"].rsplit(":", 1)[0] == next(iter(cpu)).rsplit(":", 1)[0]
    for name in SEGQUANT:
        build = services[name]["build"]
        assert (REPO / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).is_file()
    gpu_args = services["worker-gpu"]["build"]["args"]
    assert "cuda" in gpu_args["BASE_IMAGE"] and "/cu" in gpu_args["TORCH_INDEX_URL"]
    dockerfile = (REPO / "Dockerfile").read_text()
    for arg in gpu_args:
        assert re.search(rf"^ARG {arg}\b", dockerfile, re.M), f"the Dockerfile has no build argument {arg}"


def test_commands_are_real_segquant_subcommands(services: dict[str, Any]) -> None:
    api = parse_segquant(services["api"]["command"])
    assert api.command == "serve" and api.host == "0.0.0.0"
    for name in ("worker", "worker-gpu"):
        assert parse_segquant(services[name]["command"]).command == "worker"


def test_api_port_is_published_and_matches_serve(services: dict[str, Any]) -> None:
    api = parse_segquant(services["api"]["command"])
    assert api.port in {_port(p) for p in services["api"]["ports"]}


def test_workers_are_scalable(services: dict[str, Any]) -> None:
    for name in ("worker", "worker-gpu"):
        worker = services[name]
        assert "container_name" not in worker, "a fixed container_name breaks --scale"
        assert not worker.get("ports"), "published host ports collide between replicas"
        metrics = parse_segquant(worker["command"]).metrics_port
        assert metrics and str(metrics) in {str(p) for p in worker.get("expose", [])}


def test_gpu_profile_reserves_nvidia_devices(services: dict[str, Any]) -> None:
    gpu = services["worker-gpu"]
    assert "gpu" in gpu.get("profiles", [])
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert _env(gpu)["SEGQUANT_DEVICE"] == "cuda"
    assert "profiles" not in services["worker"], "the CPU worker runs without a profile"


@pytest.mark.parametrize("name", SEGQUANT)
def test_environment_maps_to_real_settings(services: dict[str, Any], name: str, monkeypatch) -> None:
    settings = check_settings_env(_env(services[name]), monkeypatch)
    url = urlparse(settings.redis_url)
    assert url.scheme == "redis" and url.hostname in services, f"SEGQUANT_REDIS_URL points at {url.hostname}"
    redis_command = services[url.hostname]["command"]
    redis_port = int(dict(zip(redis_command[1::2], redis_command[2::2])).get("--port", 6379))  # Redis's default
    assert (url.port or 6379) == redis_port


@pytest.mark.parametrize("name", SEGQUANT)
def test_registry_and_cache_mounts(services: dict[str, Any], name: str, monkeypatch, compose: dict[str, Any]) -> None:
    service = services[name]
    settings = check_settings_env(_env(service), monkeypatch)
    mounts = _mounts(service)
    registry = [s for s, t in mounts if t == str(settings.registry_file)]
    assert registry, f"{name}: nothing is mounted at SEGQUANT_REGISTRY_FILE={settings.registry_file}"
    Registry.from_file(_host_file(registry[0]))  # parses and validates like the service does
    cache = PurePosixPath(str(settings.cache_dir))
    volumes = [(s, PurePosixPath(t)) for s, t in mounts if s in compose.get("volumes", {})]
    assert any(t == cache or t in cache.parents for _, t in volumes), f"{name}: cache_dir {cache} is not on a volume"


def test_api_and_workers_share_registry_and_cache(services: dict[str, Any]) -> None:
    mounts = [set(_mounts(services[n])) for n in SEGQUANT]
    assert mounts[0] == mounts[1] == mounts[2], "API and workers must see the same registry and artifact cache"


def test_stop_grace_period_covers_the_worker_drain(services: dict[str, Any], monkeypatch) -> None:
    def seconds(text: str) -> float:
        total = 0.0
        for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
            total += float(amount) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
        return total

    for name in SEGQUANT:
        settings = check_settings_env(_env(services[name]), monkeypatch)
        grace = seconds(services[name].get("stop_grace_period", "10s"))
        assert grace > settings.worker.drain_timeout_s, (
            f"{name}: stop_grace_period {grace}s would SIGKILL a drain of {settings.worker.drain_timeout_s}s"
        )


# ---------------------------------------------------------------------------------------------- redis
def test_redis_persists_with_aof_and_never_evicts(services: dict[str, Any], compose: dict[str, Any]) -> None:
    redis = services["redis"]
    command = redis["command"] if isinstance(redis["command"], list) else redis["command"].split()
    args = dict(zip(command[1::2], command[2::2]))
    assert args.get("--appendonly") == "yes"
    assert args.get("--maxmemory-policy") == "noeviction"
    data_dir = args.get("--dir", "/data")
    assert any(t == data_dir and s in compose["volumes"] for s, t in _mounts(redis)), "AOF dir is not a volume"


# ---------------------------------------------------------------------------------------------- health
def test_every_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_depends_on_waits_for_healthy_redis(services: dict[str, Any]) -> None:
    for name in SEGQUANT:
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_segquant_healthchecks_use_the_image_script(services: dict[str, Any]) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    for name in SEGQUANT:
        script = next(a for a in services[name]["healthcheck"]["test"] if a.endswith(".py"))
        assert f"deploy/docker/healthcheck.py {script}" in dockerfile, f"{name}: {script} is not in the image"


# ---------------------------------------------------------------------------------------------- prometheus
@pytest.fixture(scope="module")
def prometheus_config(services: dict[str, Any]) -> dict[str, Any]:
    source = next(s for s, t in _mounts(services["prometheus"]) if t == "/etc/prometheus/prometheus.yml")
    flags = services["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in flags
    return load_yaml(_host_file(source))


def _jobs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {j["job_name"]: j for j in config["scrape_configs"]}


def test_prometheus_scrapes_every_worker_replica_via_dns(
    prometheus_config: dict[str, Any], services: dict[str, Any]
) -> None:
    workers = [
        j
        for j in _jobs(prometheus_config).values()
        if any(set(sd.get("names", [])) & {"worker", "worker-gpu"} for sd in j.get("dns_sd_configs", []))
    ]
    assert workers, "workers must be discovered with dns_sd_configs on the compose service names"
    names: set[str] = set()
    for job in workers:
        for sd in job["dns_sd_configs"]:
            assert sd.get("type", "SRV") == "A", "Docker's DNS answers A records; SRV finds nothing"
            for name in sd["names"]:
                assert name in services, f"dns_sd name {name} is not a compose service"
                assert sd["port"] == parse_segquant(services[name]["command"]).metrics_port
                names.add(name)
        assert job.get("metrics_path", "/metrics") == "/metrics"
    assert {"worker", "worker-gpu"} <= names


def test_prometheus_scrapes_the_api(prometheus_config: dict[str, Any], services: dict[str, Any]) -> None:
    api_port = parse_segquant(services["api"]["command"]).port
    targets = []
    for job in _jobs(prometheus_config).values():
        for sd in job.get("dns_sd_configs", []):
            targets += [(n, sd["port"], job.get("metrics_path", "/metrics")) for n in sd["names"]]
        for static in job.get("static_configs", []):
            targets += [
                (t.split(":")[0], int(t.split(":")[1]), job.get("metrics_path", "/metrics")) for t in static["targets"]
            ]
    api = [t for t in targets if t[0] == "api"]
    assert api == [("api", api_port, "/metrics")]
    assert "/metrics" in app_routes()


# ---------------------------------------------------------------------------------------------- grafana
def test_grafana_provisioning_wiring(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    mounts = {t: s for s, t in _mounts(grafana)}
    provisioning = _host_file(mounts["/etc/grafana/provisioning"])
    datasources = [d for f in (provisioning / "datasources").glob("*.y*ml") for d in load_yaml(f)["datasources"]]
    prometheus = [d for d in datasources if d["type"] == "prometheus"]
    assert len(prometheus) == 1
    url = urlparse(prometheus[0]["url"])
    assert url.hostname == "prometheus" and url.hostname in services
    assert f"{url.port}:{url.port}" in " ".join(services["prometheus"]["ports"])
    providers = [p for f in (provisioning / "dashboards").glob("*.y*ml") for p in load_yaml(f)["providers"]]
    paths = {p["options"]["path"] for p in providers}
    dashboards_mount = [
        t for t, s in mounts.items() if s.startswith("./") and _host_file(s).resolve() == DASHBOARD_DIR.resolve()
    ]
    assert dashboards_mount and dashboards_mount[0] in paths, "the provider must read the mounted dashboard folder"
    home = grafana["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert (DASHBOARD_DIR / PurePosixPath(home).relative_to(dashboards_mount[0])).is_file()


def test_observability_ports_bind_to_loopback(services: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        for port in services[name]["ports"]:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
