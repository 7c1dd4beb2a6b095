"""OpenVINO with NNCF post-training INT8 on the linears only (the scope of our ``w8a8``).

The float module is converted with ``openvino.convert_model``; ``nncf.quantize`` with the transformer model
type places quantizers on the MatMuls only (attention stays in OpenVINO's fused SDPA); its SmoothQuant is
turned off because our ``w8a8`` has none. OpenVINO runs what is not int8 in its default inference precision,
bf16 on CPUs with AVX512-BF16. Inputs are fp32 arrays prepared once (OpenVINO takes no torch bf16); it runs
in this process with as many threads as torch.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from segquant_core.bench.peers.base import Peer, PeerModel, count_linears


def _int8_fully_connected(compiled: object) -> int:
    """FullyConnected layers of the runtime graph that run in int8 (u8/i8 runtime precision)."""
    count = 0
    for op in compiled.get_runtime_model().get_ordered_ops():  # type: ignore[attr-defined]
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "FullyConnected" and info["runtimePrecision"].astype(str) in ("u8", "i8"):
            count += 1
    return count


class OpenVinoInt8(Peer):
    name = "openvino"
    label = "peer openvino int8 (NNCF, linears)"
    packages = ("openvino", "nncf")

    def build(
        self, module: nn.Module, example: dict[str, torch.Tensor], calibration: list[dict[str, torch.Tensor]]
    ) -> PeerModel:
        self.require()
        import nncf
        import openvino as ov

        nncf.set_log_level(logging.ERROR)
        with torch.no_grad():
            model = ov.convert_model(module.eval(), example_input=example)
        names = [n for n in inspect.signature(module.forward).parameters if n in example]
        if len(names) != len(model.inputs):
            raise RuntimeError(f"OpenVINO made {len(model.inputs)} inputs of {len(names)} tensors ({', '.join(names)})")
        for port, name in zip(model.inputs, names, strict=True):  # traced through *args, a port may lack its name
            port.get_tensor().set_names({name})
        dataset = nncf.Dataset([{n: c[n].numpy() for n in names} for c in calibration])
        quantized = nncf.quantize(
            model,
            dataset,
            subset_size=len(calibration),
            model_type=nncf.ModelType.TRANSFORMER,
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1)
            ),
        )
        compiled = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads()})
        request = compiled.create_infer_request()
        outputs = len(compiled.outputs)

        def infer(arrays: dict[str, object]) -> tuple[torch.Tensor, ...]:
            request.infer(arrays, share_inputs=True, share_outputs=True)
            return tuple(torch.from_numpy(request.get_output_tensor(i).data) for i in range(outputs))

        def as_arrays(values: dict[str, torch.Tensor]) -> dict[str, object]:
            return {n: (values[n].float() if values[n].is_floating_point() else values[n]).numpy() for n in names}

        inputs = as_arrays(example)  # converted once: the timing loop measures OpenVINO, not the conversion

        def call() -> tuple[torch.Tensor, ...]:
            return infer(inputs)

        call()
        # run() copies its outputs: with shared outputs, the next inference would overwrite what it returned
        return PeerModel(
            call,
            lambda values: tuple(t.clone() for t in infer(as_arrays(values))),
            _int8_fully_connected(compiled),
            count_linears(module),
        )
