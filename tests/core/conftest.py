"""Small, seeded toy models and helpers shared by the segquant_core tests.

Everything here is tiny (dims ≤ 256, a couple of calibration calls) so the whole suite stays fast on two
busy CPU cores. Tests pass explicit :class:`~segquant_core.detect.plan.Plan` objects to ``quantize()`` so
they do not depend on pattern detection.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segquant_core.detect.plan import LayerPlan, Plan, Segments

D = 32  # hidden size of the toy models
# Per-chunk weight magnitudes of the AdaLN toy: small chunks next to large ones (the SegLinear motivation).
CHUNK_SCALES = (0.05, 0.05, 0.5, 2.0, 0.05, 1.0)


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """Tiny GEMMs are far faster on one thread, especially on cores shared with another job."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class AdaLNToy(nn.Module):
    """SiLU → Linear(d → 6d) → chunk(6): the AdaLN modulation of SD3/FLUX blocks.

    The six chunks' weights and biases are scaled by ``chunk_scales`` so they differ in magnitude.
    """

    def __init__(self, d: int = D, chunk_scales: tuple[float, ...] = CHUNK_SCALES, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.d = d
        self.linear = nn.Linear(d, len(chunk_scales) * d)
        with torch.no_grad():
            for k, s in enumerate(chunk_scales):
                self.linear.weight[k * d : (k + 1) * d] *= s
                self.linear.bias[k * d : (k + 1) * d] *= s

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear(F.silu(emb))

    def chunks(self, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.forward(emb).chunk(self.linear.out_features // self.d, dim=-1)


def adaln_plan(model: AdaLNToy, dual: bool = False) -> Plan:
    n = model.linear.out_features // model.d
    return Plan([LayerPlan("linear", Segments("out", (model.d,) * n), dual)])


def adaln_calls(n: int = 2, batch: int = 16, d: int = D, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = gen(seed)
    return [{"emb": torch.randn(batch, d, generator=g) * 3} for _ in range(n)]


class SegToy(nn.Module):
    """A toy transformer block with one linear of each kind.

    * ``ada``: SiLU → Linear(d → 3d) → chunk(3)         (out-segments, DualScale candidate)
    * ``q``, ``k``: two linears whose outputs are concatenated (plain)
    * ``proj``: Linear(d + d/2 → d) on that concatenation (ragged in-segments [d, d/2])
    * ``ff``: GELU → Linear(d → d)                       (single segment, DualScale candidate)
    """

    def __init__(self, d: int = D, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.d = d
        self.ada = nn.Linear(d, 3 * d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d // 2)
        self.proj = nn.Linear(d + d // 2, d)
        self.ff = nn.Linear(d, d)
        with torch.no_grad():
            self.ada.weight[:d] *= 0.1  # chunks of different magnitude
            self.ada.weight[2 * d :] *= 3.0
            self.k.weight *= 4.0  # the two concatenated parts differ in range

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(F.silu(emb)).unsqueeze(1).chunk(3, dim=-1)
        h = x * (1 + scale) + shift
        h = torch.cat([self.q(h), self.k(h)], dim=-1)
        h = self.proj(h)
        return x + gate * self.ff(F.gelu(h))


SEG_LAYERS = ("ada", "q", "k", "proj", "ff")


def seg_plan(d: int = D, dual: bool = True, seg: bool = True) -> Plan:
    """Explicit plan for :class:`SegToy`: out-segments on ``ada``, ragged in-segments on ``proj``."""
    return Plan(
        [
            LayerPlan("ada", Segments("out", (d, d, d)) if seg else None, dual),
            LayerPlan("q"),
            LayerPlan("k"),
            LayerPlan("proj", Segments("in", (d, d // 2)) if seg else None, dual),
            LayerPlan("ff", None, dual),
        ]
    )


def seg_calls(n: int = 2, batch: int = 2, tokens: int = 8, d: int = D, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = gen(seed)
    return [
        {"x": torch.randn(batch, tokens, d, generator=g), "emb": torch.randn(batch, d, generator=g) * 2}
        for _ in range(n)
    ]


class SingleStreamToy(nn.Module):
    """Flux's single-stream block output: ``proj_out(cat(attention-like part, GELU(MLP)))``, ragged ``[d, 2d]``.

    Only the MLP part comes from an activation, so DualScale belongs to the second in-segment alone.
    """

    def __init__(self, d: int = D, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.d = d
        self.attn = nn.Linear(d, d)
        self.mlp = nn.Linear(d, 2 * d)
        self.proj_out = nn.Linear(3 * d, d)
        with torch.no_grad():
            self.mlp.weight *= 3.0  # wide GELU inputs: a long positive range next to the small negative tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(torch.cat([self.attn(x), F.gelu(self.mlp(x), approximate="tanh")], dim=-1))


SINGLE_STREAM_DUAL = (False, True)  # attention part single-scale, MLP part DualScale


def single_stream_plan(d: int = D, dual: bool | tuple[bool, ...] = SINGLE_STREAM_DUAL) -> Plan:
    return Plan([LayerPlan("attn"), LayerPlan("mlp"), LayerPlan("proj_out", Segments("in", (d, 2 * d)), dual)])


def single_stream_calls(n: int = 2, tokens: int = 16, d: int = D, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = gen(seed)
    return [{"x": torch.randn(2, tokens, d, generator=g)} for _ in range(n)]


class TinyPipeline:
    """The minimum of a diffusers pipeline that calibration capture needs: a ``transformer`` and a loop
    that calls it with keyword arguments once per denoising step."""

    def __init__(self, d: int = D, seed: int = 0) -> None:
        self.transformer = SegToy(d, seed=seed)
        self.d = d
        self.calls = 0

    def __call__(
        self,
        prompt: str,
        num_inference_steps: int = 4,
        generator: torch.Generator | None = None,
        output_type: str = "latent",
        **_: object,
    ) -> torch.Tensor:
        self.calls += 1
        g = generator or torch.Generator().manual_seed(0)
        latents = torch.randn(1, 4, self.d, generator=g)
        # A deterministic stand-in for the prompt embedding.
        emb = torch.full((1, self.d), float(len(prompt) % 7) / 7.0)
        with torch.no_grad():
            for i in range(num_inference_steps):
                t = float(num_inference_steps - i) / num_inference_steps
                v = self.transformer(x=latents, emb=emb + t)
                latents = latents - v / num_inference_steps
        return latents
