"""Train a LoRA adapter on the shipped shapes MMDiT that teaches a style it has never seen ("outlined").

The base weights stay frozen; every ``nn.Linear`` inside the transformer blocks gets a trainable pair
``y = W x + (alpha / r) · B A x`` (A small random, B zero, so training starts at the base model). Batches
mix outlined single-shape scenes (caption carries the trigger word) with ordinary filled scenes, so the
adapter learns the style from the word and leaves unmarked prompts alone. The result is written in the
diffusers/PEFT key layout (``transformer.<module>.lora_A.weight`` [r, in], ``lora_B.weight`` [out, r]),
the layout ``segquant_core.load_lora`` and diffusers' ``load_lora_weights`` read.

Usage: ``python -m segquant_shapes.train_lora --out runs/lora_outlined --minutes 25 [--rank 8 --threads 2]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import load_shipped
from .captions import STYLE_WORD
from .data import CaptionBank
from .text_encoder import MAX_TOKENS, encode_prompts
from .train import flow_loss

log = logging.getLogger("segquant_shapes.train_lora")
KEY_PREFIX = "transformer."


class TrainableLora(nn.Module):
    """A frozen linear plus a trainable low-rank update (training only; inference uses the engine)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, gen: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, generator=gen) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (x @ self.lora_A.to(x.dtype).t()) @ self.lora_B.to(x.dtype).t()
        return self.base(x) + self.scale * delta


def attach_trainable(model: nn.Module, rank: int, alpha: float, seed: int) -> dict[str, TrainableLora]:
    """Wrap every linear under ``transformer_blocks`` in place; returns {module name: wrapper}."""
    gen = torch.Generator().manual_seed(seed)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("transformer_blocks.")]
    wrapped: dict[str, TrainableLora] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapper = TrainableLora(getattr(parent, child), rank, alpha, gen)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped


def lora_state_dict(wrapped: dict[str, TrainableLora], alpha: float) -> dict[str, torch.Tensor]:
    """diffusers/PEFT layout; alpha/r is folded into B so the file needs no alpha entry (alpha = r)."""
    out: dict[str, torch.Tensor] = {}
    for name, w in wrapped.items():
        out[f"{KEY_PREFIX}{name}.lora_A.weight"] = w.lora_A.detach().float().contiguous()
        out[f"{KEY_PREFIX}{name}.lora_B.weight"] = (w.lora_B.detach().float() * w.scale).contiguous()
    return out


def save_adapter(path: Path, wrapped: dict[str, TrainableLora], alpha: float, info: dict[str, object]) -> None:
    """Write the adapter atomically (tmp file then rename), with the training facts as string metadata."""
    tmp = path.with_suffix(".tmp")
    save_file(lora_state_dict(wrapped, alpha), str(tmp), metadata={"format": "pt", "segquant_lora": json.dumps(info)})
    tmp.replace(path)


@torch.no_grad()
def init_from_adapter(path: Path, wrapped: dict[str, TrainableLora]) -> None:
    """Continue from a saved adapter of the same layers and rank (B is stored with alpha/r folded in)."""
    if not path.is_file():
        raise FileNotFoundError(f"--init-from: no adapter file {path}")
    state = load_file(str(path))
    for name, w in wrapped.items():
        a, b = state.get(f"{KEY_PREFIX}{name}.lora_A.weight"), state.get(f"{KEY_PREFIX}{name}.lora_B.weight")
        if a is None or b is None or a.shape != w.lora_A.shape or b.shape != w.lora_B.shape:
            raise ValueError(f"--init-from: {path} has no matching rank-{w.lora_A.shape[0]} pair for {name}")
        w.lora_A.copy_(a)
        w.lora_B.copy_(b / w.scale)


def caption_keep_mask(n_outlined: int, batch: int, args: argparse.Namespace, gen: torch.Generator) -> torch.Tensor:
    """1 keeps a caption, 0 drops it (the unconditional input). The first ``n_outlined`` rows are outlined.

    Only filled rows are dropped unless ``--drop-outlined``: a dropped outlined row teaches the adapter to
    draw outlines *without* the trigger, which moves the unconditional prediction, the anchor classifier-
    free guidance pushes away from, towards the style and so cancels part of the style at sampling time.
    """
    keep = (torch.rand(batch, generator=gen) >= args.caption_dropout).float()
    if not args.drop_outlined:
        keep[:n_outlined] = 1.0
    return keep


def learning_rate(args: argparse.Namespace, step: int, elapsed_s: float) -> float:
    """Linear warm-up over ``--warmup`` steps, then constant, or with ``--cosine`` a cosine decay to 10 %.

    The decay follows whichever budget (steps or minutes) runs out first, so a minute-budgeted run on a
    busy machine still ends at the low rate.
    """
    warm = min(1.0, (step + 1) / max(1, args.warmup))
    if not args.cosine:
        return args.lr * warm
    done = elapsed_s / (args.minutes * 60)
    if args.steps:
        done = max(done, step / args.steps)
    return args.lr * warm * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, done))))


def text_table(captions: list[str], cache: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (token states, pooled) of ``captions``; with ``cache`` read from / written to that safetensors file.

    Encoding the ~5,000 captions takes minutes of CPU on a busy machine, and a continued run encodes the
    same list again: the file is reused when its recorded caption digest matches.
    """
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    if cache is not None and cache.is_file():
        with safe_open(str(cache), "pt") as f:
            if (f.metadata() or {}).get("captions_sha256") == digest:
                return f.get_tensor("states"), f.get_tensor("pooled")
    states, pooled = encode_prompts(captions, MAX_TOKENS)
    states, pooled = states.half(), pooled.half()
    if cache is not None:
        tmp = cache.with_suffix(".tmp")
        save_file({"states": states, "pooled": pooled}, str(tmp), metadata={"captions_sha256": digest})
        tmp.replace(cache)
    return states, pooled


def run(args: argparse.Namespace) -> Path:
    """Train until the step or minute budget is used; returns the adapter file."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.StreamHandler(sys.stdout), logging.FileHandler(out / "train.log")):
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    if args.rank < 1 or args.batch < 2 or not 0.0 < args.outlined_share <= 1.0:
        raise ValueError("--rank ≥ 1, --batch ≥ 2 and 0 < --outlined-share ≤ 1 are required")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    command = "python -m segquant_shapes.train_lora " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    model = load_shipped("mmdit").transformer.train().requires_grad_(False)
    wrapped = attach_trainable(model, args.rank, float(args.rank), args.seed)
    if args.init_from:
        init_from_adapter(Path(args.init_from), wrapped)
        log.info("continuing from %s (fresh optimizer)", args.init_from)
    params = [p for w in wrapped.values() for p in (w.lora_A, w.lora_B)]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    n_params = sum(p.numel() for p in params)
    log.info("%d layers wrapped, rank %d, %d trainable params", len(wrapped), args.rank, n_params)
    outlined = CaptionBank(variants=2, n_multi=0, seed=args.seed + 1, style="outlined")
    filled = CaptionBank(variants=1, n_multi=100, seed=args.seed + 2)
    log.info("encoding %d + %d captions", len(outlined), len(filled))
    cache = Path(args.text_cache) if args.text_cache else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    tables = [
        text_table(outlined.captions, cache and cache / "outlined.safetensors"),
        text_table(filled.captions, cache and cache / "filled.safetensors"),
    ]
    t0, step, window = time.time(), 0, []
    info: dict[str, object] = {}
    while step < (args.steps or 10**9) and time.time() - t0 < args.minutes * 60:
        rng = np.random.default_rng([args.seed, step])
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        n_out = int(rng.binomial(args.batch, args.outlined_share))
        parts = [(outlined, tables[0], n_out, 0.0), (filled, tables[1], args.batch - n_out, 0.12)]
        images, states, pooled = [], [], []
        for bank, (st, po), n, multi in parts:
            if n:
                imgs, idx = bank.sample(rng, n, multi)
                images.append(imgs)
                states.append(st[torch.from_numpy(idx)].float())
                pooled.append(po[torch.from_numpy(idx)].float())
        x0 = torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        s, p = torch.cat(states), torch.cat(pooled)
        keep = caption_keep_mask(n_out, x0.shape[0], args, gen)
        for g in opt.param_groups:
            g["lr"] = learning_rate(args, step, time.time() - t0)
        loss = flow_loss(model, x0, s * keep.view(-1, 1, 1), p * keep.view(-1, 1), gen, bf16=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss at step {step}")
        window.append(value)
        step += 1
        info = {
            "trigger": STYLE_WORD,
            "rank": args.rank,
            "alpha": args.rank,
            "steps": step,
            "loss": float(np.mean(window)),
            "train_seconds": round(time.time() - t0, 1),
            "command": command,
            "init_from": args.init_from or None,
            "outlined_captions_dropped": bool(args.drop_outlined),
            "base": "segquant_shapes/weights/mmdit",
            "trainable_params": n_params,
        }
        if step % 25 == 0:
            log.info("step %d loss %.4f %.2f s/step", step, np.mean(window), (time.time() - t0) / step)
            window = []
        if step % args.save_every == 0:
            save_adapter(out / "pytorch_lora_weights.safetensors", wrapped, float(args.rank), info)
    save_adapter(out / "pytorch_lora_weights.safetensors", wrapped, float(args.rank), info)
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("done: %s", info)
    return out / "pytorch_lora_weights.safetensors"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="run directory (adapter, training.json, train.log)")
    p.add_argument("--minutes", type=float, default=25.0)
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: time budget only)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--outlined-share", type=float, default=0.5, help="share of each batch drawn outlined")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument(
        "--drop-outlined", action="store_true", help="also drop captions of outlined rows (the first run did)"
    )
    p.add_argument("--text-cache", default="", help="folder for the encoded caption tables (reused when equal)")
    p.add_argument("--cosine", action="store_true", help="cosine-decay the rate to 10%% over the budget")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", default="", help="continue from this adapter file (same rank; fresh optimizer)")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    except (FileNotFoundError, ValueError) as e:  # bad settings: one readable line, exit 2
        sys.exit(f"segquant_shapes.train_lora: error: {e}")


if __name__ == "__main__":
    main()
