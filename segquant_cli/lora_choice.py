"""``--lora NAME[:SCALE]``: which adapter file a CLI command attaches, at which scale, with which prompts.

``NAME`` is a ``.safetensors`` file, an adapter directory, or the name of a directory under the model's
``loras/`` folder (``shipped:mmdit`` → ``segquant_shapes/weights/mmdit/loras/NAME``). An adapter directory
may carry ``eval_prompts.txt`` (prompts that use its trigger), used when no ``--prompts`` file is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segquant_cli.errors import CLIError

EVAL_PROMPTS_FILE = "eval_prompts.txt"


@dataclass(frozen=True)
class LoraChoice:
    """A resolved ``--lora`` argument."""

    name: str
    path: Path
    scale: float

    @property
    def eval_prompts(self) -> list[str] | None:
        """The adapter's own evaluation prompts, if its directory ships them."""
        folder = self.path if self.path.is_dir() else self.path.parent
        file = folder / EVAL_PROMPTS_FILE
        if not file.is_file():
            return None
        return [line.strip() for line in file.read_text().splitlines() if line.strip()] or None

    def label(self) -> str:
        return f"{self.name}:{self.scale:g}"

    def attach(self, pipe: Any, _variant: str = "") -> None:
        """Load the adapter into ``pipe``'s denoiser (after quantization) and activate it."""
        from segquant_core import LoraError, load_lora
        from segquant_core.calibrate.capture import denoiser_of

        try:
            load_lora(denoiser_of(pipe), self.path, self.name, scale=self.scale)
        except (LoraError, FileNotFoundError) as e:
            raise CLIError(f"--lora: {e}") from None


def _model_root(model_dir: str) -> Path:
    if model_dir.startswith("shipped:"):
        try:
            from segquant_shapes import shipped_pipeline_path

            return shipped_pipeline_path(model_dir.split(":", 1)[1])
        except (ImportError, ValueError) as e:
            raise CLIError(f"--lora: cannot locate {model_dir}: {e}") from None
    return Path(model_dir)


def parse_lora(spec: str, model_dir: str) -> LoraChoice:
    """``NAME[:SCALE]`` → a :class:`LoraChoice`; unknown names list the model's adapters."""
    name, _, raw_scale = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if not raw_scale:
        name = spec
    try:
        scale = float(raw_scale) if raw_scale else 1.0
    except ValueError:
        raise CLIError(f"--lora scale must be a number, got {raw_scale!r} in {spec!r}") from None
    if not name or not math.isfinite(scale):
        raise CLIError(f"--lora must be NAME[:SCALE] with a finite scale, got {spec!r}")
    given = Path(name)
    if given.suffix == ".safetensors" or given.is_dir():
        if not given.exists():
            raise CLIError(f"--lora: {given} does not exist")
        return LoraChoice(given.stem if given.is_file() else given.name, given, scale)
    folder = _model_root(model_dir) / "loras"
    if not (folder / name).is_dir():
        known = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        raise CLIError(f"--lora: no adapter {name!r} for {model_dir}; known: {', '.join(known) or 'none'}")
    return LoraChoice(name, folder / name, scale)
