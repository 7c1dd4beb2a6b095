"""Adapters in the registry and settings: defaults from the adapter's own card, and every bad entry refused
at load with a message naming the model, the adapter and the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from safetensors.torch import save_file

from service.registry import Registry, UnknownModelError, shipped_dir
from service.settings import load_settings

OUTLINED_CARD = json.loads(((shipped_dir("mmdit") or Path()) / "loras" / "outlined" / "lora.json").read_text())


def registry(*adapters: dict[str, Any]) -> Registry:
    return Registry.from_data([{"name": "m", "source": "tiny:mmdit", "variants": ["fp"], "adapters": list(adapters)}])


def adapter_folder(root: Path, card: dict[str, Any] | None = None, name: str = "style") -> Path:
    import torch

    folder = root / name
    folder.mkdir()
    save_file(
        {"transformer.proj.lora_A.weight": torch.zeros(2, 8), "transformer.proj.lora_B.weight": torch.zeros(8, 2)},
        str(folder / "pytorch_lora_weights.safetensors"),
    )
    if card is not None:
        (folder / "lora.json").write_text(json.dumps(card))
    return folder


def test_the_embedded_default_lists_the_shipped_adapter_with_its_cards_defaults() -> None:
    model = Registry.default().model("shapes-mmdit")
    spec = model.adapter("outlined")
    assert spec.path == "shipped:mmdit/outlined"
    assert (spec.scale, spec.trigger, spec.description) == (
        OUTLINED_CARD["default_scale"],
        OUTLINED_CARD["trigger"],
        OUTLINED_CARD["description"],
    )


def test_card_fills_what_the_registry_leaves_out(tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path, {"default_scale": 1.5, "trigger": "inked", "description": "ink lines"})
    from_card = registry({"name": "ink", "path": str(folder)}).model("m").adapter("ink")
    assert (from_card.scale, from_card.trigger, from_card.description) == (1.5, "inked", "ink lines")
    given = registry({"name": "ink", "path": str(folder), "scale": 0.5, "trigger": None}).model("m").adapter("ink")
    assert (given.scale, given.trigger, given.description) == (0.5, None, "ink lines")  # given fields win
    plain = registry({"name": "ink", "path": str(adapter_folder(tmp_path, name="bare"))}).model("m").adapter("ink")
    assert (plain.scale, plain.trigger) == (1.0, None)  # no card: 1.0


def test_unknown_adapter_names_the_model_and_the_known_ones(tmp_path: Path) -> None:
    reg = registry({"name": "ink", "path": str(adapter_folder(tmp_path))})
    with pytest.raises(UnknownModelError) as e:
        reg.model("m").adapter("sketch")
    assert e.value.valid == ["ink"] and "model 'm'" in str(e.value)


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"name": "x", "path": "/no/such/adapter"}, "does not exist"),
        ({"name": "x", "path": "shipped:mmdit/no-such"}, "found there: outlined"),
        ({"name": "x", "path": "shipped:mmdit"}, "expected shipped:MODEL/NAME"),
        ({"name": "bad name!", "path": "shipped:mmdit/outlined"}, "should match pattern"),
        ({"name": "x", "path": "shipped:mmdit/outlined", "scale": "inf"}, "finite"),
        ({"name": "x", "path": "shipped:mmdit/outlined", "rank": 4}, "Extra inputs are not permitted"),
    ],
)
def test_bad_entries_are_refused_at_load(entry: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as e:
        registry(entry)
    assert words in str(e.value)


def test_pickles_and_ambiguous_folders_are_refused(tmp_path: Path) -> None:
    pickle = tmp_path / "style.bin"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(ValidationError, match=r"not a \.safetensors file"):
        registry({"name": "x", "path": str(pickle)})
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a", "b"):
        save_file({}, str(two / f"{n}.safetensors"))
    with pytest.raises(ValidationError, match=r"exactly one \.safetensors file"):
        registry({"name": "x", "path": str(two)})


def test_duplicate_adapter_names_are_refused() -> None:
    entry = {"name": "x", "path": "shipped:mmdit/outlined"}
    with pytest.raises(ValidationError, match=r"duplicate adapter names \['x'\]"):
        registry(entry, entry)


def test_the_adapter_cache_holds_at_least_one_requests_adapters() -> None:
    with pytest.raises(ValidationError, match="adapter_cache_size"):
        load_settings(None, worker={"adapter_cache_size": 2}, limits={"max_loras_per_request": 3})
    s = load_settings(None, worker={"adapter_cache_size": 2}, limits={"max_loras_per_request": 2})
    assert (s.worker.adapter_cache_size, s.limits.max_loras_per_request, s.limits.max_lora_scale) == (2, 2, 4.0)
