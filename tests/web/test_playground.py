"""The playground page end to end: a real ``segquant serve`` process and headless Chromium (Debian's
``chromium`` package) driven by Playwright, without ``playwright install``.

The open service's registry is the tiny random MMDiT with ``fp`` and ``w8a8-segquant`` (small calibration)
and a random test LoRA adapter, plus a tiny random UNet with ``fp`` only (no adapters; loaded on its first
job), so the whole module runs in about two minutes on two busy cores. A screenshot of the page is written under the
test's ``tmp_path`` (its path is printed) and copied to ``$SEGQUANT_WEB_ARTIFACTS`` when that is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("SEGQUANT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-extensions",
    "--disable-sync",
    "--mute-audio",
]
API_KEY = "playground-test-key-7f3a"
STEPS = 4
ADAPTER = "tiny-style"
TRIGGER = "striped"
ADAPTER_SCALE = 1.5

if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"Chromium not found at {CHROMIUM}: install it with `apt-get install -y chromium` (see tests/web/README.md)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="Playwright for Python is not installed: `pip install playwright` (no `playwright install` needed)",
)
expect = sync_api.expect


# ------------------------------------------------------------------ the service, as a real process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_adapter(folder: Path) -> Path:
    """A random LoRA for the tiny MMDiT (every attention value projection and the output projection), with
    the card the registry reads its default scale, description and trigger from."""
    import torch
    from safetensors.torch import save_file

    import segquant_core as sq
    import segquant_shapes

    denoiser = sq.denoiser_of(segquant_shapes.tiny_random_pipeline("mmdit", seed=0))
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in denoiser.named_modules():
        if isinstance(module, torch.nn.Linear) and (name.endswith("attn.to_v") or name == "proj_out"):
            tensors[f"transformer.{name}.lora_A.weight"] = 0.3 * torch.randn(4, module.in_features, generator=gen)
            tensors[f"transformer.{name}.lora_B.weight"] = 0.3 * torch.randn(module.out_features, 4, generator=gen)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "pytorch_lora_weights.safetensors"))
    card = {
        "name": ADAPTER,
        "trigger": TRIGGER,
        "default_scale": ADAPTER_SCALE,
        "description": "A random test adapter that changes every image.",
    }
    (folder / "lora.json").write_text(json.dumps(card))
    return folder


def _config(tmp: Path, *, quantized: bool, api_keys: list[str] | None = None) -> Path:
    variants: list[Any] = ["fp"]
    defaults = {"num_inference_steps": STEPS, "guidance_scale": 3.0}
    models: list[dict[str, Any]] = [
        {"name": "tiny", "source": "tiny:mmdit", "variants": variants, "defaults": defaults}
    ]
    if quantized:
        variants.append(
            {
                "name": "w8a8-segquant",
                "recipe": "w8a8-segquant",
                "calibration": {"samples": 4, "num_inference_steps": 4, "steps_per_prompt": 2},
            }
        )
        models[0]["adapters"] = [{"name": ADAPTER, "path": str(_write_adapter(tmp / "adapter"))}]
        models.append(
            {
                "name": "tiny-unet",
                "source": "tiny:unet",
                "variants": ["fp"],
                "defaults": defaults,
                "description": "a tiny random UNet",
            }
        )
    config = {
        "cache_dir": str(tmp / "cache"),
        "models": models,
        "worker": {"batch_wait_ms": 0, "drain_timeout_s": 5},
        "limits": {"max_inference_steps": 100},
        "api_keys": api_keys or [],
    }
    path = tmp / "serve.json"
    path.write_text(json.dumps(config))
    return path


class Service:
    """``segquant serve --config … --port …`` in a subprocess (embedded mode), stopped by its PID."""

    def __init__(self, tmp: Path, *, quantized: bool, api_keys: list[str] | None = None) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "serve.log"
        config = _config(tmp, quantized=quantized, api_keys=api_keys)
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "SEGQUANT_COMPILE": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        env.pop("SEGQUANT_CONFIG", None)
        env.pop("SEGQUANT_REDIS_URL", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "segquant_cli", "serve", "--config", str(config), "--port", str(self.port)],
            cwd=ROOT,
            env=env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"segquant serve exited:\n{self.log.read_text()}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"segquant serve never became ready:\n{self.log.read_text()}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Service]]:
    """Both services start at once (their start-up overlaps): an open one with fp + w8a8, a keyed one with fp."""
    base = tmp_path_factory.mktemp("playground")
    started = {
        "open": Service(base / "open", quantized=True),
        "keyed": Service(base / "keyed", quantized=False, api_keys=[API_KEY]),
    }
    try:
        for service in started.values():
            service.wait_ready()
        yield started
    finally:
        for service in started.values():
            service.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(30_000)
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


# ------------------------------------------------------------------ helpers


def _wait_run_done(page: Any, timeout_ms: int = 90_000) -> None:
    page.wait_for_function("() => document.getElementById('results').dataset.run === 'done'", timeout=timeout_ms)


def _card(page: Any, variant: str) -> Any:
    return page.locator(f"#result-row .card[data-variant='{variant}']")


def _figure(page: Any, variant: str, name: str) -> str:
    return str(_card(page, variant).locator(f".fig-{name}").inner_text()).strip()


def _natural_width(page: Any, variant: str) -> int:
    return int(_card(page, variant).locator("img").evaluate("img => img.complete ? img.naturalWidth : 0"))


def _save_screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    print(f"playground screenshot: {path}")
    target = os.environ.get("SEGQUANT_WEB_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)
        print(f"playground screenshot copied to {Path(target) / name}")
    return path


def _open(page: Any, url: str) -> None:
    page.goto(url)
    expect(page.locator("#variant-list input[type=checkbox]").first).to_be_visible()


# ------------------------------------------------------------------ tests


def test_compare_fp_and_w8a8_side_by_side(services: dict[str, Service], page: Any, tmp_path: Path) -> None:
    service = services["open"]
    _open(page, service.url)
    boxes = page.locator("#variant-list input[type=checkbox]")
    assert sorted(boxes.evaluate_all("bs => bs.map(b => b.value)")) == ["fp", "w8a8-segquant"]
    assert all(boxes.evaluate_all("bs => bs.map(b => b.checked)")), "every variant is selected by default"
    assert page.input_value("#num_inference_steps") == str(STEPS)
    assert page.input_value("#width") == "32"
    expect(page.locator("#models-table tbody tr")).to_have_count(3)  # tiny: fp, w8a8-segquant; tiny-unet: fp

    page.get_by_label("Prompt", exact=True).fill("a red circle on a blue square")
    page.get_by_label("Seed").fill("1234")
    page.get_by_role("button", name="Generate").click()
    _wait_run_done(page)

    for variant in ("fp", "w8a8-segquant"):
        card = _card(page, variant)
        expect(card).to_have_attribute("data-state", "succeeded")
        assert _natural_width(page, variant) > 0, f"{variant}: the image did not render"
        assert card.get_attribute("data-progress") == f"{STEPS}/{STEPS}", "per-step progress was shown"
        assert _figure(page, variant, "variant") == variant
        assert _figure(page, variant, "recipe") == variant
        latency = _figure(page, variant, "latency")
        assert re.search(r"queue \d.* · inference \d.*\(total \d", latency), latency
        assert re.search(r"\d (B|KiB|MiB)$", _figure(page, variant, "weights"))
        assert re.search(r"\d (B|KiB|MiB|GiB)", _figure(page, variant, "memory"))
    assert _figure(page, "fp", "psnr") == "reference image"
    psnr_text = _figure(page, "w8a8-segquant", "psnr")
    assert re.fullmatch(r"∞|\d+\.\d\d dB", psnr_text), psnr_text
    value = _card(page, "w8a8-segquant").locator(".fig-psnr").get_attribute("data-psnr")
    assert value == "inf" or float(value) > 0
    # The models panel and the charts picked up the jobs.
    expect(page.locator("#charts .chart-box")).to_have_count(2)
    assert "1 job observed" in page.locator("#charts .chart-box[data-variant='fp'] svg").get_attribute("aria-label")
    status = page.locator("#run-status").inner_text()
    assert "2 of 2 images" in status, status
    _save_screenshot(page, tmp_path, "playground.png")

    # The page's PSNR equals the same formula in Python, applied to the images the API returned.
    fp_src = _card(page, "fp").locator("img").get_attribute("src")
    q_src = _card(page, "w8a8-segquant").locator("img").get_attribute("src")
    assert _psnr_py(fp_src, q_src) == pytest.approx(float("inf") if value == "inf" else float(value), abs=0.01)


def _psnr_py(src_a: str, src_b: str) -> float:
    import base64
    import io
    import math

    import numpy as np
    from PIL import Image

    def pixels(src: str) -> Any:
        data = base64.b64decode(src.split(",", 1)[1])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)

    mse = float(np.mean((pixels(src_a) - pixels(src_b)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def test_validation_errors_are_shown(services: dict[str, Service], page: Any) -> None:
    _open(page, services["open"].url)
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_label("Steps").fill("1000")
    page.get_by_role("button", name="Generate").click()
    alert = page.locator("#form-error")
    expect(alert).to_be_visible()
    expect(alert).to_contain_text("Steps: Must be between 1 and 100 (got 1000)")
    expect(page.locator("#num_inference_steps-error")).to_contain_text("between 1 and 100")
    expect(page.locator("#num_inference_steps")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#result-row .card")).to_have_count(0)  # nothing was queued

    page.get_by_label("Steps").fill("0")  # rejected by the API's schema (ge=1)
    page.get_by_role("button", name="Generate").click()
    expect(alert).to_contain_text("Steps: Input should be greater than or equal to 1")

    page.get_by_label("Steps").fill(str(STEPS))
    page.get_by_label("Prompt", exact=True).fill("   ")
    page.keyboard.press("Tab")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#prompt-error")).to_contain_text("Enter a prompt")
    expect(page.locator("#prompt")).to_be_focused()


def test_lost_event_stream_falls_back_to_polling(services: dict[str, Service], page: Any) -> None:
    """SSE refused every time: the page polls GET /jobs/{id}; without fp selected, PSNR says it needs fp."""
    _open(page, services["open"].url)
    page.route(re.compile(r".*/jobs/[^/]+/events$"), lambda route: route.abort("connectionreset"))
    page.locator("#variant-list input[value='fp']").uncheck()
    page.get_by_label("Prompt", exact=True).fill("a green triangle")
    page.get_by_role("button", name="Generate").click()
    _wait_run_done(page)
    card = _card(page, "w8a8-segquant")
    expect(card).to_have_attribute("data-state", "succeeded")
    expect(card).to_have_attribute("data-transport", "polling")
    assert _natural_width(page, "w8a8-segquant") > 0
    assert "PSNR needs fp" in _figure(page, "w8a8-segquant", "psnr")


def test_api_trouble_is_explained(services: dict[str, Service], page: Any) -> None:
    """A full queue (503 + Retry-After) is retried after telling the user; a failed job says why."""
    _open(page, services["open"].url)
    page.locator("#variant-list input[value='w8a8-segquant']").uncheck()
    busy = {"left": 1}

    def queue_full_once(route: Any) -> None:
        if route.request.method == "POST" and busy["left"] > 0:
            busy["left"] -= 1
            route.fulfill(
                status=503,
                headers={"Retry-After": "1", "Content-Type": "application/json"},
                body=json.dumps(
                    {
                        "error": {
                            "message": "the queue is full (64/64); retry in about 1 s",
                            "type": "service_unavailable",
                            "param": None,
                            "code": "queue_full",
                        }
                    }
                ),
            )
        else:
            route.continue_()

    page.route(re.compile(r".*/jobs$"), queue_full_once)
    page.get_by_label("Prompt", exact=True).fill("a blue square")
    page.get_by_role("button", name="Generate").click()
    expect(_card(page, "fp").locator(".card-status")).to_contain_text("The server is busy: its queue is full")
    _wait_run_done(page)
    expect(_card(page, "fp")).to_have_attribute("data-state", "succeeded")
    assert busy["left"] == 0

    def failed_job(route: Any) -> None:
        job_id = route.request.url.rstrip("/").split("/")[-2]
        job = {"id": job_id, "state": "failed", "error": {"reason": "oom", "message": "not enough memory"}}
        route.fulfill(
            status=200,
            headers={"Content-Type": "text/event-stream"},
            body=f"event: started\r\ndata: {{}}\r\nid: 1-0\r\n\r\n"
            f"event: failed\r\ndata: {json.dumps(job)}\r\nid: 2-0\r\n\r\n",
        )

    page.unroute(re.compile(r".*/jobs$"))
    page.route(re.compile(r".*/jobs/[^/]+/events$"), failed_job)
    page.get_by_role("button", name="Generate").click()
    _wait_run_done(page)
    card = _card(page, "fp")
    expect(card).to_have_attribute("data-state", "failed")
    expect(card.locator(".card-status")).to_have_text(
        "Generation failed: it ran out of memory. Server message: not enough memory"
    )


def test_works_with_an_api_key(services: dict[str, Service], page: Any) -> None:
    """The key goes in the field, is kept in localStorage and is sent on every API call, SSE included."""
    service = services["keyed"]
    # The service's auth middleware also guards the page itself; a browser visitor would need `/` and
    # `/web/*` exempted. Until then the test sends the key for the page's own files only — every API call
    # below carries the key only because the page adds it.
    page_files = re.compile(rf"^{re.escape(service.url)}/(web/.*)?$")
    page.route(
        page_files,
        lambda route: route.continue_(headers={**route.request.headers, "authorization": f"Bearer {API_KEY}"}),
    )
    page.goto(service.url)
    expect(page.locator("#page-error")).to_contain_text("needs an API key")
    key = page.get_by_label("API key")
    expect(key).to_be_visible()
    key.fill(API_KEY)
    key.press("Tab")  # change → the model list is loaded with the key
    expect(page.locator("#variant-list input[type=checkbox]")).to_have_count(1)
    expect(page.locator("#page-error")).to_be_hidden()
    expect(page.locator("#adapter-box")).to_be_hidden()  # its model lists no adapters
    assert page.evaluate("() => localStorage.getItem('segquant.playground.apiKey')") == API_KEY

    page.reload()  # the key survives a reload
    expect(page.locator("#variant-list input[type=checkbox]")).to_have_count(1)
    assert page.input_value("#api-key") == API_KEY
    page.get_by_label("Prompt", exact=True).fill("a yellow star")
    page.get_by_role("button", name="Generate").click()
    _wait_run_done(page)
    card = _card(page, "fp")
    expect(card).to_have_attribute("data-state", "succeeded")
    assert card.get_attribute("data-transport") is None, "the SSE stream (fetch + key) was used, not polling"
    assert card.get_attribute("data-progress") == f"{STEPS}/{STEPS}"
    assert "PSNR" not in _figure(page, "fp", "psnr")


def _job_bodies(page: Any) -> list[dict[str, Any]]:
    """The bodies of the page's POST /jobs requests, collected from here on."""
    bodies: list[dict[str, Any]] = []

    def keep(request: Any) -> None:
        if request.method == "POST" and request.url.endswith("/jobs"):
            bodies.append(json.loads(request.post_data))

    page.on("request", keep)
    return bodies


def _variant_names(page: Any) -> list[str]:
    return list(page.locator("#variant-list input[type=checkbox]").evaluate_all("bs => bs.map(b => b.value)"))


def test_model_picker_follows_the_chosen_model(services: dict[str, Service], page: Any) -> None:
    """Every model of GET /models can be picked; variants, sizes and the adapter picker follow it."""
    _open(page, services["open"].url)
    picker = page.get_by_label("Model", exact=True)
    assert picker.locator("option").evaluate_all("os => os.map(o => o.value)") == ["tiny", "tiny-unet"]
    assert _variant_names(page) == ["fp", "w8a8-segquant"]
    expect(page.locator("#adapter-box")).to_be_visible()

    picker.select_option("tiny-unet")
    expect(page.locator("#variant-list input[type=checkbox]")).to_have_count(1)
    assert _variant_names(page) == ["fp"]
    expect(page.locator("#model-help")).to_have_text("a tiny random UNet")
    expect(page.locator("#size-help")).to_contain_text("multiples of 8")
    assert page.get_attribute("#width", "step") == "8" and page.input_value("#width") == "32"
    expect(page.locator("#adapter-box")).to_be_hidden()  # this model lists no adapters
    expect(page.locator("#charts .chart-box")).to_have_count(1)

    bodies = _job_bodies(page)
    page.get_by_label("Prompt", exact=True).fill("a yellow square")
    page.get_by_role("button", name="Generate").click()
    _wait_run_done(page)
    expect(_card(page, "fp")).to_have_attribute("data-state", "succeeded")  # loaded on its first job
    assert _natural_width(page, "fp") > 0
    assert [(b["model"], b["variant"], "loras" in b) for b in bodies] == [("tiny-unet", "fp", False)]

    picker.select_option("tiny")
    expect(page.locator("#variant-list input[type=checkbox]")).to_have_count(2)
    assert page.get_attribute("#width", "step") == "2"
    expect(page.locator("#adapter-box")).to_be_visible()


def test_adapter_picker_compares_variants_with_the_adapter(
    services: dict[str, Service], page: Any, tmp_path: Path
) -> None:
    """Picking an adapter sets its default scale, offers (never forces) its trigger word, and every variant's
    job carries it; the same seed without the adapter gives another image."""
    _open(page, services["open"].url)
    expect(page.locator("#adapter-box")).to_be_visible()
    adapter = page.get_by_label("Adapter", exact=True)
    assert adapter.input_value() == ""  # none by default
    expect(page.locator("#adapter_scale")).to_be_disabled()
    expect(page.locator("#trigger-hint")).to_be_hidden()

    prompt = page.get_by_label("Prompt", exact=True)
    prompt.fill("a red circle")
    adapter.select_option(ADAPTER)
    assert page.input_value("#adapter_scale") == str(ADAPTER_SCALE)
    expect(page.locator("#adapter-help")).to_contain_text("A random test adapter")
    expect(page.locator("#trigger-text")).to_contain_text(f"only when the prompt contains its trigger “{TRIGGER}”")
    assert prompt.input_value() == "a red circle", "the prompt is not rewritten behind the user's back"
    prompt.evaluate("t => t.setSelectionRange(2, 2)")
    page.get_by_role("button", name=f"Insert “{TRIGGER}” at the cursor").click()
    assert prompt.input_value() == f"a {TRIGGER} red circle"
    expect(page.locator("#trigger-text")).to_have_text(f"The prompt contains the trigger “{TRIGGER}”.")
    expect(page.locator("#trigger-insert")).to_be_hidden()

    page.get_by_label("Seed").fill("4321")
    bodies = _job_bodies(page)
    page.get_by_role("button", name="Generate").click()
    _wait_run_done(page)
    assert sorted(b["variant"] for b in bodies) == ["fp", "w8a8-segquant"]
    assert all(b["loras"] == [{"name": ADAPTER, "scale": ADAPTER_SCALE}] for b in bodies), bodies
    for variant in ("fp", "w8a8-segquant"):
        expect(_card(page, variant)).to_have_attribute("data-state", "succeeded")
        assert _figure(page, variant, "adapter") == f"{ADAPTER} × {ADAPTER_SCALE}"
    assert re.fullmatch(r"∞|\d+\.\d\d dB", _figure(page, "w8a8-segquant", "psnr"))
    expect(page.locator("#run-status")).to_contain_text(f"adapter {ADAPTER} × {ADAPTER_SCALE}")
    with_adapter = _card(page, "fp").locator("img").get_attribute("src")
    _save_screenshot(page, tmp_path, "playground-adapter.png")

    adapter.select_option("")  # the same prompt and seed without it
    expect(page.locator("#trigger-hint")).to_be_hidden()
    page.locator("#variant-list input[value='w8a8-segquant']").uncheck()
    bodies.clear()
    page.get_by_role("button", name="Generate").click()
    _wait_run_done(page)
    assert [("loras" in b, b["seed"], b["prompt"]) for b in bodies] == [(False, 4321, f"a {TRIGGER} red circle")]
    expect(_card(page, "fp")).to_have_attribute("data-state", "succeeded")
    assert _card(page, "fp").locator(".fig-adapter").count() == 0
    assert _card(page, "fp").locator("img").get_attribute("src") != with_adapter

    adapter.select_option(ADAPTER)  # a scale the API refuses: the field and the reason are shown
    page.get_by_label("Adapter scale").fill("10")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#form-error")).to_contain_text("Adapter scale: Must be between -4 and 4 (got 10)")
    expect(page.locator("#adapter_scale")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#result-row .card")).to_have_count(0)
