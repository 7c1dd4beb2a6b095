"""GPU kernel check: the fused Triton W8A8 kernel and the fp8 path against the reference, at real shapes.

``python -m segquant_core.bench.kernels --json out.json [--device cuda] [--m 4096 --k 3072 --n 3072]``

For each case (single static scale, DualScale on a GELU input, 24 in-segments = per-head scales, fp8) the
layer is built by the engine's own flow twice — once on the fast backend, once on ``reference`` (fake
quantization in fp32, the ground truth) — and the rows report the error of the fast path against the
reference, its error against the float layer, and its time next to cuBLAS bf16 (alternating, medians,
CUDA-synchronised). Targets filed for an H100: fused W8A8 ≥ 1.4× bf16, fused dual-scale ≥ 1.1×.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segquant_core.bench.layer import build_segquant
from segquant_core.bench.timing import alternate, environment
from segquant_core.detect.plan import Segments
from segquant_core.recipes import recipe

TARGETS = {"w8a8 static": 1.4, "w8a8 dual": 1.1}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def cases(k: int) -> list[tuple[str, Any, Segments | None, bool, str]]:
    heads = 24 if k % 24 == 0 else 1
    return [
        ("w8a8 static", recipe("w8a8"), None, False, "triton-fused"),
        ("w8a8 dual", recipe("w8a8", dual=True), None, True, "triton-fused"),
        (
            f"w8a8 in-seg x{heads}",
            recipe("w8a8", seg=True),
            Segments("in", (k // heads,) * heads),
            False,
            "triton-fused",
        ),
        ("fp8 e4m3", recipe("fp8-segquant", smooth=False, gptq=False), None, False, "scaled-mm-fp8"),
    ]


def run_kernel_check(
    m: int = 4096, k: int = 3072, n: int = 3072, *, device: str = "cuda", rounds: int = 10
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    lin = nn.Linear(k, n).eval().to(device)
    lin16 = copy.deepcopy(lin).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g).to(device)
    xg = F.gelu(x * 2.0, approximate="tanh")  # DualScale's case: a GELU output
    calib = [torch.randn(m // 4, k, generator=g).to(device) for _ in range(2)]
    calib_g = [F.gelu(c * 2.0, approximate="tanh") for c in calib]
    rows: list[dict[str, Any]] = []
    fns: dict[str, Any] = {"bf16 cuBLAS": lambda: lin16(x.to(torch.bfloat16))}
    try:
        comp = torch.compile(lin16)
        with torch.no_grad():
            comp(x.to(torch.bfloat16))
        fns["bf16 torch.compile"] = lambda: comp(x.to(torch.bfloat16))
    except Exception as e:  # a missing compiler drops this baseline, and says so
        rows.append({"case": "bf16 torch.compile", "error": f"{type(e).__name__}: {e}"})
    for label, r, seg, dual, backend in cases(k):
        xin = xg if dual else x
        try:
            fast = build_segquant(lin, r, seg, dual, calib_g if dual else calib, backend=backend)
            ref = build_segquant(lin, r, seg, dual, calib_g if dual else calib, backend="reference")
            with torch.no_grad():
                y_fast, y_ref, y_float = fast(xin.to(torch.bfloat16)), ref(xin.to(torch.bfloat16).float()), lin(xin)
            rows.append(
                {
                    "case": label,
                    "backend": fast.backend.name,
                    "rel_err_vs_reference": _rel(y_fast, y_ref),
                    "rel_err_vs_float": _rel(y_fast, y_float),
                }
            )
            fns[label] = lambda fast=fast, xin=xin: fast(xin.to(torch.bfloat16))
        except Exception as e:  # one failing case must not hide the others' figures
            rows.append({"case": label, "backend": backend, "error": f"{type(e).__name__}: {e}"})
    with torch.no_grad():
        timings = alternate(fns, rounds=rounds, warmup=3, device=device)
    bf16 = timings["bf16 cuBLAS"].median_s
    by_case = {r["case"]: r for r in rows}
    for name, t in timings.items():
        row = by_case.setdefault(name, {"case": name})
        row.update(median_ms=round(t.median_ms, 3), vs_bf16=round(bf16 / t.median_s, 3))
        if name in TARGETS:
            row.update(target_vs_bf16=TARGETS[name], met=row["vs_bf16"] >= TARGETS[name])
    return [{"m": m, "k": k, "n": n, **r} for r in by_case.values()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m segquant_core.bench.kernels", description=__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--k", type=int, default=3072)
    p.add_argument("--n", type=int, default=3072)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--json", default="bench-kernels.json")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.stderr.write("segquant: error: --device cuda: no CUDA device is available here\n")
        return 2
    rows = run_kernel_check(args.m, args.k, args.n, device=args.device, rounds=args.rounds)
    Path(args.json).write_text(
        json.dumps({"level": "kernels", "environment": environment(args.device), "rows": rows}, indent=2) + "\n"
    )
    for r in rows:
        sys.stdout.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
