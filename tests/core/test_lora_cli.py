"""``--lora NAME[:SCALE]`` resolution: shipped adapter by name, files, and one-line errors."""

from __future__ import annotations

import pytest
import torch

import segquant_core as sq
from segquant_cli.errors import CLIError
from segquant_cli.lora_choice import parse_lora
from segquant_shapes import shipped_pipeline_path, tiny_random_pipeline


def test_shipped_adapter_resolves_with_prompts_and_fits_the_shipped_model_layout() -> None:
    choice = parse_lora("outlined:2", "shipped:mmdit")
    assert choice.name == "outlined" and choice.scale == 2.0
    assert choice.path == shipped_pipeline_path("mmdit") / "loras" / "outlined"
    prompts = choice.eval_prompts
    assert prompts and all("outlined" in p for p in prompts)
    weights = choice.path / "pytorch_lora_weights.safetensors"
    assert weights.stat().st_size < 2_000_000
    assert parse_lora("outlined", "shipped:mmdit").scale == 1.0


def test_shipped_adapter_keys_match_the_mmdit_layout_but_not_the_tiny_shapes(tmp_path) -> None:
    tiny = tiny_random_pipeline("mmdit").transformer  # 2 layers, dim 64: same module names, other shapes
    with pytest.raises(sq.LoraError, match=r"matches no linear layer|out x in"):
        sq.load_lora(tiny, parse_lora("outlined", "shipped:mmdit").path, "outlined")
    assert sq.list_loras(tiny) == {}
    assert all(not m._forward_hooks for m in tiny.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope", "no adapter 'nope' for shipped:mmdit; known: outlined"),
        ("outlined:abc", "scale must be a number"),
        ("outlined:inf", "finite scale"),
        ("missing.safetensors", "does not exist"),
    ],
)
def test_bad_lora_arguments_are_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(CLIError, match=message):
        parse_lora(spec, "shipped:mmdit")
