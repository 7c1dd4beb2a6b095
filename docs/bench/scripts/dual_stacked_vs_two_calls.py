"""DualScale on oneDNN: two fused calls (kept) vs one stacked [2M, K] call + combine. python docs/bench/scripts/dual_stacked_vs_two_calls.py 1024 6144 1536 8
"""
import sys, torch

from torch import nn
from segquant_core.bench.layer import LayerShape, build_segquant, _inputs
from segquant_core.bench.timing import alternate
from segquant_core.recipes import recipe
from segquant_core.backends.fused_quant import encode_rows
M, K, N = (int(a) for a in sys.argv[1:4]); rounds = int(sys.argv[4])
shape = LayerShape("ff", M, K, N, gelu_input=True)
torch.manual_seed(0)
lin = nn.Linear(K, N).eval()
calib = [_inputs(shape, 2 + i) for i in range(4)]
x32 = _inputs(shape, 1); x16 = x32.bfloat16()
plain = build_segquant(lin, recipe("w8a8"), None, False, calib)
dual = build_segquant(lin, recipe("w8a8", dual=True), None, True, calib)
pg = dual._prepared.groups[0]; p, g = pg.packed, pg.group; bias = dual._prepared.bias
act = dual.cfg.activation
sp, sn = p.act_scales[:2]
def stacked():
    rows, _ = encode_rows(x16, act, g.act_scale, g.smooth, unsigned=True)
    y = torch.ops.onednn.qlinear_pointwise(rows, 1.0, 128, p.onednn, g.w_scale, p.zero_points, None, 1.0, 0, torch.float32, "none", [], "")
    out = y[:M].mul_(sp).add_(y[M:], alpha=sn)
    return out.add_(bias).to(torch.bfloat16)
def encode_only():
    return encode_rows(x16, act, g.act_scale, g.smooth, unsigned=True)
with torch.no_grad():
    ref = dual(x16).float()
    print("stacked vs two-call rel diff", float((stacked().float() - ref).norm() / ref.norm()))
    t = alternate({"plain": lambda: plain(x16), "dual two calls": lambda: dual(x16), "dual stacked": stacked, "dual encode only": encode_only}, rounds=rounds, warmup=2)
    base = t["plain"].median_s
    for n, tt in t.items():
        print(f"{n:18s} {tt.median_ms:8.2f} ms  {base / tt.median_s:5.2f}x plain")
