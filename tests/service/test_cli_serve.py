"""``segquant serve`` as a real process in embedded mode: ready, answers POST /generate with a PNG, drains."""

from __future__ import annotations

import base64
import io
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.service.helpers import free_port, make_settings, spawn, stop, write_config


def test_embedded_serve_answers_generate(tmp_path: Path) -> None:
    config = write_config(tmp_path / "serve.json", make_settings(tmp_path))
    port = free_port()
    log = tmp_path / "serve.log"
    proc = spawn(["serve", "--config", str(config), "--port", str(port)], log)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            r = c.post("/generate", json={"prompt": "a red circle"})
            assert r.status_code == 200, r.text
            image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["b64_json"])))
            assert image.format == "PNG" and image.size == (32, 32)
            assert c.get("/docs").status_code == 200 and "/generate" in c.get("/openapi.json").json()["paths"]
    finally:
        code = stop(proc, signal.SIGTERM)
    assert code == 0, log.read_text()


@pytest.fixture
def root_logging() -> Iterator[None]:
    """``main()`` configures logging on this test's captured stderr: put the root logger back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
def test_cli_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from segquant_cli.main import main

    monkeypatch.delenv("SEGQUANT_REDIS_URL", raising=False)
    assert main(["worker"]) == 2
    assert "needs a Redis URL" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [{name: a, source: 'tiny:mmdit', variants: [fp, fp]}]\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "duplicate variant names" in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
    assert main(["worker", "--redis-url", "redis://127.0.0.1:1/0", "--variants", "nope:fp"]) == 2
    assert "valid: shapes-mmdit" in capsys.readouterr().err
