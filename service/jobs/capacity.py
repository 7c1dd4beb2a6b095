"""How the queue's capacity is shared: every variant gets its own share, so one backlog cannot starve the rest.

A variant may hold ``queue.max_depth_per_variant`` queued jobs, or by default ``queue.max_depth`` divided
evenly (rounded down, at least 1) over the registry's variants; the total stays bounded by ``max_depth``.
"""

from __future__ import annotations


def variant_capacity(max_depth: int, max_depth_per_variant: int | None, variant_count: int) -> int:
    """Queued jobs one variant may hold."""
    if max_depth_per_variant is not None:
        return max_depth_per_variant
    return max(1, max_depth // max(1, variant_count))
