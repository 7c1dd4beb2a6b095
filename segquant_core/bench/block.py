"""``bench block``: one SD3.5-medium-shaped MMDiT block (real diffusers module, random weights).

The block is quantized by the engine's own flow — plan detection, calibration on random inputs, SegLinear
swap — and its float parts (norms, attention) run in bf16 like the bf16 baseline, so the ratio shows what
the quantized linears buy inside a real block, attention included.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable

import torch
from diffusers.models.attention import JointTransformerBlock
from safetensors.torch import save_file

from segquant_core.bench.layer import cuda_peaks
from segquant_core.bench.peers import Peer, mark_against_peers
from segquant_core.bench.timing import alternate
from segquant_core.quantize import quantize


def sd35_block(dim: int = 1536, heads: int = 24, seed: int = 0) -> JointTransformerBlock:
    torch.manual_seed(seed)
    return JointTransformerBlock(
        dim=dim, num_attention_heads=heads, attention_head_dim=dim // heads, context_pre_only=False, qk_norm="rms_norm"
    ).eval()


def block_inputs(dim: int, tokens: int, context_tokens: int, batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, tokens, dim, generator=g),
        "encoder_hidden_states": torch.randn(batch, context_tokens, dim, generator=g),
        "temb": torch.randn(batch, dim, generator=g),
    }


def _rel_err(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    num = sum(float((x.float() - y.float()).norm() ** 2) for x, y in zip(a, b))
    den = sum(float(y.float().norm() ** 2) for y in b)
    return (num / den) ** 0.5


def with_random_lora(model: torch.nn.Module, rank: int, seed: int = 0) -> torch.nn.Module:
    """Attach a random rank-``rank`` adapter to every linear of ``model`` through a real safetensors file."""
    from segquant_core.lora import load_lora
    from segquant_core.seglinear import SegLinear

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear | SegLinear):
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) / m.in_features**0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.01
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, f"{tmp}/bench_lora.safetensors")
        load_lora(model, f"{tmp}/bench_lora.safetensors", "bench")
    return model


def block_targets(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Issue 15's block targets (met / not met): ``w8a8`` ≥ 2.0× eager bf16; ``w8a8-segquant`` ≥ 1.6× eager bf16
    and, compiled, ≥ 1.3× compiled bf16. The OpenVINO comparison needs ``--peers`` (not in this run)."""
    by = {str(r["candidate"]): r for r in rows}
    checks = [
        ("w8a8", "vs_bf16", 2.0, "eager bf16"),
        ("w8a8+compiled", "vs_bf16", 2.0, "eager bf16"),
        ("w8a8-segquant", "vs_bf16", 1.6, "eager bf16"),
        ("w8a8-segquant+compiled", "vs_bf16", 1.6, "eager bf16"),
        ("w8a8-segquant+compiled", "vs_bf16_compiled", 1.3, "compiled bf16"),
    ]
    items: list[dict[str, object]] = []
    for name, key, limit, against in checks:
        if name in by and key in by[name]:
            measured = float(by[name][key])  # type: ignore[arg-type]
            items.append(
                {
                    "target": f"{name} vs {against}",
                    "measured": measured,
                    "limit": f">= {limit}",
                    "met": measured >= limit,
                }
            )
    return items


def run_block_bench(
    recipes: list[str],
    *,
    tokens: int = 1024,
    context_tokens: int = 333,
    batch: int = 1,
    dim: int = 1536,
    heads: int = 24,
    rounds: int = 6,
    calib_calls: int = 4,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    lora_rank: int = 0,
    compiled: bool = False,
    peers: list[Peer] | None = None,
) -> list[dict[str, object]]:
    """Rows per candidate; on CUDA timing is synchronised and ``max_memory_allocated`` per call reported.

    ``lora_rank`` > 0 adds ``<recipe>+lora<r>`` per recipe: a second quantized copy carrying a random rank-r
    adapter on every linear (the float side branch of :mod:`segquant_core.lora`), timed alongside.
    ``compiled`` adds ``bf16+compiled`` and ``<recipe>+compiled`` (a second copy under ``torch.compile``,
    quantized the same way) with ``compile_s`` (first call minus median) and ``vs_bf16_compiled``."""
    from segquant_core.compile import compile_denoiser

    block = sd35_block(dim, heads).to(device)

    def on(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in d.items()}

    x32 = on(block_inputs(dim, tokens, context_tokens, batch, seed=1))
    x16 = {k: v.to(torch.bfloat16) for k, v in x32.items()}
    calib = [on(block_inputs(dim, tokens, context_tokens, batch, seed=10 + i)) for i in range(calib_calls)]
    with torch.no_grad():
        ref = block(**x32)
    b16 = copy.deepcopy(block).to(torch.bfloat16)
    fns: dict[str, Callable[[], object]] = {"fp32": lambda: block(**x32), "bf16": lambda: b16(**x16)}
    errors = {"fp32": 0.0}
    first_call: dict[str, float] = {}

    def add_compiled(name: str, module: torch.nn.Module) -> None:
        compile_denoiser(module)
        start = time.perf_counter()
        with torch.no_grad():
            errors[f"{name}+compiled"] = _rel_err(module(**x16), ref)
        first_call[f"{name}+compiled"] = time.perf_counter() - start
        fns[f"{name}+compiled"] = lambda: module(**x16)

    with torch.no_grad():
        errors["bf16"] = _rel_err(b16(**x16), ref)
    if compiled:
        if progress:
            progress("compiling bf16")
        add_compiled("bf16", copy.deepcopy(block).to(torch.bfloat16))
    for name in recipes:
        if progress:
            progress(f"quantizing block with {name}")
        qb = copy.deepcopy(block)
        quantize(qb, name, calib, progress=False)
        qb = qb.to(torch.bfloat16)
        with torch.no_grad():
            errors[name] = _rel_err(qb(**x16), ref)
        fns[name] = lambda qb=qb: qb(**x16)
        if compiled:
            if progress:
                progress(f"quantizing and compiling a second copy with {name}")
            cb = copy.deepcopy(block)
            quantize(cb, name, calib, progress=False)
            add_compiled(name, cb.to(torch.bfloat16))
        if lora_rank > 0:
            lb = copy.deepcopy(block)
            quantize(lb, name, calib, progress=False)
            lb = with_random_lora(lb.to(torch.bfloat16), lora_rank)
            with torch.no_grad():
                errors[f"{name}+lora{lora_rank}"] = _rel_err(lb(**x16), ref)
            fns[f"{name}+lora{lora_rank}"] = lambda lb=lb: lb(**x16)
    peer_scope = add_peers(peers or [], block, x32, calib, ref, fns, errors, progress)
    if progress:
        progress("timing")
    with torch.no_grad():
        timings = alternate(fns, rounds=rounds, warmup=1, max_seconds=300, device=device)
        peaks = cuda_peaks(fns) if device.startswith("cuda") else {}
    bf16 = timings["bf16"].median_s
    bf16_compiled = timings["bf16+compiled"].median_s if "bf16+compiled" in timings else None
    rows: list[dict[str, object]] = [
        {
            "case": f"SD3.5-medium block, {tokens}+{context_tokens} tokens, batch {batch}",
            "candidate": n,
            "median_ms": round(t.median_ms, 2),
            "vs_bf16": round(bf16 / t.median_s, 3),
            **({"vs_bf16_compiled": round(bf16_compiled / t.median_s, 3)} if bf16_compiled else {}),
            **({"compile_s": round(first_call[n] - t.median_s, 1)} if n in first_call else {}),
            "rel_err": errors[n],
            "rounds": len(t.samples),
            **({"cuda_max_allocated_bytes": peaks[n]} if n in peaks else {}),
        }
        for n, t in timings.items()
    ]
    for row in rows:
        if row["candidate"] in peer_scope:
            row["int8_linears"] = peer_scope[row["candidate"]]
    if peers:
        mark_against_peers(rows, peers, "case")
    return rows


def add_peers(
    peers: list[Peer],
    block: torch.nn.Module,
    x32: dict[str, torch.Tensor],
    calib: list[dict[str, torch.Tensor]],
    ref: tuple[torch.Tensor, ...],
    fns: dict[str, Callable[[], object]],
    errors: dict[str, float],
    progress: Callable[[str], None] | None,
) -> dict[str, str]:
    """Build each peer from the fp32 block and the same calibration calls; add its callable and error.
    Returns ``int8 linears / linears`` per peer label (what the peer really runs in int8)."""
    scope = {}
    for peer in peers:
        if progress:
            progress(f"building peer {peer.name}")
        built = peer.build(copy.deepcopy(block), x32, calib)
        errors[peer.label] = _rel_err(built.call(), ref)
        fns[peer.label] = built.call
        scope[peer.label] = f"{built.int8_linears}/{built.linears}"
    return scope
