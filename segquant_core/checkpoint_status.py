"""Is a checkpoint still what the engine would build? (So a worker rebuilds a stale one, not serves it.)

A checkpoint is current when it is format 2, was built by an engine with today's numerics version, with
the same recipe (after name resolution and switches), from the same calibration settings and, when the
caller knows it, from the same source weights. This is the cheap check; the witness
(:mod:`segquant_core.witness`) checks the numerics themselves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segquant_core.artifacts import ENGINE_NUMERICS, FORMAT_VERSION, ArtifactError, read_manifest
from segquant_core.recipes import Recipe
from segquant_core.recipes import recipe as resolve_recipe


@dataclass(frozen=True)
class CheckpointStatus:
    current: bool
    reason: str = ""  # why not, in one line

    def __bool__(self) -> bool:
        return self.current


def calibration_settings(
    prompts: Sequence[str], *, num_inference_steps: int, steps_per_prompt: int, guidance_scale: float | None, seed: int
) -> dict[str, Any]:
    """The calibration fields a checkpoint's manifest records, computed from the settings alone."""
    return {
        "samples": len(prompts) * steps_per_prompt,
        "prompts": len(prompts),
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "num_inference_steps": num_inference_steps,
        "steps_per_prompt": [steps_per_prompt],
        "guidance_scale": guidance_scale,
        "seed": seed,
    }


def weights_sha256(path: str | Path) -> str:
    """sha256 of a weights file, or of every ``*.safetensors`` file in a folder (sorted by name)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors files")
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def checkpoint_status(
    directory: str | Path,
    recipe: str | Recipe,
    *,
    calibration: dict[str, Any] | None = None,
    source_sha256: str | None = None,
) -> CheckpointStatus:
    """Whether the checkpoint in ``directory`` is what this engine would build now (see module doc).

    ``calibration`` holds the settings to compare (e.g. from :func:`calibration_settings`); only the keys
    given are compared. ``source_sha256`` is compared with the manifest's ``source.weights_sha256``.
    """
    try:
        manifest = read_manifest(directory)
    except ArtifactError as e:
        return CheckpointStatus(False, str(e))
    if manifest["format_version"] != FORMAT_VERSION:
        return CheckpointStatus(False, f"format {manifest['format_version']} (this engine writes {FORMAT_VERSION})")
    numerics = manifest.get("engine", {}).get("numerics")
    if numerics != ENGINE_NUMERICS:
        return CheckpointStatus(False, f"built with engine numerics {numerics}, this engine is {ENGINE_NUMERICS}")
    wanted = resolve_recipe(recipe) if isinstance(recipe, str) else recipe
    if Recipe.from_dict(manifest["recipe"]).to_dict() != wanted.to_dict():
        return CheckpointStatus(False, f"built with another recipe than {wanted.name!r} as resolved today")
    stored = manifest.get("calibration", {})
    for key, value in (calibration or {}).items():
        if stored.get(key) != value:
            return CheckpointStatus(False, f"calibration {key} is {stored.get(key)!r}, wanted {value!r}")
    if source_sha256 is not None and manifest.get("source", {}).get("weights_sha256") != source_sha256:
        return CheckpointStatus(False, "built from other source weights")
    return CheckpointStatus(True)


def checkpoint_is_current(directory: str | Path, recipe: str | Recipe, **kwargs: Any) -> bool:
    """``bool(checkpoint_status(...))``."""
    return checkpoint_status(directory, recipe, **kwargs).current
