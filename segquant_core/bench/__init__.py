"""Benchmarks that measure float and quantized candidates side by side (alternating runs, medians)."""
