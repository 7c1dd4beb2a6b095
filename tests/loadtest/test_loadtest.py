"""The load generator against the embedded service: per-variant table, JSON and PNG from a short run."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from loadtest.__main__ import main
from loadtest.report import print_table, write_json, write_png
from loadtest.runner import LoadConfig, run
from loadtest.stats import percentile, summarize
from tests.service.helpers import live_server, make_settings, tiny_models, wait_ready

CALIB = {"samples": 4, "num_inference_steps": 2, "steps_per_prompt": 2}


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_short_run_against_embedded_service(
    tmp_path: Path, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tiny_models("fp", {"name": "w8a8-segquant", "recipe": "w8a8-segquant", "calibration": CALIB})
    settings = make_settings(tmp_path, models=models)
    async with live_server(settings) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            await wait_ready(c)
        cfg = LoadConfig(
            base_url=url,
            variants=["fp", "w8a8-segquant"],
            mode=mode,
            concurrency=2,
            rate=8.0,
            requests=6,
            duration=120,
            steps=2,
        )
        samples, wall = await run(cfg)
    rows = summarize(samples, wall)
    assert [r["variant"] for r in rows] == ["fp", "w8a8-segquant"]
    for r in rows:
        assert r["requests"] == 3 and r["ok"] == 3 and r["error_rate"] == 0.0
        assert r["p50_s"] is not None and r["p50_s"] <= r["p99_s"]
        assert r["inference_mean_s"] is not None and r["queue_wait_mean_s"] is not None
        assert r["throughput_rps"] > 0
    print_table(rows)
    assert "w8a8-segquant" in capsys.readouterr().out
    write_json(tmp_path / "r.json", {"mode": mode}, rows, samples, wall)
    write_png(tmp_path / "r.png", samples)
    assert json.loads((tmp_path / "r.json").read_text())["summary"][0]["variant"] == "fp"
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_unreachable_server_counts_errors_and_exits_1(tmp_path: Path) -> None:
    rc = main(["--url", "http://127.0.0.1:9", "--requests", "2", "--concurrency", "1", "--out", str(tmp_path)])
    assert rc == 1
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["summary"][0]["error_rate"] == 1.0


@pytest.mark.parametrize("argv", [["--url", "ftp://x"], ["--requests", "0"], ["--variants", ","]])
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    assert main(argv) == 2


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
