"""Attention options on CPU (issue 15 deliverable 2): which bf16 attention to keep around the quantized GEMMs.

Joint attention as SD3.5-medium runs it (24 heads × 64, 1024 image + 333 text tokens, batch 1) and as the
shipped MMDiT runs it (4 heads × 40, 288 tokens, batch 8 = 4 images with CFG), bf16, alternating in one process,
medians. Candidates:

* ``sdpa``: ``F.scaled_dot_product_attention`` eager (torch's CPU flash-attention kernel, what diffusers calls);
* ``sdpa+compiled``: the same under ``torch.compile`` (Inductor's lowering of SDPA on CPU);
* ``math+compiled``: ``softmax(q kᵀ · scale) v`` written out and compiled (Inductor fuses the softmax);
* ``sdpa[math]``: SDPA forced onto its math backend (the unfused reference path).

Each is checked against fp32 attention (rel_err). Usage::

    python docs/bench/scripts/attention_options.py [ROUNDS]
"""

from __future__ import annotations

import json
import sys
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from segquant_core.bench.timing import alternate


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def sdpa_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(rounds: int) -> None:
    cases = {"SD3.5-medium joint attention": (1, 24, 1357, 64), "shipped MMDiT, batch 4 + CFG": (8, 4, 288, 40)}
    rows = []
    for label, (b, h, t, d) in cases.items():
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, t, d, generator=g).bfloat16() for _ in range(3))
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        compiled_sdpa = torch.compile(F.scaled_dot_product_attention, dynamic=False)
        compiled_math = torch.compile(math_attention, dynamic=False)
        candidates = {
            "sdpa": partial(F.scaled_dot_product_attention, q, k, v),
            "sdpa+compiled": partial(compiled_sdpa, q, k, v),
            "math+compiled": partial(compiled_math, q, k, v),
            "sdpa[math]": partial(sdpa_math, q, k, v),
        }
        with torch.no_grad():
            errors = {name: rel_err(fn(), want) for name, fn in candidates.items()}  # also compiles
            timings = alternate(candidates, rounds=rounds, warmup=2)
        base = timings["sdpa"].median_s
        for name, t in timings.items():
            rows.append(
                {
                    "case": label,
                    "candidate": name,
                    "median_ms": round(t.median_ms, 3),
                    "vs_sdpa": round(base / t.median_s, 3),
                    "rel_err": float(f"{errors[name]:.2e}"),
                }
            )
    sys.stdout.write(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
