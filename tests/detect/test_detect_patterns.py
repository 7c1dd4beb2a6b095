"""Toy-module tests of every detection rule (SEGQUANT.md §11.2 items 14–19 and 21), each a positive and a negative
case, run through both capture methods (torch.export and the dispatch-level recorder)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segquant_core.detect import LayerPlan, Segments, detect

B = 2
METHODS = ["export", "dispatch"]


@pytest.fixture(params=METHODS)
def method(request: pytest.FixtureRequest) -> str:
    return request.param


def run(model: nn.Module, *args: torch.Tensor, method: str = "export") -> dict[str, LayerPlan]:
    torch.manual_seed(0)
    plan = detect(model.eval(), example_args=args, capture_method=method)  # type: ignore[arg-type]
    return {rec.layer: rec for rec in plan}


def out(*sizes: int) -> Segments:
    return Segments("out", sizes)


def inp(*sizes: int) -> Segments:
    return Segments("in", sizes)


# ------------------------------------------------------------------------------------------------------------
# §11.2 item 14: linear → chunk
# ------------------------------------------------------------------------------------------------------------
class ChunkLast(nn.Module):
    """chunk(3, dim=-1) by keyword on a 3-D output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 12)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(x).chunk(3, dim=-1)


class ChunkNotLast(nn.Module):
    """chunk(2, dim=1) on a (B, S, 12) output splits tokens, not features."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 12)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.chunk(self.lin(x), 2, dim=1)


class ChunkPositional(nn.Module):
    """torch.chunk(y, 4, 2): positional, positive last dim of a 3-D output; and dim=1 on a 2-D one (AdaLN)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(8, 12)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (*torch.chunk(self.a(x), 4, 2), *self.b(x[:, 0]).chunk(2, 1))


class ChunkThroughOps(nn.Module):
    """SD3/PixArt style: ``[:, None]``, ``.to()`` and ``contiguous()`` between the linear and the chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 12)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(t)[:, None].to(torch.float32).contiguous().chunk(6, dim=-1)


class ChunkAfterUnsqueezeNotLast(nn.Module):
    """``[:, None]`` then chunk along that new dim 1: not a feature split (negative)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 12)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.lin(t)[:, None].expand(-1, 4, -1).chunk(2, dim=1)[0]


class ChunkRagged(nn.Module):
    """torch.chunk(13, 5) gives 5 chunks of ceil(13/5)=3 with a short tail: [3, 3, 3, 3, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 13)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(t).chunk(5, dim=-1)


class ChunkOfReshapedOutput(nn.Module):
    """PixArt AdaLN: ``(table[None] + y.reshape(B, 6, -1)).chunk(6, dim=1)`` segments the output 6 ways;
    chunking the *last* dim of that view would cut inside each block (strided, unsupported → negative)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 24)
        self.strided = nn.Linear(8, 24)
        self.table = nn.Parameter(torch.randn(6, 4))

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mods = (self.table[None] + self.lin(t).reshape(t.shape[0], 6, -1)).chunk(6, dim=1)
        strided = self.strided(t).reshape(t.shape[0], 6, 4).chunk(2, dim=-1)
        return (*mods, *strided)


class ArithmeticBeforeChunk(nn.Module):
    """One shape-preserving add between linear and chunk is crossed; a second one (a residual stream) is not."""

    def __init__(self) -> None:
        super().__init__()
        self.one = nn.Linear(8, 8)
        self.two = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = (self.one(x) + x).chunk(2, dim=-1)
        b = (self.two(x) * 0.5 + x).chunk(2, dim=-1)
        return (*a, *b)


def test_chunk_last_dim_keyword(method: str) -> None:  # §11.2 item 14
    plan = run(ChunkLast(), torch.randn(B, 5, 8), method=method)
    assert plan["lin"].segments == out(4, 4, 4)
    assert "chunk" in plan["lin"].reasons[0] or "split" in plan["lin"].reasons[0]


def test_chunk_on_non_last_dim_is_not_a_segmentation(method: str) -> None:  # §11.2 item 14 (dim=1 on 3-D)
    plan = run(ChunkNotLast(), torch.randn(B, 6, 8), method=method)
    assert plan["lin"].segments is None


def test_chunk_positional_dim(method: str) -> None:  # §11.2 item 14 (positional dim)
    plan = run(ChunkPositional(), torch.randn(B, 5, 8), method=method)
    assert plan["a"].segments == out(3, 3, 3, 3)
    assert plan["b"].segments == out(6, 6)


def test_chunk_through_view_and_to(method: str) -> None:  # §11.2 item 14 (op between linear and chunk)
    plan = run(ChunkThroughOps(), torch.randn(B, 8), method=method)
    assert plan["lin"].segments == out(2, 2, 2, 2, 2, 2)
    assert "via" in plan["lin"].reasons[0]


def test_chunk_along_added_dim_is_negative(method: str) -> None:  # §11.2 item 14 (negative)
    plan = run(ChunkAfterUnsqueezeNotLast(), torch.randn(B, 8), method=method)
    assert plan["lin"].segments is None


def test_chunk_with_short_tail_is_ragged(method: str) -> None:  # §11.2 item 14/15 (ragged)
    plan = run(ChunkRagged(), torch.randn(B, 8), method=method)
    assert plan["lin"].segments == out(3, 3, 3, 3, 1)


def test_chunk_of_reshaped_output(method: str) -> None:  # PixArt AdaLN; strided split negative
    plan = run(ChunkOfReshapedOutput(), torch.randn(B, 8), method=method)
    assert plan["lin"].segments == out(4, 4, 4, 4, 4, 4)
    assert "(6, 4) view" in plan["lin"].reasons[0]
    assert plan["strided"].segments is None


def test_at_most_one_arithmetic_op_before_the_chunk(method: str) -> None:  # §11.2 item 14 (op in between)
    plan = run(ArithmeticBeforeChunk(), torch.randn(B, 8), method=method)
    assert plan["one"].segments == out(4, 4)
    assert plan["two"].segments is None


# ------------------------------------------------------------------------------------------------------------
# §11.2 item 15: linear → split / split_with_sizes / unbind
# ------------------------------------------------------------------------------------------------------------
class Splits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rem = nn.Linear(8, 12)
        self.sizes = nn.Linear(8, 12)
        self.unbind = nn.Linear(8, 3)
        self.tokens = nn.Linear(8, 12)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.rem(x).split(5, -1)  # 5 + 5 + 2 remainder
        b = torch.split(self.sizes(x), [4, 8], dim=2)  # split_with_sizes, positive last dim
        c = self.unbind(x).unbind(-1)
        d = self.tokens(x).split([2, 3], dim=1)  # along tokens: negative
        return (*a, *b, *c, *d)


def test_split_remainder_and_sizes(method: str) -> None:  # §11.2 item 15
    plan = run(Splits(), torch.randn(B, 5, 8), method=method)
    assert plan["rem"].segments == out(5, 5, 2)
    assert plan["sizes"].segments == out(4, 8)
    assert plan["unbind"].segments == out(1, 1, 1)
    assert plan["tokens"].segments is None


# ------------------------------------------------------------------------------------------------------------
# §11.2 item 16: cat → linear
# ------------------------------------------------------------------------------------------------------------
class Cats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 16)
        self.equal = nn.Linear(16, 4)
        self.unequal = nn.Linear(24, 4)
        self.tokens = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, b, c = self.a(x), self.b(x), self.c(x)
        eq = self.equal(torch.cat([a, b], dim=-1))
        uneq = self.unequal(torch.concat((a, c), 2).to(torch.float32))  # alias + positional dim + .to()
        tok = self.tokens(torch.cat([a, b], dim=1))  # concat of tokens: negative
        return eq, uneq, tok


def test_cat_equal_and_unequal(method: str) -> None:  # §11.2 item 16
    plan = run(Cats(), torch.randn(B, 5, 8), method=method)
    assert plan["equal"].segments == inp(8, 8)
    assert plan["unequal"].segments == inp(8, 16)
    assert plan["tokens"].segments is None
    assert plan["a"].segments is None


# ------------------------------------------------------------------------------------------------------------
# §11.2 item 17: stack → linear
# ------------------------------------------------------------------------------------------------------------
class Stacks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vec = nn.Linear(3, 4)
        self.last = nn.Linear(2, 4)
        self.batch = nn.Linear(8, 4)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        v = self.vec(torch.stack([t, t * 2, t * 3], dim=1))  # 1-D parts → (B, 3)
        w = self.last(torch.stack([x, -x], dim=-1))  # (B, 8) parts → (B, 8, 2)
        z = self.batch(torch.stack([x, x * 2], dim=0))  # (2, B, 8): not a feature concat
        return v, w, z


def test_stack(method: str) -> None:  # §11.2 item 17
    plan = run(Stacks(), torch.randn(B), torch.randn(B, 8), method=method)
    assert plan["vec"].segments == inp(1, 1, 1)
    assert plan["last"].segments == inp(1, 1)
    assert plan["batch"].segments is None


# ------------------------------------------------------------------------------------------------------------
# §11.2 item 18: per-head reshape → linear, and reshapes that are not head merges
# ------------------------------------------------------------------------------------------------------------
class Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn_out = nn.Linear(16, 16)
        self.flat = nn.Linear(16, 16)
        self.ref_fp = nn.Linear(20, 4)

    def forward(self, h: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, heads, s, d = h.shape
        merged = h.transpose(1, 2).reshape(b, s, heads * d)  # (B, H, S, D) → (B, S, H·D)
        a = self.attn_out(merged.to(torch.float32)[:, 1:])
        f = self.flat(h.transpose(1, 2).flatten(2, 3))
        ref = self.ref_fp(r.reshape(r.shape[0], 20))  # the reference's "(B,2,10)→(B,20)": a real merge
        return a, f, ref


class NotHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.split_last = nn.Linear(5, 4)
        self.flatten_lead = nn.Linear(6, 4)
        self.after_mul = nn.Linear(16, 4)
        self.squeeze = nn.Linear(7, 4)
        self.rows = nn.Linear(12, 4)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, z: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        a = self.split_last(x.view(x.shape[0], 4, 5))  # (B, 20) → (B, 4, 5): splits, doesn't merge
        b = self.flatten_lead(y.flatten(1, 2))  # (B, 4, 5, 6) → (B, 20, 6): non-trailing dims
        c = self.after_mul(h.reshape(h.shape[0], -1) * 2.0)  # arithmetic between merge and linear
        d = self.squeeze(z.squeeze(-1))  # (B, 7, 1) → (B, 7): D == 1
        e = self.rows(rows.reshape(B, 12))  # (B·3, 4) → (B, 12): folds rows of the batch dim
        return a, b, c, d, e


def test_per_head_reshape(method: str) -> None:  # §11.2 item 18
    plan = run(Heads(), torch.randn(B, 2, 5, 8), torch.randn(B, 2, 10), method=method)
    assert plan["attn_out"].segments == inp(8, 8)
    assert plan["attn_out"].reasons[0].startswith("input is a per-head reshape 2×8")
    assert plan["flat"].segments == inp(8, 8)
    # Documented: any merge of exactly the last two dims counts, whatever the dims mean.
    assert plan["ref_fp"].segments == inp(10, 10)


def test_reshape_false_positives(method: str) -> None:  # §11.2 item 18 (negatives)
    plan = run(
        NotHeads(),
        torch.randn(B, 20),
        torch.randn(B, 4, 5, 6),
        torch.randn(B, 2, 8),
        torch.randn(B, 7, 1),
        torch.randn(B * 3, 4),
        method=method,
    )
    for name in ("split_last", "flatten_lead", "after_mul", "squeeze", "rows"):
        assert plan[name].segments is None, name


# ------------------------------------------------------------------------------------------------------------
# §11.2 item 19: SiLU / GELU / GEGLU → linear (DualScale)
# ------------------------------------------------------------------------------------------------------------
class Activations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.SiLU()
        self.drop = nn.Dropout(0.1)
        self.after_silu = nn.Linear(8, 4)
        self.after_gelu = nn.Linear(8, 4)
        self.after_relu = nn.Linear(8, 4)
        self.after_add = nn.Linear(8, 4)
        self.proj = nn.Linear(8, 16)
        self.down = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.after_silu(self.drop(self.act(x)).to(torch.float32))
        b = self.after_gelu(F.dropout(F.gelu(x, approximate="tanh"), 0.1, training=self.training))
        c = self.after_relu(torch.relu(x))
        d = self.after_add(F.silu(x) + 1.0)
        hidden, gate = self.proj(x).chunk(2, dim=-1)  # diffusers GEGLU
        e = self.down(self.drop(hidden * F.gelu(gate)))
        return a, b, c, d, e


class AdaLN(nn.Module):
    """SiLU → Linear → chunk(6): segmented *and* DualScale."""

    def __init__(self) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(8, 48)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(self.silu(emb)).chunk(6, dim=1)


def test_activation_to_linear(method: str) -> None:  # §11.2 item 19
    plan = run(Activations(), torch.randn(B, 5, 8), method=method)
    assert plan["after_silu"].dual_scale and "SiLU" in plan["after_silu"].reasons[0]
    assert plan["after_gelu"].dual_scale and "GELU(tanh)" in plan["after_gelu"].reasons[0]
    assert not plan["after_relu"].dual_scale
    assert not plan["after_add"].dual_scale
    assert plan["down"].dual_scale and "gated" in plan["down"].reasons[0]
    assert plan["proj"].segments == out(8, 8) and not plan["proj"].dual_scale


def test_adaln_gets_both(method: str) -> None:  # §11.2 item 19 + 14
    rec = run(AdaLN(), torch.randn(B, 8), method=method)["linear"]
    assert rec.segments == out(8, 8, 8, 8, 8, 8)
    assert rec.dual_scale
    assert len(rec.reasons) == 2


class MixedCat(nn.Module):
    """Flux single-stream ``proj_out``: cat(attention-like part, GELU(MLP)), ragged; plus a cat whose parts
    all come from activations (dual as a whole) and one with no activation at all."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.mlp = nn.Linear(8, 16)
        self.proj_out = nn.Linear(24, 8)
        self.both = nn.Linear(24, 8)
        self.neither = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, h = self.attn(x), self.mlp(x)
        mixed = self.proj_out(torch.cat([a, F.gelu(h, approximate="tanh")], dim=2))
        both = self.both(torch.cat([F.silu(a), F.gelu(h)], dim=-1))
        neither = self.neither(torch.cat([a, h], dim=-1))
        return mixed, both, neither


def test_dual_scale_per_in_segment_of_a_mixed_cat(method: str) -> None:
    plan = run(MixedCat(), torch.randn(B, 5, 8), method=method)
    rec = plan["proj_out"]
    assert rec.segments == inp(8, 16) and rec.dual_scale == (False, True) and rec.dual_mask == (False, True)
    assert any("in-segment(s) [1] only" in r and "GELU(tanh)" in r for r in rec.reasons)
    assert plan["both"].segments == inp(8, 16) and plan["both"].dual_scale is True
    assert plan["neither"].segments == inp(8, 16) and plan["neither"].dual_scale is False


# ------------------------------------------------------------------------------------------------------------
# §11.2 item 21: ops on raw inputs (timestep embedding)
# ------------------------------------------------------------------------------------------------------------
class TimestepEmbed(nn.Module):
    """Sinusoidal embedding of the raw timestep input (cos | sin halves) → Linear → SiLU → Linear."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.dim = dim
        self.linear_1 = nn.Linear(dim, 32)
        self.linear_2 = nn.Linear(32, 32)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)  # flip_sin_to_cos
        return self.linear_2(F.silu(self.linear_1(emb)))


def test_ops_on_raw_inputs_are_seen(method: str) -> None:  # §11.2 item 21
    plan = run(TimestepEmbed(), torch.tensor([10.0, 500.0]), method=method)
    assert plan["linear_1"].segments == inp(8, 8)
    assert plan["linear_2"].dual_scale


def test_diffusers_timestep_modules(method: str) -> None:  # §11.2 item 21 with the stock modules
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps

    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = Timesteps(32, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.embedder = TimestepEmbedding(32, 16)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.embedder(self.proj(t))

    plan = run(Embed(), torch.tensor([1.0, 999.0]), method=method)
    assert plan["embedder.linear_1"].segments == inp(16, 16)
    assert plan["embedder.linear_2"].dual_scale


# ------------------------------------------------------------------------------------------------------------
# combining rules
# ------------------------------------------------------------------------------------------------------------
class InAndOut(nn.Module):
    """cat → linear → chunk: the output segmentation wins, the input match is kept in reasons."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 12)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(torch.cat([a, b], dim=-1)).chunk(3, dim=-1)


class Shared(nn.Module):
    """Shared modules: ``agree`` (3 calls) is chunked the same way by every call that chunks it; ``disagree`` is
    chunked 2 ways once and 3 ways once; ``half_dual`` sees SiLU in one call only; ``two_consumers`` has one call
    whose output is chunked 2 and 3 ways."""

    def __init__(self) -> None:
        super().__init__()
        self.agree = nn.Linear(8, 12)
        self.disagree = nn.Linear(8, 12)
        self.half_dual = nn.Linear(8, 8)
        self.two_consumers = nn.Linear(8, 12)
        self.unused = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = (*self.agree(x).chunk(2, -1), *self.agree(x * 2).chunk(2, -1), self.agree(x + 1))
        d = (*self.disagree(x).chunk(2, -1), *self.disagree(x).chunk(3, -1))
        h = (self.half_dual(F.silu(x)), self.half_dual(x))
        y = self.two_consumers(x)  # one call, two consumers that disagree
        return (*a, *d, *h, *y.chunk(2, -1), *y.chunk(3, -1))


def test_out_preferred_over_in(method: str) -> None:
    rec = run(InAndOut(), torch.randn(B, 8), torch.randn(B, 8), method=method)["lin"]
    assert rec.segments == out(4, 4, 4)
    assert any("cat of 2 parts [8, 8]" in r and "kept the output" in r for r in rec.reasons)


def test_shared_module_calls(method: str) -> None:
    plan = run(Shared(), torch.randn(B, 8), method=method)
    assert plan["agree"].segments == out(6, 6)
    assert "[2 of 3 calls]" in plan["agree"].reasons[0]
    assert plan["disagree"].segments is None
    assert "disagree" in plan["disagree"].reasons[0]
    assert not plan["half_dual"].dual_scale and "1 of 2 calls" in plan["half_dual"].reasons[0]
    assert plan["two_consumers"].segments is None
    assert "split it differently" in plan["two_consumers"].reasons[0]
    assert plan["unused"].reasons == ("not called during the example forward",)
