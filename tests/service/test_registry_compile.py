"""The registry's per-variant ``compile`` switch and the CPU precision rule (issue 15, deliverables 2 and 4)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from service.registry import Registry
from service.worker.engine import cpu_has_fast_bf16, resolve_precision


def test_variants_take_a_compile_switch_that_defaults_to_auto() -> None:
    registry = Registry.from_data(
        [{"name": "m", "source": "tiny:mmdit", "variants": ["fp", {"name": "q", "recipe": "w8a8", "compile": "on"}]}]
    )
    model = registry.model("m")
    assert model.variant("fp").compile == "auto" and model.variant("q").compile == "on"


def test_a_bad_compile_value_names_the_field() -> None:
    with pytest.raises(ValidationError, match=r"compile[\s\S]*'auto', 'on' or 'off'"):
        Registry.from_data(
            [{"name": "m", "source": "tiny:mmdit", "variants": [{"name": "q", "recipe": "w8a8", "compile": "fast"}]}]
        )


def test_cpu_precision_is_bf16_exactly_where_bf16_is_native() -> None:
    expected = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("float32", "cpu") == torch.float32  # an explicit setting always wins
