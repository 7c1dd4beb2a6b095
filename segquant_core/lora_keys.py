"""Reading LoRA files: safetensors only, in the key layouts diffusion trainers write, into one neutral form.

Layouts read (``<m>`` is a module path of the denoiser, e.g. ``transformer_blocks.0.attn.to_q``):

* diffusers / PEFT (what ``save_lora_weights`` and PEFT write for SD3, Flux, SDXL, PixArt …):
  ``[transformer.|unet.|base_model.model.]<m>.lora_A[.<adapter>].weight`` ``[r, in]`` and
  ``<m>.lora_B[.<adapter>].weight`` ``[out, r]``; optional ``<m>.alpha``; a ``lora_adapter_metadata``
  header entry with ``lora_alpha`` / ``r`` (as newer diffusers writes it) gives the alpha when no key does;
* diffusers' older ``LoRACompatibleLinear`` form: ``<m>.lora.down.weight`` / ``<m>.lora.up.weight``;
* kohya / sd-scripts: ``lora_unet_<m with . → _>.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``
  (also the ``lora_transformer_`` prefix), resolved against the model's own module names. kohya files that
  use the original LDM / BFL names (``input_blocks_4_1_…``, Flux ``double_blocks_0_img_attn_qkv``) are not
  converted: their keys match no module and are reported as such.

The update a pair adds is ``(alpha / r) · B A x``; without an alpha it is ``B A x`` (PEFT's ``alpha = r``).
Text-encoder keys (``text_encoder*.``, ``lora_te*_``) are for another model and are refused unless the
caller asks to skip them. Files are never unpickled: anything that is not safetensors is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
_MODEL_PREFIXES = ("base_model.model.", "transformer.", "unet.", "model.diffusion_model.")
_TEXT_PREFIXES = (
    "text_encoder.",
    "text_encoder_2.",
    "text_encoder_3.",
    "lora_te_",
    "lora_te1_",
    "lora_te2_",
    "lora_te3_",
)
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
# (regex on the key without model prefix) -> role; group 1 is the module path.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(.+)\.lora_A(?:\.[^.]+)?\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_B(?:\.[^.]+)?\.weight$"), "up"),
    (re.compile(r"^(.+)\.lora\.down\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora\.up\.weight$"), "up"),
    (re.compile(r"^(.+)\.lora_down\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(.+)\.alpha$"), "alpha"),
)


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this model (the message names the file and the key)."""


@dataclass(frozen=True)
class LoraPair:
    """One layer's update ``scale · up @ down`` (fp32, CPU): ``down [r, in]``, ``up [out, r]``."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / r, or 1 when the file gives no alpha."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass(frozen=True)
class RawPairs:
    """Pairs keyed by the module path as written in the file (kohya names still flattened)."""

    path: Path
    pairs: dict[str, LoraPair]
    kohya: bool
    skipped: tuple[str, ...]


def resolve_path(path: str | Path) -> Path:
    """A ``.safetensors`` file, or a directory holding diffusers' ``pytorch_lora_weights.safetensors``."""
    p = Path(path)
    if p.is_dir():
        files = [p / DIFFUSERS_FILE] if (p / DIFFUSERS_FILE).is_file() else sorted(p.glob("*.safetensors"))
        if len(files) != 1:
            raise LoraError(
                f"{p}: expected {DIFFUSERS_FILE} or exactly one .safetensors file in the directory, found {len(files)}"
            )
        return files[0]
    if not p.exists():
        raise FileNotFoundError(f"LoRA file {p} does not exist")
    if p.suffix != ".safetensors":
        raise LoraError(f"{p}: only .safetensors LoRA files are read (pickle-based .bin/.pt/.ckpt are refused)")
    return p


def _metadata_alpha(meta: dict[str, str]) -> float | None:
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return None
    for prefix in ("", "transformer.", "unet."):
        if isinstance(cfg, dict) and f"{prefix}lora_alpha" in cfg:
            return float(cfg[f"{prefix}lora_alpha"])
    return None


def read_pairs(path: str | Path, *, skip_text_encoder: bool = False) -> RawPairs:
    """Read every pair of a LoRA file; malformed or unpaired keys raise :class:`LoraError` naming them."""
    file = resolve_path(path)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (OSError, SafetensorError) as e:
        raise LoraError(f"{file}: not a readable safetensors file ({e})") from None
    if not tensors:
        raise LoraError(f"{file}: the file holds no tensors")
    default_alpha = _metadata_alpha(meta)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    skipped: list[str] = []
    kohya = False
    for key, t in tensors.items():
        if key.startswith(_TEXT_PREFIXES):
            if not skip_text_encoder:
                raise LoraError(
                    f"{file}: key {key!r} is for a text encoder; only denoiser LoRAs are applied "
                    f"(pass skip_text_encoder=True to ignore text-encoder keys)"
                )
            skipped.append(key)
            continue
        bare = key
        for prefix in _KOHYA_PREFIXES:
            if bare.startswith(prefix):
                bare, kohya = bare[len(prefix) :], True
                break
        else:
            for prefix in _MODEL_PREFIXES:
                if bare.startswith(prefix):
                    bare = bare[len(prefix) :]
                    break
        for rx, role in _PATTERNS:
            m = rx.match(bare)
            if m:
                if role in parts.setdefault(m.group(1), {}):
                    raise LoraError(f"{file}: key {key!r} repeats the {role} of module {m.group(1)!r}")
                parts[m.group(1)][role] = t
                break
        else:
            raise LoraError(
                f"{file}: key {key!r} is not a LoRA key of a supported layout "
                f"(lora_A/lora_B, lora.down/lora.up, lora_down/lora_up, alpha)"
            )
    pairs: dict[str, LoraPair] = {}
    for module, roles in parts.items():
        if "down" not in roles or "up" not in roles:
            missing = "up (lora_B)" if "down" in roles else "down (lora_A)"
            raise LoraError(f"{file}: module {module!r} has no {missing} weight")
        down, up = roles["down"], roles["up"]
        if down.dim() != 2 or up.dim() != 2:
            raise LoraError(
                f"{file}: module {module!r} has a {down.dim()}-D/{up.dim()}-D pair; only linear "
                f"(2-D) LoRA weights are supported, not conv"
            )
        if down.shape[0] != up.shape[1]:
            raise LoraError(
                f"{file}: module {module!r}: lora_A is {list(down.shape)} but lora_B is "
                f"{list(up.shape)}; their ranks differ"
            )
        alpha = float(roles["alpha"].float().item()) if "alpha" in roles else default_alpha
        pairs[module] = LoraPair(down.float().contiguous(), up.float().contiguous(), alpha)
    return RawPairs(file, pairs, kohya, tuple(skipped))
