"""PyTorch's own static int8 path: PT2E export, torchao's ``X86InductorQuantizer``, Inductor with freezing.

Since torch 2.13 the PT2E quantization API lives in torchao (``torchao.quantization.pt2e``). Export →
``prepare_pt2e`` → calibration calls → ``convert_pt2e`` → ``torch.compile`` with ``freezing`` turns each
quantized linear into oneDNN's ``qlinear_pointwise`` (GELU fused into the producing linear where it follows
one). It runs under bf16 autocast with bf16 inputs, like our bf16 variants.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from segquant_core.bench.peers.base import Peer, PeerModel, as_tuple, count_linears


def _drop_dtype_asserts(gm: torch.fx.GraphModule) -> None:
    """The exported graph asserts its fp32 input dtypes (``aten._assert_tensor_metadata``), which bf16
    autocast violates; the asserts guard nothing the compiled graph needs."""
    target = torch.ops.aten._assert_tensor_metadata.default
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is target:
            gm.graph.erase_node(node)
    gm.recompile()


def _int8_linears(gm: torch.fx.GraphModule) -> int:
    """Linears whose weight arrives through an int8 dequantize: the ones the quantizer converted."""
    dequant = {"dequantize_per_channel", "dequantize_per_tensor"}
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", "").startswith("linear"):
            weight = node.args[1] if len(node.args) > 1 else None
            if isinstance(weight, torch.fx.Node) and any(d in str(weight.target) for d in dequant):
                count += 1
    return count


class Pt2eInt8(Peer):
    name = "pt2e"
    label = "peer pt2e int8 (torchao x86 inductor)"
    packages = ("torchao",)

    def build(
        self, module: nn.Module, example: dict[str, torch.Tensor], calibration: list[dict[str, torch.Tensor]]
    ) -> PeerModel:
        self.require()
        logging.getLogger("torchao").setLevel(logging.ERROR)  # it warns about its CUDA-only libraries on CPU
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

        quantizer = x86.X86InductorQuantizer()
        quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
        with torch.no_grad():
            exported = torch.export.export(module.eval(), (), example, strict=False).module()
            prepared = prepare_pt2e(exported, quantizer)
            for kwargs in calibration:
                prepared(**kwargs)
            converted = convert_pt2e(prepared)
        _drop_dtype_asserts(converted)
        int8 = _int8_linears(converted)
        compiled = torch.compile(converted)

        def run(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                return as_tuple(compiled(**inputs))

        inputs = _in_bf16(example)

        def call() -> tuple[torch.Tensor, ...]:
            return run(inputs)

        # compile now, not inside the timing loop; freezing (weights as constants, prepacked for oneDNN) is read
        # while compiling, so patching the config for the first call leaves the rest of the process as it was
        with torch._inductor.config.patch(freezing=True), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Inductor's own tensor-construction warning while it freezes
            call()
        return PeerModel(call, lambda inputs: run(_in_bf16(inputs)), int8, count_linears(module))


def _in_bf16(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point inputs in bf16 (integer ones, e.g. token ids, as they are)."""
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
