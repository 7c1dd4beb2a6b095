"""What the LoRA side branch costs on a w8a8-segquant SD3.5-medium block, side by side and alternating.

Candidates on one quantized bf16 block (1024 + 333 tokens, random rank-16 adapter on every linear):
``plain`` (no adapter), ``naive`` (the first version of the branch: per layer a forward hook computing
``F.linear(F.linear(x, A), B)`` and adding it), ``engine`` (``sq.load_lora``: shared q/k/v down GEMM,
in-place ``addmm_``), ``noop_hooks`` (a forward hook that does nothing on every linear: the cost of the
hook mechanism itself). With one thread the clock is the process CPU time, which a busy machine disturbs
far less than wall time; with two, wall time (what ``segquant bench block`` reports).

    python docs/results/lora/branch_cost.py [--threads 1] [--rounds 15]
"""
# ruff: noqa: T201  (a measurement script: it prints its table)

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import segquant_core as sq
from segquant_core.bench.block import block_inputs, sd35_block
from segquant_core.quantize import quantize


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--rank", type=int, default=16)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.process_time if a.threads == 1 else time.perf_counter
    block = sd35_block()
    quantize(block, "w8a8-segquant", [block_inputs(1536, 1024, 333, 1, seed=10 + i) for i in range(4)], progress=False)
    qb = block.to(torch.bfloat16)
    x16 = {k: v.bfloat16() for k, v in block_inputs(1536, 1024, 333, 1, seed=1).items()}
    linears = {n: m for n, m in qb.named_modules() if isinstance(m, torch.nn.Linear | sq.SegLinear)}
    g = torch.Generator().manual_seed(0)
    pairs = {
        n: (
            torch.randn(a.rank, m.in_features, generator=g) / m.in_features**0.5,
            torch.randn(m.out_features, a.rank, generator=g) * 0.01,
        )
        for n, m in linears.items()
    }
    path = f"{tempfile.mkdtemp()}/bench_lora.safetensors"
    save_file({f"{n}.lora_{k}.weight": t for n, (d, u) in pairs.items() for k, t in (("A", d), ("B", u))}, path)
    handles = []

    def naive_on():
        for n, m in linears.items():
            d, u = (t.bfloat16() for t in pairs[n])
            handles.append(
                m.register_forward_hook(lambda _m, args, out, d=d, u=u: out + F.linear(F.linear(args[0], d), u))
            )

    def noop_on():
        handles.extend(m.register_forward_hook(lambda _m, _a, out: out) for m in linears.values())

    def hooks_off():
        while handles:
            handles.pop().remove()

    setups = {
        "plain": (lambda: None, lambda: None),
        "naive": (naive_on, hooks_off),
        "engine": (lambda: sq.load_lora(qb, path, "b"), lambda: sq.unload_lora(qb)),
        "noop_hooks": (noop_on, hooks_off),
    }
    times = {k: [] for k in setups}
    with torch.no_grad():
        outs = {}
        for k, (on, off) in setups.items():
            on()
            outs[k] = qb(**x16)
            off()
        diff = max(float((e.float() - n.float()).abs().max()) for e, n in zip(outs["engine"], outs["naive"]))
        for _ in range(a.rounds):
            for k, (on, off) in setups.items():
                on()
                t = clock()
                qb(**x16)
                times[k].append(clock() - t)
                off()
    print(f"threads {a.threads}, {a.rounds} rounds, clock {clock.__name__}; engine vs naive max |diff| {diff:.3g}")
    print("| candidate | median (ms) | median of per-round ratios vs plain |\n|---|---|---|")
    for k, v in times.items():
        ratio = statistics.median(x / y for x, y in zip(v, times["plain"]))
        print(f"| {k} | {1e3 * statistics.median(v):.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
