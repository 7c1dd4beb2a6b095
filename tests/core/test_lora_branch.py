"""The LoRA branch's fast paths: one down GEMM shared by attention siblings, in-place add, bf16, autograd."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.attention_processor import Attention
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

import segquant_core as sq
from segquant_core.lora import shared_down_groups
from segquant_core.quantize import quantize

from .conftest import gen, rel_err

RANK = 4
DIM = 32


def joint_block() -> JointTransformerBlock:
    torch.manual_seed(0)
    return JointTransformerBlock(dim=DIM, num_attention_heads=2, attention_head_dim=16, context_pre_only=False).eval()


def block_call(seed: int = 1, tokens: int = 6, context: int = 5) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {
        "hidden_states": torch.randn(2, tokens, DIM, generator=g),
        "encoder_hidden_states": torch.randn(2, context, DIM, generator=g),
        "temb": torch.randn(2, DIM, generator=g),
    }


def random_adapter(model: torch.nn.Module, path: Path, seed: int = 3) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A rank-4 pair on every linear, large enough to matter, written as a diffusers file."""
    g = gen(seed)
    pairs, tensors = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            a = torch.randn(RANK, m.in_features, generator=g) / m.in_features**0.5
            b = torch.randn(m.out_features, RANK, generator=g) * 0.2
            pairs[name] = (a, b)
            tensors[f"transformer.{name}.lora_A.weight"] = a
            tensors[f"transformer.{name}.lora_B.weight"] = b
    save_file(tensors, str(path))
    return pairs


def merged(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float = 1.0) -> JointTransformerBlock:
    """A fresh float block with ``W + scale · B A`` in every adapted layer (the reference)."""
    ref = joint_block()
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            ref.get_submodule(name).weight += scale * (b @ a)
    return ref


class MatmulShapes(TorchDispatchMode):
    """Records the weight-side operand shape of every matrix product (what the branch's GEMMs are)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default):
            self.shapes.append(tuple(args[-1].shape))
        return func(*args, **(kwargs or {}))


def test_qkv_share_one_down_gemm_and_match_merged_weights(tmp_path):
    block = joint_block()
    pairs = random_adapter(block, tmp_path / "a.safetensors")
    ref = merged(pairs)
    sq.load_lora(block, tmp_path / "a.safetensors", "a")
    groups = [("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj"), ("attn.to_k", "attn.to_q", "attn.to_v")]
    assert shared_down_groups(block) == groups
    for seed in (1, 2):  # the second call must not reuse the first call's projection
        call = block_call(seed)
        with torch.no_grad(), MatmulShapes() as seen:
            out = block(**call)
            want, plain = ref(**call), joint_block()(**call)
        for o, r, p in zip(out, want, plain):
            assert rel_err(p, r) > 0.05  # the adapter changes the block
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)
        # One down GEMM over the three siblings' ranks per stream, instead of three rank-4 ones.
        assert seen.shapes.count((DIM, 3 * RANK)) == 2
    assert shared_down_groups(block) == groups


def test_siblings_that_read_different_inputs_stop_sharing_and_stay_exact(tmp_path):
    torch.manual_seed(0)
    attn = Attention(query_dim=DIM, cross_attention_dim=DIM, heads=2, dim_head=16).eval()
    pairs = random_adapter(attn, tmp_path / "x.safetensors")
    ref = copy.deepcopy(attn)
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            ref.get_submodule(name).weight += b @ a
    sq.load_lora(attn, tmp_path / "x.safetensors", "x")
    assert shared_down_groups(attn) == [("to_k", "to_q", "to_v")]  # a guess by name, checked on every call
    g = gen(5)
    for _ in range(2):
        x, ctx = torch.randn(2, 6, DIM, generator=g), torch.randn(2, 4, DIM, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(attn(x, ctx), ref(x, ctx), rtol=1e-4, atol=1e-5)
        assert shared_down_groups(attn) == []  # to_q reads the image, to_k/to_v the context
    with torch.no_grad():  # self-attention through the same module: still exact without the group
        torch.testing.assert_close(attn(x), ref(x), rtol=1e-4, atol=1e-5)


def test_compiled_branch_is_one_graph_and_shares_like_eager(tmp_path):
    """Under ``torch.compile`` (fullgraph) the sharing is traced by tensor identity: the graph holds one
    stacked down GEMM per sibling group, and the outputs are bit-identical to eager. Cross-attention siblings
    (different inputs) stop sharing in the trace too and stay exact."""
    block = joint_block()
    random_adapter(block, tmp_path / "a.safetensors")
    sq.load_lora(block, tmp_path / "a.safetensors", "a")
    seen: list[tuple[int, ...]] = []

    def recording(gm, example_inputs):
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is torch._C._nn.linear:
                seen.append(tuple(n.args[1].meta["example_value"].shape))
        return gm.forward

    call = block_call(1)
    with torch.no_grad():
        eager = block(**call)
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True, backend=recording)(**call)
    for c, e in zip(compiled, eager):
        assert torch.equal(c, e)
    assert seen.count((3 * RANK, DIM)) == 2  # one stacked down projection per stream
    assert shared_down_groups(block) != []

    torch.manual_seed(0)
    attn = Attention(query_dim=DIM, cross_attention_dim=DIM, heads=2, dim_head=16).eval()
    random_adapter(attn, tmp_path / "x.safetensors")
    sq.load_lora(attn, tmp_path / "x.safetensors", "x")
    x, ctx = torch.randn(2, 6, DIM, generator=gen(5)), torch.randn(2, 4, DIM, generator=gen(6))
    with torch.no_grad():
        torch._dynamo.reset()
        compiled_cross = torch.compile(attn, fullgraph=True, backend="aot_eager")(x, ctx)
        assert shared_down_groups(attn) == []
        torch.testing.assert_close(compiled_cross, attn(x, ctx), rtol=1e-5, atol=1e-6)


def test_bf16_block_runs_the_branch_in_bf16_in_place(tmp_path):
    block = joint_block()
    pairs = random_adapter(block, tmp_path / "a.safetensors")
    ref = merged(pairs)
    call = block_call()
    with torch.no_grad():
        want = ref(**call)
    b16 = block.to(torch.bfloat16)
    sq.load_lora(b16, tmp_path / "a.safetensors", "a")
    with torch.no_grad():
        out = b16(**{k: v.bfloat16() for k, v in call.items()})
    assert all(o.dtype == torch.bfloat16 for o in out)
    assert all(rel_err(o, w) < 0.03 for o, w in zip(out, want))  # bf16 rounding only


def test_gradients_flow_through_the_branch_like_merged_weights(tmp_path):
    block = joint_block()
    pairs = random_adapter(block, tmp_path / "a.safetensors")
    ref = merged(pairs)
    sq.load_lora(block, tmp_path / "a.safetensors", "a", scale=0.5)
    ref = merged(pairs, 0.5)
    call = block_call()
    grads = []
    for model in (block, ref):
        x = call["hidden_states"].clone().requires_grad_(True)
        out = model(**{**call, "hidden_states": x})
        (out[1].square().sum() + out[0].sum()).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_shared_groups_on_a_quantized_block_follow_set_adapters(tmp_path):
    block = joint_block()
    path = tmp_path / "a.safetensors"
    pairs = random_adapter(block, path)
    calls = [block_call(seed) for seed in (11, 12, 13)]
    quantize(block, "w8a8-segquant", calls, progress=False)
    assert isinstance(block.attn.to_q, sq.SegLinear)
    call = block_call()
    with torch.no_grad():
        base = block(**call)
        sq.load_lora(block, path, "a", activate=False)
        assert shared_down_groups(block) == []  # nothing active
        sq.set_adapters(block, {"a": 1.0})
        assert len(shared_down_groups(block)) == 2
        out = block(**call)
        want = merged(pairs)(**call)
        assert all(rel_err(o, w) < 0.05 for o, w in zip(out, want))
        assert all(rel_err(b, w) > 0.1 for b, w in zip(base, want))
        sq.unload_lora(block)
        assert shared_down_groups(block) == []
        assert all(torch.equal(o, b) for o, b in zip(block(**call), base))
