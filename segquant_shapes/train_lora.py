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
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
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


def _text_table(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    states, pooled = encode_prompts(captions, MAX_TOKENS)
    return states.half(), pooled.half()


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
    tables = [_text_table(outlined.captions), _text_table(filled.captions)]
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
        keep = (torch.rand(x0.shape[0], generator=gen) >= args.caption_dropout).float()
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 50)
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
