"""Opt-in folded in-segments on the CPU backend: one int8 GEMM with the per-head activation scales folded into
a requantized weight (SEGQUANT_CPU_IN_SEGMENTS=folded); the default stays the exact per-segment path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segquant_core.backends import get_backend
from segquant_core.backends.cpu_onednn import OneDNNInt8Backend
from segquant_core.backends.folding import fold_in_segments
from segquant_core.backends.fused_quant import encode_channels
from segquant_core.backends.reference import ReferenceBackend
from segquant_core.bench.layer import build_segquant
from segquant_core.detect.plan import Segments
from segquant_core.recipes import recipe

pytestmark = pytest.mark.skipif(not OneDNNInt8Backend.available(), reason="no oneDNN quantized linear in this build")

HEADS, HEAD_DIM, N, M = 4, 16, 24, 48
# Heads of very different magnitude, as in attention outputs: the case the fold's second rounding hurts.
HEAD_GAIN = torch.tensor([0.2, 1.0, 3.0, 0.5]).repeat_interleave(HEAD_DIM)


def _inputs(seed: int) -> torch.Tensor:
    return torch.randn(M, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(seed)) * HEAD_GAIN


def _per_head_layer():
    torch.manual_seed(0)
    lin = nn.Linear(HEADS * HEAD_DIM, N)
    return build_segquant(
        lin, recipe("w8a8", seg=True), Segments("in", (HEAD_DIM,) * HEADS), False, [_inputs(s) for s in (1, 2)]
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_folded_layer_is_one_gemm_of_the_folded_weight(monkeypatch):
    layer = _per_head_layer()
    x = _inputs(3)
    layer.set_backend(ReferenceBackend())
    ref = layer(x)
    exact_codes = [s.quantized_weight().codes().clone() for s in layer.segs]
    monkeypatch.setenv("SEGQUANT_CPU_IN_SEGMENTS", "folded")
    layer.set_backend(get_backend("cpu-onednn-int8"))
    state = layer._prepared
    assert state.folded is not None and state.folded.k == HEADS * HEAD_DIM
    y = layer(x)
    # what the kernel must compute: per-head codes times the requantized folded weight, column scales, bias
    segments = [(c, pg.group.w_scale, pg.packed.act_scales[0]) for c, pg in zip(exact_codes, state.groups)]
    q, v = fold_in_segments(segments)
    codes = encode_channels(x, *state.channels, unsigned=False).float()
    want = codes @ (q.float() * v[:, None]).t() + layer.bias
    assert _rel(y, want) < 1e-5
    # a different numeric from the reference (the weights are rounded twice), but still a close one
    assert 1e-4 < _rel(y, ref) < 0.05
    # the checkpoint's codes are untouched: the exact per-segment codes come back as they were
    recovered = layer.backend.recover_codes(layer, state)
    assert recovered is not None and all(torch.equal(a, b) for a, b in zip(recovered, exact_codes))


def test_default_stays_exact_and_folding_costs_a_second_weight_copy(monkeypatch):
    layer = _per_head_layer()
    x = _inputs(4)
    layer.set_backend(ReferenceBackend())
    ref = layer(x)
    monkeypatch.delenv("SEGQUANT_CPU_IN_SEGMENTS", raising=False)
    layer.set_backend(get_backend("cpu-onednn-int8"))
    assert layer._prepared.folded is None and _rel(layer(x), ref) < 1e-5
    exact_bytes = layer.resident_bytes()
    monkeypatch.setenv("SEGQUANT_CPU_IN_SEGMENTS", "folded")
    layer.set_backend(get_backend("cpu-onednn-int8"))
    assert layer.resident_bytes() >= exact_bytes + N * HEADS * HEAD_DIM
    monkeypatch.setenv("SEGQUANT_CPU_IN_SEGMENTS", "fast")
    with pytest.raises(ValueError, match="SEGQUANT_CPU_IN_SEGMENTS"):
        layer.set_backend(get_backend("cpu-onednn-int8"))
