"""Safetensors-only training checkpoints (model, EMA, AdamW state, step) so runs resume without pickle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _flatten_optimizer(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for pid, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(float(value))
            flat[f"{pid}.{name}"] = t.detach().contiguous().clone()
    return flat


def _unflatten_optimizer(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    opt: torch.optim.Optimizer,
    info: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write ``checkpoints/step_XXXXXX/`` atomically-ish and point ``latest.json`` at it."""
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".tmp_step_{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
    save_file(_flatten_optimizer(opt), str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, **info}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    (run_dir / "latest.json").write_text(json.dumps({"step": step, "path": final.name}))
    old = sorted(p for p in ckpt_root.glob("step_*") if p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Directory of the newest complete checkpoint, or None."""
    marker = run_dir / "latest.json"
    if marker.exists():
        path = run_dir / "checkpoints" / json.loads(marker.read_text())["path"]
        if path.exists():
            return path
    found = sorted((run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").exists() else []
    return found[-1] if found else None


def load_checkpoint(
    path: Path, model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Restore weights (and optimizer when given) in place; returns the saved state.json."""
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    if opt is not None:
        _unflatten_optimizer(opt, load_file(str(path / "optimizer.safetensors")))
    return json.loads((path / "state.json").read_text())
