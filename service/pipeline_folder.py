"""Load a stock diffusers pipeline folder the way diffusers itself saved it, optionally without some components.

Why this exists: diffusers writes a component that was ``None`` at save time as ``[null, null]`` in
``model_index.json`` but will not load such a folder unless that component is passed again as ``None``
(SD3/SD3.5 saved without T5 is the common case). Users also drop large optional components on purpose
(``drop_components: [text_encoder_3]`` serves SD3 without T5); a dropped text encoder takes its tokenizer
with it. Weights are read from safetensors only (``use_safetensors=True``): never a pickle.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Components a pipeline cannot run without; dropping one is a configuration error, not a memory saving.
REQUIRED_COMPONENTS = frozenset({"transformer", "unet", "vae", "scheduler"})


def read_model_index(folder: str | Path) -> dict[str, Any]:
    """The folder's ``model_index.json`` (raises ``FileNotFoundError`` when there is none)."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    return json.loads(index.read_text())


def component_names(index: dict[str, Any]) -> list[str]:
    """Every component slot the index lists (saved or null), in file order."""
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2]


def null_components(index: dict[str, Any]) -> list[str]:
    """Components saved as ``[null, null]``: they must be passed back as ``None`` at load."""
    return [k for k in component_names(index) if index[k][0] is None and index[k][1] is None]


def expand_drop(index: dict[str, Any], drop: Iterable[str]) -> list[str]:
    """The components to load as ``None``: ``drop`` plus each dropped text encoder's tokenizer.

    Raises ``ValueError`` naming the bad entry when a name is not a component of this pipeline, or is
    one the pipeline cannot run without.
    """
    names = component_names(index)
    out: list[str] = []
    for name in drop:
        if name not in names:
            raise ValueError(f"{name!r} is not a component of this pipeline (components: {', '.join(names)})")
        if name in REQUIRED_COMPONENTS:
            raise ValueError(f"{name!r} is required to generate images and cannot be dropped")
        out.append(name)
        if name.startswith("text_encoder"):
            tokenizer = "tokenizer" + name.removeprefix("text_encoder")
            if tokenizer in names and tokenizer not in out:
                out.append(tokenizer)
    return out


def active_components(index: dict[str, Any], drop: Iterable[str] = ()) -> list[str]:
    """The components a pipeline runs with: saved ones, minus dropped ones (and their tokenizers)."""
    gone = set(null_components(index)) | set(expand_drop(index, drop))
    return [k for k in component_names(index) if k not in gone]


def load_pipeline_folder(
    folder: str | Path,
    cls: Any,
    *,
    drop: Iterable[str] = (),
    dtype: Any = None,
    local_files_only: bool = True,
    **kwargs: Any,
) -> Any:
    """``cls.from_pretrained(folder)`` with null and dropped components passed as ``None``, safetensors only."""
    index = read_model_index(folder)
    for name in [*null_components(index), *expand_drop(index, drop)]:
        kwargs.setdefault(name, None)
    if dtype is not None:
        kwargs["dtype"] = dtype  # diffusers 0.36+: ``torch_dtype`` is deprecated
    return cls.from_pretrained(str(folder), use_safetensors=True, local_files_only=local_files_only, **kwargs)
