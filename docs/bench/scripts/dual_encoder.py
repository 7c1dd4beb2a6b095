"""DualScale encoder, the former cat form vs the broadcast form now in fused_quant.py: encode alone and the whole
dual layer, alternating in one process (issue 15 deliverable 3; docs/benchmarks.md "Segments and dual").

    python docs/bench/scripts/dual_encoder.py 1024 6144 1536 12
"""
import sys

import torch
from torch import nn

import segquant_core.backends.fused_quant as fq
from segquant_core.bench.layer import LayerShape, _inputs, build_segquant
from segquant_core.bench.timing import alternate
from segquant_core.recipes import recipe


def static_dual_cat(x, smooth, sp, sn, dtype):  # the encoder before bf58550
    xf = x.float() / smooth
    offset = 128.0 if dtype == torch.uint8 else 0.0
    pos = torch.clamp(torch.round(xf.clamp(min=0.0) / sp), 0.0, 127.0)
    neg = torch.clamp(torch.round(xf.clamp(max=0.0) / sn), -128.0, 0.0)
    codes = torch.cat((pos, neg))
    return (codes + offset if offset else codes).to(dtype)


M, K, N = (int(a) for a in sys.argv[1:4])
rounds = int(sys.argv[4])
shape = LayerShape("ff", M, K, N, gelu_input=True)
torch.manual_seed(0)
lin = nn.Linear(K, N).eval()
calib = [_inputs(shape, 2 + i) for i in range(4)]
x16 = _inputs(shape, 1).bfloat16()
plain = build_segquant(lin, recipe("w8a8"), None, False, calib)
dual = build_segquant(lin, recipe("w8a8", dual=True), None, True, calib)
old_kernel = torch.compile(static_dual_cat, dynamic=True, fullgraph=True)
new_kernel = fq._kernel("static_dual")
single_kernel = fq._kernel("static_single")
ones, sp, sn = torch.ones(K), torch.tensor(0.05), torch.tensor(0.0015)
orig = fq._kernel


def dual_with_old_encoder():
    fq._kernel = lambda name: old_kernel if name == "static_dual" else orig(name)
    try:
        return dual(x16)
    finally:
        fq._kernel = orig


with torch.no_grad():
    assert torch.equal(dual_with_old_encoder(), dual(x16))
    assert torch.equal(old_kernel(x16, ones, sp, sn, torch.uint8), new_kernel(x16, ones, sp, sn, torch.uint8))
    t = alternate(
        {
            "encode single": lambda: single_kernel(x16, ones, sp, torch.uint8),
            "encode dual (cat)": lambda: old_kernel(x16, ones, sp, sn, torch.uint8),
            "encode dual (broadcast)": lambda: new_kernel(x16, ones, sp, sn, torch.uint8),
            "plain w8a8": lambda: plain(x16),
            "dual (cat encode)": dual_with_old_encoder,
            "dual (broadcast encode)": lambda: dual(x16),
        },
        rounds=rounds,
        warmup=2,
    )
base = t["plain w8a8"].median_s
for n, tt in t.items():
    print(f"{M}x{K}x{N} {n:24s} {tt.median_ms:8.2f} ms  {base / tt.median_s:5.2f}x plain")
