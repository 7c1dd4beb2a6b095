"""Export of quantized denoisers to other runtimes: ONNX QDQ graphs for ONNX Runtime and TensorRT.

``export_onnx(model, example_kwargs, "model.onnx")`` writes the graph; ``check_onnx`` runs it with ONNX
Runtime next to our own backends (relative error and latency). Needs the ``onnx`` extra
(``onnx``, ``onnxruntime``, ``onnxscript``); nothing here imports them until called.
"""

from __future__ import annotations

from typing import Any

__all__ = ["QDQExportError", "check_onnx", "export_onnx"]


def __getattr__(name: str) -> Any:
    if name in ("export_onnx", "ExportResult", "flatten_inputs"):
        from segquant_core.export import exporter

        return getattr(exporter, name)
    if name in ("QDQExportError", "LayerQDQ"):
        from segquant_core.export import onnx_qdq

        return getattr(onnx_qdq, name)
    if name in ("check_onnx", "CheckReport"):
        from segquant_core.export import check

        return getattr(check, name)
    raise AttributeError(name)
