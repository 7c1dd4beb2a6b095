"""The API side never imports torch: the registry (tiny and shipped-preset sources included), the app and the
job service load in a fresh interpreter without it, and the torch-free size facts match the real presets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service.preset_sizes import PRESET_SIZE_CONFIGS
from tests.service.helpers import ROOT

PROBE = """
import json, sys
from service.registry import Registry
import service.api.app, service.api.job_service
registry = Registry.from_data([
    {"name": "m", "source": "tiny:mmdit", "variants": ["fp"]},
    {"name": "u", "source": "tiny:unet", "variants": ["fp"]},
    {"name": "s", "source": "shipped:no-such-weights-folder", "variants": ["fp"]},
])
rules = {name: registry.model(name).size_rule.model_dump() for name in ("m", "u", "s")}
print(json.dumps({"torch": "torch" in sys.modules, "diffusers": "diffusers" in sys.modules, "rules": rules}))
"""


def test_the_api_side_loads_without_torch() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["torch"] is False and found["diffusers"] is False
    assert found["rules"]["m"] == {"multiple_of": 2, "min": 2, "max": 32, "default": 32}
    assert found["rules"]["u"]["multiple_of"] == 8 and found["rules"]["u"]["default"] == 32


# every denoiser key derive_size_rule reads: equal values here mean equal size rules
SIZE_KEYS = ("sample_size", "patch_size", "pos_embed_max_size", "guidance_embeds", "axes_dims_rope")


@pytest.mark.parametrize("name", sorted(PRESET_SIZE_CONFIGS))
def test_size_facts_match_the_presets(name: str) -> None:
    from segquant_shapes.models import PRESETS  # torch: fine in a test, never in the API

    facts, preset = PRESET_SIZE_CONFIGS[name], PRESETS[name]
    assert {k: facts.get(k) for k in SIZE_KEYS} == {k: preset.get(k) for k in SIZE_KEYS}
