"""LoRA adapters a model offers, as the registry lists them (torch-free: the API validates requests from it).

An entry names an adapter file or folder and its defaults::

    adapters:
      - name: outlined
        path: shipped:mmdit/outlined     # shipped:MODEL/NAME | /path/to/folder | /path/to/file.safetensors
        scale: 2.0                       # default scale when a request gives none
        description: draws shapes as outlines
        trigger: outlined                # the word a prompt needs for the adapter to show

A folder may carry the adapter's own card, ``lora.json`` (``default_scale``, ``description``, ``trigger``):
fields the registry leaves out are read from it, so a retrained adapter brings its own default scale.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

ADAPTER_CARD_FILE = "lora.json"
ADAPTER_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, read when a folder holds several
SHIPPED_PREFIX = "shipped:"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # the registry's name rule (service.registry re-exports it)


class AdapterSpec(BaseModel):
    """One adapter of a model: where its weights are, its default scale, and what it does."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN, description="what requests name in loras[].name")
    path: str = Field(min_length=1, description="shipped:MODEL/NAME, an adapter folder, or a .safetensors file")
    scale: float = Field(1.0, allow_inf_nan=False, description="default scale; default: the card's, else 1.0")
    description: str = ""
    trigger: str | None = Field(None, description="a word prompts should contain for the adapter to show")

    @model_validator(mode="after")
    def _check_and_read_card(self) -> AdapterSpec:
        where = self.local_path()
        if where is None:  # segquant_shapes is not installed here (an API-only host): the worker checks it
            return self
        problem = weights_problem(where)
        if problem:
            raise ValueError(f"adapter {self.name!r}: {self.path} {problem}")
        card = read_card(where)
        given = self.model_fields_set
        if "scale" not in given and card.get("default_scale") is not None:
            scale = card["default_scale"]
            if not isinstance(scale, int | float) or not math.isfinite(scale):
                raise ValueError(f"adapter {self.name!r}: {ADAPTER_CARD_FILE} default_scale must be a finite number")
            self.scale = float(scale)
        if "description" not in given and isinstance(card.get("description"), str):
            self.description = card["description"]
        if "trigger" not in given and isinstance(card.get("trigger"), str):
            self.trigger = card["trigger"]
        return self

    def local_path(self) -> Path | None:
        """The adapter's folder or file on this machine; None when a shipped one cannot be located here."""
        if not self.path.startswith(SHIPPED_PREFIX):
            return Path(self.path).expanduser()
        model, sep, adapter = self.path.removeprefix(SHIPPED_PREFIX).partition("/")
        if not sep or not model or not adapter or "/" in adapter:
            raise ValueError(f"adapter {self.name!r}: expected shipped:MODEL/NAME, got {self.path!r}")
        from service.registry import shipped_dir  # registry imports this module

        root = shipped_dir(model)
        return None if root is None else root / "loras" / adapter

    def public(self) -> dict[str, Any]:
        """What ``GET /models`` shows (not the path: it is the server's business)."""
        return {"name": self.name, "scale": self.scale, "description": self.description, "trigger": self.trigger}


def weights_problem(path: Path) -> str | None:
    """Why ``path`` holds no single safetensors adapter file, or None (pickles are never read)."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if (path / ADAPTER_WEIGHTS_FILE).is_file() or len(files) == 1:
            return None
        return f"is a folder without {ADAPTER_WEIGHTS_FILE} or exactly one .safetensors file ({len(files)} found)"
    if not path.exists():
        siblings = sorted(p.name for p in path.parent.iterdir() if p.is_dir()) if path.parent.is_dir() else []
        known = f" (found there: {', '.join(siblings)})" if siblings else ""
        return f"does not exist: {path}{known}"
    if path.suffix != ".safetensors":
        return "is not a .safetensors file (pickle-based .bin/.pt/.ckpt files are refused)"
    return None


def read_card(path: Path) -> dict[str, Any]:
    """The adapter's ``lora.json`` (beside a file only when it names that file); {} when there is none."""
    folder = path if path.is_dir() else path.parent
    card_file = folder / ADAPTER_CARD_FILE
    if not card_file.is_file():
        return {}
    try:
        card = json.loads(card_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{card_file}: unreadable adapter card ({e})") from None
    if not isinstance(card, dict):
        raise ValueError(f"{card_file}: an adapter card must be a JSON object")
    if path.is_file() and card.get("file") not in (None, path.name):
        return {}
    return card
