"""Dynamic batching: group compatible jobs (same model, variant, size, steps, guidance, adapter set and
scales: ``GenerationParams.batch_key``) into pipeline calls.

Each image keeps its own ``torch.Generator`` seeded from its job, so a seed gives the same image whether
its job ran alone or inside a batch (the shapes pipelines draw each sample's noise from its own generator;
quantized variants use static or per-token activation scales, which do not mix samples).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")


def group_compatible(
    items: list[T], key: Callable[[T], Hashable], size: Callable[[T], int], max_images: int
) -> list[list[T]]:
    """Split ``items`` into batches of equal ``key`` holding at most ``max_images`` images each.

    Order is kept: batches come in the order of their first job, and jobs keep their order inside a batch.
    A job larger than ``max_images`` runs alone.
    """
    open_batches: dict[Hashable, list[T]] = {}
    counts: dict[Hashable, int] = {}
    batches: list[list[T]] = []
    for item in items:
        k, n = key(item), size(item)
        current = open_batches.get(k)
        if current is None or counts[k] + n > max_images:
            current = []
            batches.append(current)
            open_batches[k], counts[k] = current, 0
        current.append(item)
        counts[k] += n
    return batches
