"""Per-head in-segment layer (24 heads x 64) on CPU: plain W8A8 vs the exact path at several row-block sizes vs the
folded one-GEMM form; errors vs fp32 and vs the reference backend. python docs/bench/scripts/inseg_options.py 1024 8
"""
import sys, statistics as st, time, torch

from torch import nn
from segquant_core.bench.layer import LayerShape, build_segquant, _inputs
from segquant_core.bench.timing import alternate
from segquant_core.detect.plan import Segments
from segquant_core.recipes import recipe
from segquant_core.backends import cpu_onednn as C
from segquant_core.backends.reference import ReferenceBackend
from segquant_core.backends.fused_quant import encode_channels
M = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 10
K = N = 1536
shape = LayerShape("qkv", M, K, N, Segments("in", (64,) * 24))
torch.manual_seed(0)
lin = nn.Linear(K, N).eval()
calib = [_inputs(shape, 2 + i) for i in range(4)]
x32 = _inputs(shape, 1)
# per-head spread like real attention outputs: some heads much larger
x32 = x32 * torch.linspace(0.3, 3.0, 24).repeat_interleave(64)
calib = [c * torch.linspace(0.3, 3.0, 24).repeat_interleave(64) for c in calib]
x16 = x32.bfloat16()
plain = build_segquant(lin, recipe("w8a8"), None, False, calib)
seg = build_segquant(lin, recipe("w8a8", seg=True), shape.segments, False, calib)
st_ = seg._prepared
be = seg._backend
ref_layer = build_segquant(lin, recipe("w8a8", seg=True), shape.segments, False, calib, backend="reference")
# folded: V[n,k] = s_h * w_h[n] * W_h[n,k]; requantize per row
V = torch.cat([be.group_codes(pg).float() * pg.group.w_scale[:, None] * pg.packed.act_scales[0] for pg in st_.groups], dim=1)
v = V.abs().amax(1) / 127
Q = torch.clamp(torch.round(V / v[:, None]), -128, 127).to(torch.int8)
packed = torch.ops.onednn.qlinear_prepack(Q, None)
zps = torch.zeros(N, dtype=torch.int64)
smooth, scales = st_.channels
bias = st_.bias
def folded():
    c = encode_channels(x16, smooth, scales, unsigned=True)
    return torch.ops.onednn.qlinear_pointwise(c, 1.0, 128, packed, v, zps, bias, 1.0, 0, torch.bfloat16, "none", [], "")
with torch.no_grad():
    ref = lin(x32)
    yref = ref_layer(x16).float()
    e = lambda y: (float((y.float() - ref).norm() / ref.norm()), float((y.float() - yref).norm() / yref.norm()))
    print("err vs fp32, vs reference: plain", e(plain(x16)), "seg", e(seg(x16)), "folded", e(folded()), "reference", e(yref))
    fns = {"plain": lambda: plain(x16), "folded": folded}
    for rows in (128, 256, 512, 1024):
        def f(rows=rows):
            C.IN_SEGMENT_ROWS = rows
            return seg(x16)
        fns[f"seg rows{rows}"] = f
    t = alternate(fns, rounds=rounds, warmup=2)
    base = t["plain"].median_s
    for n, tt in t.items():
        print(f"{n:14s} {tt.median_ms:8.2f} ms  {base / tt.median_s:5.2f}x plain")
