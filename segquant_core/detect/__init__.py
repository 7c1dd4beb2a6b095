"""SegQuant pattern detection on unmodified models: which linears get SegLinear segments and which get DualScale.

``detect(model, example_kwargs)`` captures one forward (``torch.export`` non-strict, falling back to a
dispatch-level recording; see :mod:`.capture`), applies the rules of :mod:`.rules` to the aten dataflow around
every ``nn.Linear`` call and returns a :class:`Plan` with one record per linear.

What is not detected (documented limits):

* linears called functionally (``F.linear(x, self.w)``) or modules that are not ``nn.Linear`` subclasses;
* patterns hidden behind ops outside the transparent sets of :mod:`.rules`: arithmetic between a cat/head merge
  and the linear, more than one arithmetic op between a linear and its chunk, ``expand``/``repeat`` on the output
  side, a slice of the output along its feature dim, hand-written activations (``x * torch.sigmoid(x)``);
* nested structure is not refined: Flux's single-block ``proj_out`` gets ``[attn, mlp]`` although the attention
  part is itself a per-head merge (noted in ``reasons``);
* the example forward decides what is seen: value-dependent branches follow the example's branch (and make export
  fall back to the dispatch recorder); shapes are those of the example (e.g. SDXL's 6 time ids);
* ops on raw inputs *are* seen by both capture methods (export keeps inputs symbolic; the dispatch recorder sees
  every aten op), so the timestep sin|cos ``cat`` feeding ``linear_1`` is detected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from segquant_core.detect.capture import CaptureError, CaptureMethod, Graph, capture
from segquant_core.detect.examples import example_inputs_for
from segquant_core.detect.plan import LayerPlan, Plan, Segments
from segquant_core.detect.rules import plan_from_graph

logger = logging.getLogger(__name__)

__all__ = [
    "CaptureError",
    "Graph",
    "LayerPlan",
    "Plan",
    "Segments",
    "capture",
    "detect",
    "example_inputs_for",
]


def detect(
    model: nn.Module,
    example_kwargs: dict[str, Any] | None = None,
    *,
    example_args: tuple[Any, ...] = (),
    include: Callable[[str], bool] | None = None,
    capture_method: CaptureMethod = "auto",
) -> Plan:
    """Detect SegQuant patterns in ``model`` from one forward with ``example_args``/``example_kwargs``.

    Returns one :class:`LayerPlan` per ``nn.Linear`` (``named_modules`` order) for which ``include(name)`` is true
    (all by default), with ``segments``/``dual_scale`` set where a pattern fires and ``reasons`` saying why.
    Without example inputs, :func:`example_inputs_for` builds them (supported diffusers denoisers only).
    ``capture_method`` is ``"auto"`` (export, then dispatch fallback), ``"export"`` or ``"dispatch"``.
    The model is not modified: it runs in eval mode, its training flags are restored, no hooks remain.
    """
    if example_kwargs is None and not example_args:
        example_kwargs = example_inputs_for(model)
    graph = capture(model, tuple(example_args), example_kwargs or {}, method=capture_method)
    plan = Plan(plan_from_graph(model, graph, include))
    logger.info("detect(%s) via %s: %r", type(model).__name__, graph.method, plan)
    return plan
