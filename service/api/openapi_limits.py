"""The published OpenAPI schema carries this server's limits, so it says what the routes accept.

The request models are static; the limits (prompt length, images, steps, guidance, deadline, adapters per
request and their scale) and the registry's model, variant and adapter names come from the settings. They are
written into the schema once, when it is first built, so clients and fuzzers (schemathesis) see the same
bounds the job service enforces.
"""

from __future__ import annotations

from typing import Any

from service.registry import Registry
from service.settings import Settings

REQUEST_MODELS = ("GenerateRequest", "OpenAIImageRequest")
MAX_SIZE_ALTERNATIVES = 512  # above this, `size` keeps the plain WIDTHxHEIGHT pattern


def _constrain(prop: dict[str, Any] | None, **rules: Any) -> None:
    """Add ``rules`` to a property (to its non-null branches when it is optional)."""
    if prop is None:
        return
    branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"] or [prop]
    for branch in branches:
        branch.update(rules)


def apply_limits(schema: dict[str, Any], settings: Settings, registry: Registry) -> dict[str, Any]:
    """Write the settings' limits and the registry's names into the request bodies of ``schema``."""
    limits = settings.limits
    models = list(registry.models)
    variants = sorted({k.variant for k in registry.variant_keys()})
    rules = [registry.model(m).size_rule for m in models]
    components = schema.get("components", {}).get("schemas", {})
    for name in REQUEST_MODELS:
        props = components.get(name, {}).get("properties", {})
        _constrain(props.get("prompt"), maxLength=limits.max_prompt_chars)
        _constrain(props.get("negative_prompt"), maxLength=limits.max_prompt_chars)
        _constrain(props.get("n"), maximum=limits.max_images)
        _constrain(props.get("num_inference_steps"), maximum=limits.max_inference_steps)
        _constrain(props.get("guidance_scale"), maximum=limits.max_guidance_scale)
        _constrain(props.get("deadline_s"), maximum=limits.max_deadline_s)
        _constrain(props.get("model"), enum=models)
        _constrain(props.get("variant"), enum=variants)
        if rules:
            for side in ("width", "height"):
                _constrain(props.get(side), minimum=min(r.min for r in rules), maximum=max(r.max for r in rules))
                steps = {r.multiple_of for r in rules}
                if len(steps) == 1:
                    _constrain(props.get(side), multipleOf=steps.pop())
    adapters = sorted({a.name for m in models for a in registry.model(m).adapters})
    for name in REQUEST_MODELS:  # no adapter anywhere: any name is a 404, so the schema allows none
        props = components.get(name, {}).get("properties", {})
        _constrain(props.get("loras"), maxItems=limits.max_loras_per_request if adapters else 0)
    lora = components.get("LoraRequest", {}).get("properties", {})
    if adapters:
        _constrain(lora.get("name"), enum=adapters)
    _constrain(lora.get("scale"), minimum=-limits.max_lora_scale, maximum=limits.max_lora_scale)
    size = components.get("OpenAIImageRequest", {}).get("properties", {}).get("size")
    sides = sorted({v for r in rules for v in range(r.min + (-r.min) % r.multiple_of, r.max + 1, r.multiple_of)})
    if size is not None and 0 < len(sides) <= MAX_SIZE_ALTERNATIVES:
        side = "|".join(map(str, sides))
        size["pattern"] = rf"^(auto|\s*({side})\s*[xX×]\s*({side})\s*)$"
    return schema
