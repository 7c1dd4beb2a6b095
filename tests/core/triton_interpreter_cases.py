"""Triton fused-kernel checks, run in a subprocess with TRITON_INTERPRET=1 (set before triton is imported).

Run directly: ``TRITON_INTERPRET=1 python tests/core/triton_interpreter_cases.py``; exits non-zero on failure.
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
from torch import nn  # noqa: E402

from segquant_core.backends import get_backend  # noqa: E402
from segquant_core.backends.triton_fused import TritonFusedBackend, reference_int_gemm  # noqa: E402
from segquant_core.detect.plan import LayerPlan, Plan, Segments  # noqa: E402
from segquant_core.quantize import quantize  # noqa: E402
from segquant_core.quantizers import ActivationSpec, WeightSpec  # noqa: E402
from segquant_core.recipes import recipe  # noqa: E402
from segquant_core.seglinear import SegLinear, SegLinearConfig  # noqa: E402


class One(nn.Module):
    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.layer = nn.Linear(k, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def exact_int_gemm() -> None:
    """With codes as inputs and unit scales the kernel's output equals the int32 product exactly."""
    torch.manual_seed(0)
    m, k, n = 40, 64, 48
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    cfg = SegLinearConfig(
        k, n, Segments("out", (n,)), WeightSpec("int8", "tensor"), ActivationSpec("int8", "tensor"), bias=False
    )
    layer = SegLinear(cfg)
    layer.segs[0].weight = w
    layer.segs[0].weight_scale = torch.ones(1)
    layer.segs[0].act_scale = torch.ones(1)
    layer.set_backend(TritonFusedBackend())
    y = layer(a.float())
    ref = reference_int_gemm(a, w)
    assert torch.equal(y.to(torch.int64), ref.to(torch.int64)), "int8 GEMM is not exact"
    # in-segments (K groups) with unit scales are exact too
    cfg_in = SegLinearConfig(
        k,
        n,
        Segments("in", (16, 48)),
        WeightSpec("int8", "tensor"),
        ActivationSpec("int8", "tensor", dual=True),
        bias=False,
    )
    layer = SegLinear(cfg_in)
    for seg, (lo, hi) in zip(layer.segs, cfg_in.segments.bounds()):
        seg.weight = w[:, lo:hi].contiguous()
        seg.weight_scale = torch.ones(1)
        seg.act_scale = torch.ones(2)
    layer.set_backend(TritonFusedBackend())
    y = layer(a.float())
    assert torch.equal(y.to(torch.int64), ref.to(torch.int64)), "K-grouped dual GEMM is not exact"
    print("exact int32 GEMM: ok")


def matches_reference() -> None:
    """Real-quantization layers built by the engine: fused kernel vs fake-quant reference."""
    torch.manual_seed(1)
    k, n = 64, 96
    cases = {
        "plain": (None, False, "w8a8"),
        "dual": (None, True, "w8a8"),
        "out-seg+smooth+dual": (Segments("out", (32, 32, 32)), True, "w8a8-segquant"),
        "out-seg": (Segments("out", (32, 64)), False, "w8a8:seg=on"),
        "in-seg ragged+dual": (Segments("in", (16, 48)), True, "w8a8-segquant"),
        "in-seg ragged, dual on one segment": (Segments("in", (16, 48)), (False, True), "w8a8-segquant"),
        "in-seg per-head": (Segments("in", (16,) * 4), False, "w8a8-smooth:seg=on"),
        "int4 weights": (Segments("in", (32, 32)), True, "w8a8-segquant:lowrank=4"),
    }
    worst = 0.0
    for name, (segs, dual, rname) in cases.items():
        model = One(k, n)
        calls = [{"x": torch.nn.functional.gelu(torch.randn(24, k) * 3)} for _ in range(4)]
        r = recipe(rname)
        if name == "int4 weights":
            r = r.with_switches(weight="int4", weight_granularity="channel")
        quantize(model, r, calls, Plan([LayerPlan("layer", segs, dual)]), backend="reference", progress=False)
        x = torch.nn.functional.gelu(torch.randn(37, k) * 3)
        x_before = x.clone()
        layer = model.layer
        if isinstance(dual, tuple):
            assert layer.cfg.dual_segments == dual and [s.act_scale.numel() for s in layer.segs] == [1, 2]
        ref = layer(x)
        layer.set_backend(get_backend("triton-fused"))
        y = layer(x)
        assert torch.equal(x, x_before), f"{name}: the fused kernel wrote into its input"
        err = float((y - ref).norm() / ref.norm())
        worst = max(worst, err)
        assert err < 1e-3, f"{name}: rel. error {err:.2e} vs reference"
    print(f"fused kernel vs reference: worst rel. error {worst:.2e}: ok")


def unsupported_layers_are_refused() -> None:
    model = One(64, 32)
    calls = [{"x": torch.randn(8, 64)} for _ in range(2)]
    quantize(
        model,
        recipe("w4a8-segquant", gptq=False),
        calls,
        Plan([LayerPlan("layer")]),
        backend="reference",
        progress=False,
    )
    reason = TritonFusedBackend().unsupported_reason(model.layer)
    assert reason is not None and "static" in reason, reason
    print("dynamic activations refused with a reason: ok")


if __name__ == "__main__":
    exact_int_gemm()
    matches_reference()
    unsupported_layers_are_refused()
    sys.exit(0)
