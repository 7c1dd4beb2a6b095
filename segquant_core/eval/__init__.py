"""Fidelity evaluation: same-noise generation of fp and quantized variants, metrics, report, grid."""

from segquant_core.eval.metrics import latent_mse, psnr, ssim
from segquant_core.eval.report import grid_image, markdown_table, write_report
from segquant_core.eval.runner import EvalReport, VariantResult, evaluate

__all__ = [
    "EvalReport",
    "VariantResult",
    "evaluate",
    "grid_image",
    "latent_mse",
    "markdown_table",
    "psnr",
    "ssim",
    "write_report",
]
