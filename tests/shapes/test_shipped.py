"""The shipped trained pipelines load and generate with all network access blocked."""

from __future__ import annotations

import socket

import pytest

from segquant_shapes import load_shipped, shipped_pipeline_path
from segquant_shapes import text_encoder as te


@pytest.mark.parametrize("name", ["mmdit", "unet", "flux"])
def test_shipped_pipeline_offline(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = shipped_pipeline_path(name)
    if not (path / "model_index.json").exists():
        pytest.skip(f"shipped {name} weights not exported yet ({path}); run segquant_shapes.export")
    files = {p.name for p in path.iterdir()}
    assert files <= {
        "model_index.json",
        "scheduler",
        "transformer",
        "unet",
        "MODEL_CARD.md",
        "training.json",
        "variants",
        "loras",
    }  # variants/: shipped quantized checkpoints; loras/: shipped adapters
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size < 40e6

    def no_network(*args, **kwargs):
        raise OSError("network blocked by test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(te, "_CACHE", {})  # force the text encoder to load under the block too
    pipe = load_shipped(name)
    pipe.set_progress_bar_config(disable=True)
    import torch

    img = pipe(
        "a large red square in the center on a white background",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert img.size == (32, 32)
