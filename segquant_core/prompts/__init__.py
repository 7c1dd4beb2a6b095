"""Default prompt sets for general text-to-image models, and the one rule for choosing calibration prompts.

Why: a model that brings no prompts of its own (a stock SD3, Flux or SDXL folder) must calibrate on varied
natural prompts — subjects, people, scenes, styles, compositions, text in images — never on the Shapes
models' prompts, and the CLI and the service must make the same choice. The two sets are written for this
project and are disjoint (evaluating on calibration prompts would flatter a recipe).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

logger = logging.getLogger(__name__)


def _read(name: str) -> list[str]:
    text = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def general_calibration_prompts() -> list[str]:
    """The 256 default calibration prompts for general text-to-image models."""
    return _read("general_calibration.txt")


def general_eval_prompts() -> list[str]:
    """The 64 default evaluation prompts (disjoint from the calibration set)."""
    return _read("general_eval.txt")


def fit_count(prompts: Sequence[str], count: int) -> list[str]:
    """``count`` prompts: the first ``count``, or the list cycled when it is shorter."""
    if not prompts:
        raise ValueError("no prompts to choose from")
    return [prompts[i % len(prompts)] for i in range(count)]


def _own(pipe: Any, attr: str, *args: Any) -> list[str] | None:
    fn = getattr(pipe, attr, None)
    return list(fn(*args)) if callable(fn) else None


def choose_prompts(
    pipe: Any,
    count: int,
    *,
    given: Sequence[str] | None = None,
    purpose: str = "calibration",
    log: Callable[[str], None] | None = None,
) -> list[str]:
    """``count`` prompts for ``purpose`` ("calibration" or "evaluation"), and one line saying where they came from.

    Order: ``given`` (a file the user named), the pipeline's own ``default_calibration_prompts()`` /
    ``default_eval_prompts(n)``, else the general default set. Repeating a list to reach ``count`` is said too.
    """
    say = log or logger.info
    if given:
        prompts, origin = list(given), "the given prompts file"
    elif purpose == "calibration" and (own := _own(pipe, "default_calibration_prompts")):
        prompts, origin = own, f"{type(pipe).__name__}'s own calibration prompts"
    elif purpose != "calibration" and (own := _own(pipe, "default_eval_prompts", count)):
        prompts, origin = own, f"{type(pipe).__name__}'s own evaluation prompts"
    else:
        prompts = general_calibration_prompts() if purpose == "calibration" else general_eval_prompts()
        origin = f"the default general-purpose {purpose} set"
    repeated = f", cycled {count / len(prompts):.1f}× to reach {count}" if count > len(prompts) else ""
    say(f"{purpose} prompts: {min(count, len(prompts))} distinct from {origin}{repeated}")
    return fit_count(prompts, count)


__all__ = ["choose_prompts", "fit_count", "general_calibration_prompts", "general_eval_prompts"]
