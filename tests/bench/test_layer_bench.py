"""segquant_core.bench: the benchmark builds what its rows say, alternates candidates, and reports ratios."""

from __future__ import annotations

import torch
from torch import nn

from segquant_core import SegLinear
from segquant_core.bench.layer import LayerShape, build_segquant, run_layer_bench, segquant_variants
from segquant_core.bench.timing import alternate
from segquant_core.detect.plan import Segments

TINY_ADALN = LayerShape("adaln 2×32×192", 2, 32, 192, Segments("out", (32,) * 6), gelu_input=True)
TINY_QKV = LayerShape("qkv 16×32×32", 16, 32, 32, Segments("in", (8,) * 4))


def _calib(shape: LayerShape) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.functional.gelu(torch.randn(shape.m, shape.k, generator=g)) for _ in range(2)]


def test_every_variant_builds_the_layer_its_label_names():
    # Regression: the dual and seg rows once used a recipe with seg/dual off, so they silently measured the
    # plain layer.
    for shape in (TINY_ADALN, TINY_QKV):
        lin = nn.Linear(shape.k, shape.n)
        for label, r, segments, dual in segquant_variants(shape):
            layer = build_segquant(lin, r, segments, dual, _calib(shape))
            assert isinstance(layer, SegLinear), label
            assert layer.cfg.activation.dual is ("dual" in label), label
            expect_segments = segments.count if "seg(" in label or "seg+" in label else 1
            assert len(layer.segs) == expect_segments, label


def test_alternate_interleaves_candidates_and_takes_medians():
    calls: list[str] = []
    t = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4  # warm-up round, then A B A B A B
    assert set(t) == {"a", "b"} and all(len(v.samples) == 3 and v.median_s >= 0 for v in t.values())


def test_layer_bench_rows_report_ratios_errors_and_bytes():
    rows = run_layer_bench([TINY_ADALN], rounds=2, include_compile=False)
    by_name = {r["candidate"]: r for r in rows}
    assert {"fp32", "bf16", "torch.ao int8 dynamic", "segquant w8a8", "segquant w8a8 dual"} <= set(by_name)
    assert by_name["bf16"]["vs_bf16"] == 1.0 and by_name["fp32"]["vs_fp32"] == 1.0
    assert by_name["fp32"]["rel_err"] == 0.0
    for name, row in by_name.items():
        assert row["median_ms"] > 0 and row["rounds"] == 2, name
        if name.startswith("segquant w8a8"):
            assert 0 < row["rel_err"] < 0.05, (name, row["rel_err"])  # int8: small but nonzero error
            if "smooth" not in name:  # smoothing vectors (fp32, one per segment) weigh a lot at this tiny size
                assert row["weight_bytes"] < by_name["bf16"]["weight_bytes"] * 0.6


def test_markdown_report_has_the_command_and_one_row_per_candidate(tmp_path):
    from segquant_core.bench.report import write_markdown

    rows = [
        {"candidate": "bf16", "median_ms": 12.0, "vs_bf16": 1.0, "weight_bytes": 4_718_592},
        {"candidate": "segquant w8a8", "median_ms": 6.9, "vs_bf16": 1.739, "rel_err": 0.0128},
    ]
    path = write_markdown(
        tmp_path / "b.md",
        "bench layer",
        rows,
        ["candidate", "median_ms", "vs_bf16", "rel_err", "weight_bytes"],
        "segquant bench layer",
    )
    text = path.read_text().splitlines()
    assert text[0] == "**bench layer**" and text[2] == "`segquant bench layer`"
    assert text[4] == "| candidate | median_ms | vs_bf16 | rel_err | weight_bytes |"
    assert text[6] == "| bf16 | 12.000 | 1.000 | – | 4,718,592 |"
    assert text[7] == "| segquant w8a8 | 6.900 | 1.739 | 0.013 | – |"


def test_peak_rss_can_be_reset_to_measure_one_phase():
    import sys

    import numpy as np
    import pytest

    from segquant_core.bench.timing import current_peak_rss_bytes, reset_peak_rss

    if not sys.platform.startswith("linux"):
        pytest.skip("clear_refs is Linux-only")
    big = np.ones(40_000_000)  # 320 MB raises the high-water mark
    del big
    high = current_peak_rss_bytes()
    assert reset_peak_rss()
    assert current_peak_rss_bytes() < high - 200e6  # the 320 MB spike is no longer in the mark


def test_layer_targets_say_met_or_not_per_shape_peer_and_segment_form():
    from segquant_core.bench.layer import layer_targets
    from segquant_core.bench.peers import PEERS

    pt2e = PEERS["pt2e"]()

    def row(shape: str, candidate: str, ms: float, err: float = 0.01) -> dict:
        return {"shape": shape, "candidate": candidate, "median_ms": ms, "vs_bf16": round(20.0 / ms, 3), "rel_err": err}

    rows = [
        row("a", "bf16", 20.0),
        row("a", "segquant w8a8", 10.0, 0.013),  # 2.0× bf16, faster than the peer, but a larger error
        row("a", "segquant w8a8 seg(in×24)", 16.0),  # exact per-head: 0.625× plain
        row("a", "segquant w8a8 seg(in×24) folded (opt-in)", 9.0),  # not the exact path: not what is checked
        row("a", pt2e.label, 11.0, 0.011),
        row("b", "bf16", 20.0),
        row("b", "segquant w8a8", 12.0),  # 1.67× bf16
    ]
    got = {t["target"]: (t["measured"], t["met"]) for t in layer_targets(rows, [pt2e])}
    assert got == {
        "a: w8a8 vs bf16": (2.0, True),
        "a: w8a8 vs pt2e (speed)": (1.1, True),
        "a: w8a8 rel_err vs pt2e's": (0.013, False),
        "a: per-head in-segments vs plain w8a8": (0.625, False),
        "b: w8a8 vs bf16": (1.667, False),
    }
