"""Fuzz the live OpenAPI schema with schemathesis: every phase (examples, coverage, fuzzing, stateful) against
a real embedded ``segquant serve`` process; any 5xx answer fails the test.

Bounded: a fixed seed, 60 examples per operation, one schemathesis worker (about three minutes here).
The server's sync wait (0.5 s) is shorter than the shortest deadline a request may ask for (1 s), so a
backlog of fuzzed jobs cannot turn into expired 504s, and the queue is deep enough never to answer 503.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import free_port, make_settings, spawn, stop, write_config

pytest.importorskip("schemathesis")

SEED = 20261206
MAX_EXAMPLES = 60  # with 60 the run finds the 5e-324 deadline 504 on the old code; 15 did not


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"segquant serve exited early:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"segquant serve never became ready:\n{log.read_text()[-3000:]}")


def test_no_5xx_under_schemathesis(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, limits={"sync_timeout_s": 0.5, "max_inference_steps": 8}, queue={"max_depth": 100_000}
    )
    config = write_config(tmp_path / "serve.json", settings)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    proc = spawn(["serve", "--config", str(config), "--port", str(port)], log)
    try:
        _wait_ready(url, proc, log)
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                f"{url}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--phases",
                "examples,coverage,fuzzing,stateful",
                "--max-examples",
                str(MAX_EXAMPLES),
                "--seed",
                str(SEED),
                "--workers",
                "1",
                "--no-color",
                "--generation-database",
                "none",
                "--request-timeout",
                "30",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=540,
        )
        report = run.stdout[-6000:] + run.stderr[-2000:]
        assert run.returncode == 0, (
            f"schemathesis found problems:\n{report}\n--- server log ---\n{log.read_text()[-3000:]}"
        )
        assert "passed" in run.stdout, report
    finally:
        assert stop(proc) == 0 or proc.returncode is not None
