"""Denoisers called with positional arguments are captured under their parameter names."""

from __future__ import annotations

import torch
from torch import nn

from segquant_core.calibrate.capture import capture_calibration


class _Denoiser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.proj(sample) * scale + timestep


class _PositionalPipe:
    """A minimal pipeline whose loop calls its denoiser positionally (like the shapes UNet pipeline)."""

    def __init__(self) -> None:
        self.unet = _Denoiser()

    def __call__(self, prompt: str, num_inference_steps: int, generator: torch.Generator, output_type: str):
        x = torch.randn(2, 4, generator=generator)
        for i in range(num_inference_steps):
            x = self.unet(x, torch.tensor(float(i)), 0.5)
        return x


def test_positional_calls_recorded_as_keywords() -> None:
    calib = capture_calibration(_PositionalPipe(), ["p"], num_inference_steps=3, steps_per_prompt=2, progress=False)
    assert len(calib) == 2
    for call in calib.calls:
        assert set(call) == {"sample", "timestep", "scale"}
        assert call["scale"] == 0.5 and call["sample"].shape == (2, 4)
    # replaying as keywords works
    model = _PositionalPipe().unet
    model(**calib.calls[0])
