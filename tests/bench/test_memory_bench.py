"""bench memory and --device: the SD3.5-medium config, the targets' arithmetic, and the device argument."""

from __future__ import annotations

import subprocess
import sys

import pytest

from segquant_core.bench.layer import LayerShape, run_layer_bench
from segquant_core.bench.memory import evaluate_targets, sd35_medium_config


def test_sd35_medium_config_keeps_real_sizes_and_cuts_blocks():
    cfg = sd35_medium_config(2)
    assert cfg["num_layers"] == 2 and cfg["dual_attention_layers"] == [0, 1]
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == 1536 and cfg["pos_embed_max_size"] == 384
    with pytest.raises(ValueError, match="between 1 and 24"):
        sd35_medium_config(25)


def _probe(base: int, peak: int, rss: int, resident: int) -> dict:
    return {"baseline_rss_bytes": base, "peak_rss_bytes": peak, "rss_bytes": rss, "resident_bytes": [resident]}


def test_targets_compare_each_measured_value_with_its_limit():
    files = {"fp": 400, "w8a8-segquant": 200, "w4a8-segquant": 120}
    results = {
        "baseline": _probe(1000, 1000, 1000, 0),
        "fp": _probe(1000, 1500, 1400, 400),
        "w8a8-segquant": _probe(1000, 1230, 1200, 200),
        "w4a8-segquant": _probe(1000, 1150, 1120, 120),
        "serve-3": {**_probe(1000, 1900, 1900, 0), "resident_bytes": [400, 200, 120]},
    }
    t = evaluate_targets(results, files)
    assert [i["met"] for i in t["items"]] == [True, True, False]  # 1900 > 1000 + 1.15 × 720
    assert t["items"][0]["limit"] == 1240 and not t["targets_met"]
    results["serve-3"]["rss_bytes"] = 1828
    results["w8a8-segquant"]["peak_rss_bytes"] = 1600  # above fp's peak and above 1000 + 1.2 × 200
    t = evaluate_targets(results, files)
    assert [i["met"] for i in t["items"]] == [False, False, True]


def test_layer_bench_takes_the_device_argument():
    rows = run_layer_bench([LayerShape("tiny", 4, 32, 32)], rounds=1, include_compile=False, device="cpu")
    assert {r["candidate"] for r in rows} >= {"bf16", "segquant w8a8"}
    assert all("cuda_max_allocated_bytes" not in r for r in rows)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU error")
@pytest.mark.parametrize("level", ["layer", "block", "pipeline", "memory"])
def test_device_cuda_without_a_gpu_is_one_readable_error(level):
    proc = subprocess.run(
        [sys.executable, "-m", "segquant_cli", "bench", level, "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "segquant: error: --device cuda: no CUDA device is available here"
