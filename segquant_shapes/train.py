"""Train a shapes denoiser from scratch with rectified flow on the CPU (resumable, safetensors only).

Usage: ``python -m segquant_shapes.train --model mmdit|unet|flux --out runs/<name> --minutes N [--steps N] [--resume]``
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import CaptionBank
from .models import PRESETS, Denoiser, build_denoiser, predict_velocity
from .text_encoder import MAX_TOKENS, encode_prompts

log = logging.getLogger("segquant_shapes.train")


@dataclass
class TrainConfig:
    """Recipe of TRAINING_PROBE.md: AdamW 1e-3, 100 warmup steps, clip 1, batch 64, EMA, logit-normal t."""

    model: str = "mmdit"
    preset: str = ""
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    multi_share: float = 0.12
    ema_max_decay: float = 0.999
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 250
    bf16: bool = True


def ema_decay(step: int, max_decay: float) -> float:
    """Warm-started EMA decay so early checkpoints are not dominated by the random init."""
    return min(max_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1.0 - decay)


def flow_loss(
    model: Denoiser,
    x0: torch.Tensor,
    states: torch.Tensor,
    pooled: torch.Tensor,
    gen: torch.Generator,
    bf16: bool = True,
) -> torch.Tensor:
    """Rectified-flow MSE: x_t = (1-t) x0 + t eps, target eps - x0, t ~ sigmoid(N(0,1))."""
    b = x0.shape[0]
    t = torch.sigmoid(torch.randn(b, generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    tb = t.view(b, 1, 1, 1)
    xt = (1 - tb) * x0 + tb * noise
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = predict_velocity(model, xt, t, states, pooled)
    return torch.nn.functional.mse_loss(out.float(), noise - x0)


def train_step(
    model: Denoiser,
    opt: torch.optim.Optimizer,
    ema: torch.nn.Module,
    images: np.ndarray,
    states: torch.Tensor,
    pooled: torch.Tensor,
    step: int,
    cfg: TrainConfig,
    gen: torch.Generator,
    warm_from: int = 0,
) -> float:
    """One optimisation step on uint8 images [B,H,W,3] and their (fp32) text embeddings."""
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    keep = (torch.rand(x0.shape[0], generator=gen) >= cfg.caption_dropout).float()
    states = states * keep.view(-1, 1, 1)
    pooled = pooled * keep.view(-1, 1)
    for g in opt.param_groups:
        g["lr"] = cfg.lr * min(1.0, (step - warm_from + 1) / cfg.warmup)
    loss = flow_loss(model, x0, states, pooled, gen, cfg.bf16)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    update_ema(ema, model, ema_decay(step, cfg.ema_max_decay))
    return float(loss.detach())


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)


def init_from_pipeline(path: Path, kind: str, model: torch.nn.Module, ema: torch.nn.Module) -> tuple[int, float]:
    """Warm-start model and EMA from an exported pipeline dir; returns its (step, train seconds) if recorded.

    Lets a shipped model keep training after its run directory (optimizer state included) is gone.
    """
    sub = path / ("unet" if kind == "unet" else "transformer")
    weights = sub / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"--init-from: no {weights.relative_to(path)} under {path}")
    state = _widen_inputs(load_file(str(weights)), model)
    model.load_state_dict(state)
    ema.load_state_dict(state)
    facts_path = path / "training.json"
    facts = json.loads(facts_path.read_text()) if facts_path.is_file() else {}
    return int(facts.get("step", 0)), float(facts.get("train_seconds", 0.0))


def _widen_inputs(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights that take more input channels in ``model`` than in ``state`` (a UNet given coordinate channels)
    get zero filters for the new channels: the widened model starts out computing exactly what the old one did."""
    own = model.state_dict()
    for name, tensor in state.items():
        target = own.get(name)
        if target is None or target.shape == tensor.shape:
            continue
        if tensor.dim() < 2 or target.shape[0] != tensor.shape[0] or target.shape[2:] != tensor.shape[2:]:
            raise ValueError(f"--init-from: {name} is {tuple(tensor.shape)}, the model wants {tuple(target.shape)}")
        if target.shape[1] < tensor.shape[1]:
            raise ValueError(f"--init-from: {name} has more input channels than the model ({tensor.shape[1]})")
        wide = torch.zeros_like(target)
        wide[:, : tensor.shape[1]] = tensor
        state[name] = wide
    return state


def _text_table(bank: CaptionBank, run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of every bank caption, cached (fp16) in the run dir so a resume skips re-encoding."""
    cache = run_dir / "text_cache.safetensors"
    if cache.exists():
        t = load_file(str(cache))
        if t["states"].shape[0] == len(bank):
            return t["states"], t["pooled"]
    log.info("encoding %d captions with MiniLM", len(bank))
    states, pooled = encode_prompts(bank.captions, MAX_TOKENS)
    states, pooled = states.half(), pooled.half()
    save_file({"states": states, "pooled": pooled}, str(cache))
    return states, pooled


class _Signals:
    """SIGUSR1: checkpoint after the current step; SIGTERM/SIGINT: checkpoint and stop.

    Long background runs on a shared machine are stopped from outside (session end, shutdown), and an
    export may be wanted between the regular checkpoints; neither should lose the steps since the last one.
    """

    def __init__(self) -> None:
        self.save_now = False
        self.stop = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig, handler in (
            (signal.SIGUSR1, self._on_save),
            (signal.SIGTERM, self._on_stop),
            (signal.SIGINT, self._on_stop),
        ):
            self._previous[sig] = signal.signal(sig, handler)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_save(self, signum: int, frame: object) -> None:
        self.save_now = True

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stop = True


def _setup_logging(run_dir: Path) -> None:
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "train.log")):
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)


def run(args: argparse.Namespace) -> Path:
    """Train (or resume) until the step or minute budget is used; returns the run dir."""
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    _setup_logging(run_dir)
    torch.set_num_threads(args.threads)
    cfg_path = run_dir / "run_config.json"
    if args.resume and cfg_path.exists():
        saved = json.loads(cfg_path.read_text())
        cfg = TrainConfig(**saved["train"])
        model_config = saved["model_config"]
    else:
        cfg = TrainConfig(model=args.model, preset=args.preset or args.model, batch=args.batch, seed=args.seed)
        model_config = PRESETS[cfg.preset]
    if args.ckpt_every:  # on a busy shared CPU, steps are slow: checkpoint by step count the caller picks
        cfg.ckpt_every = args.ckpt_every
    command = "python -m segquant_shapes.train " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if not (args.resume and cfg_path.exists()):
        cfg_path.write_text(
            json.dumps(
                {"kind": cfg.model, "train": asdict(cfg), "model_config": model_config, "command": command},
                indent=2,
            )
        )
    torch.manual_seed(cfg.seed)
    model = build_denoiser(cfg.model, model_config).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = make_optimizer(model, cfg.lr)
    n_params = sum(p.numel() for p in model.parameters())
    step, train_seconds, last_loss = 0, 0.0, float("nan")
    warm_from = 0  # LR warmup restarts whenever the optimizer state is fresh
    ckpt = latest_checkpoint(run_dir) if args.resume else None
    if ckpt is None and args.init_from:
        step, train_seconds = init_from_pipeline(Path(args.init_from), cfg.model, model, ema)
        step, train_seconds = args.init_step or step, args.init_seconds or train_seconds
        warm_from = step
        log.info("initialised weights from %s (continuing at step %d, fresh optimizer)", args.init_from, step)
    if ckpt is not None:
        st = load_checkpoint(ckpt, model, ema, opt)
        step, train_seconds = int(st["step"]), float(st.get("train_seconds", 0.0))
        last_loss = float(st.get("loss", float("nan")))
        log.info("resumed from %s (step %d)", ckpt, step)
    log.info("model %s preset %s: %.3fM params, config %s", cfg.model, cfg.preset, n_params / 1e6, model_config)
    bank = CaptionBank(seed=cfg.seed)
    states_all, pooled_all = _text_table(bank, run_dir)
    budget = args.minutes * 60.0
    target = args.steps if args.steps else 10**9
    t_start = time.time()
    window: list[float] = []
    t_window = time.time()

    def info() -> dict[str, object]:
        return {
            "loss": last_loss,
            "train_seconds": train_seconds + (time.time() - t_start),
            "params": n_params,
            "command": command,
            "kind": cfg.model,
        }

    bar = tqdm(total=None if not args.steps else target, initial=step, mininterval=60, file=sys.stderr)
    signals = _Signals()
    signals.install()
    while step < target and time.time() - t_start < budget and not signals.stop:
        rng = np.random.default_rng([cfg.seed, step])
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        images, idx = bank.sample(rng, cfg.batch, cfg.multi_share)
        idx_t = torch.from_numpy(idx)
        loss = train_step(
            model, opt, ema, images, states_all[idx_t].float(), pooled_all[idx_t].float(), step, cfg, gen, warm_from
        )
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        window.append(loss)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0:
            last_loss = float(np.mean(window))
            dt = (time.time() - t_window) / len(window)
            log.info(
                "step %d loss %.4f lr %.2e %.2f s/step elapsed %.0fs",
                step,
                last_loss,
                opt.param_groups[0]["lr"],
                dt,
                train_seconds + time.time() - t_start,
            )
            with open(run_dir / "loss.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": last_loss, "t": train_seconds + time.time() - t_start}))
                f.write("\n")
            window, t_window = [], time.time()
        if step % cfg.ckpt_every == 0 or signals.save_now:
            signals.save_now = False
            save_checkpoint(run_dir, step, model, ema, opt, info())
            log.info("checkpoint at step %d", step)
    bar.close()
    signals.restore()
    if window:
        last_loss = float(np.mean(window))
    save_checkpoint(run_dir, step, model, ema, opt, info())
    log.info("done: step %d, loss %.4f, %.0fs total", step, last_loss, info()["train_seconds"])
    return run_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", choices=["mmdit", "unet", "flux"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of this invocation")
    p.add_argument("--steps", type=int, default=0, help="stop at this total step (0: time budget only)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--preset", default="", help="model preset (default: same as --model)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint interval in steps (0: the recipe's 250)")
    p.add_argument("--init-from", default="", help="start from an exported pipeline dir's weights (new run only)")
    p.add_argument("--init-step", type=int, default=0, help="step count of the --init-from weights (for the card)")
    p.add_argument("--init-seconds", type=float, default=0.0, help="training seconds already in --init-from")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    except (FileNotFoundError, ValueError) as e:  # bad paths or settings: one readable line, exit 2
        sys.exit(f"segquant_shapes.train: error: {e}")


if __name__ == "__main__":
    main()
