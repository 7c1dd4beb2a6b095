"""Recipes: named, versioned quantization presets that resolve to a per-layer spec.

A recipe says how weights and activations are quantized and which SegQuant features are on. Presets:

==================  ===================================================================================
``fp``              no quantization (the reference the others are compared with)
``w8a8``            int8 per-tensor weights, int8 per-tensor static activations, nothing else (baseline)
``w8a8-smooth``     + SmoothQuant (α searched per layer)
``w8a8-segquant``   + SegLinear segments + DualScale (the SegQuant recipe)
``w4a8-segquant``   int4 per-channel weights (GPTQ), int8 per-token dynamic activations, smooth+seg+dual
``fp8-segquant``    fp8 e4m3 per-tensor weights and static activations, seg + dual (no smoothing)
==================  ===================================================================================

Every switch is one flag away: ``recipe("w8a8-segquant", dual=False)`` or, as a string,
``"w8a8-segquant:dual=off,gptq=on,lowrank=16"`` (``+`` also separates switches, handy inside
comma-separated lists: ``"w8a8-smooth:seg=on+dual=on"``). Per-layer overrides and excludes are fnmatch globs
over module names (``"transformer_blocks.*.ff.net.2"``); later overrides win.

``dual=on`` applies DualScale where the plan asks for it, per in-segment where the plan lists one flag per
segment (Flux's single-stream ``proj_out``: the GELU-MLP part only); with ``seg=off`` such a layer has no
segments, so it gets DualScale only if all of its input comes from an activation.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields, replace
from typing import Any

from segquant_core.detect.plan import LayerPlan, Segments
from segquant_core.quantizers import ActivationSpec, Granularity, WeightSpec

RECIPE_VERSION = 1
DEFAULT_ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
_SWITCHES = ("seg", "dual", "smooth", "gptq", "lowrank", "alpha", "search", "smooth_scope")
SMOOTH_SCOPES = ("segment", "layer")


@dataclass(frozen=True)
class LayerOverride:
    """Changes for the layers whose name matches ``pattern`` (fnmatch); ``exclude`` keeps them in float."""

    pattern: str
    exclude: bool = False
    changes: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerOverride:
        if "pattern" not in d:
            raise ValueError(f"override {d!r} needs a 'pattern' (an fnmatch glob over layer names)")
        rest = {k: v for k, v in d.items() if k not in ("pattern", "exclude")}
        allowed = {f.name for f in fields(Recipe)} - {"name", "overrides", "excludes", "version"}
        unknown = set(rest) - allowed
        if unknown:
            raise ValueError(
                f"override for {d['pattern']!r}: unknown keys {sorted(unknown)}; "
                f"allowed: exclude, {', '.join(sorted(allowed))}"
            )
        return cls(pattern=d["pattern"], exclude=bool(d.get("exclude", False)), changes=tuple(sorted(rest.items())))

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "exclude": self.exclude, **dict(self.changes)}


@dataclass(frozen=True)
class LayerSpec:
    """What one linear layer gets, after recipe, overrides and plan are combined."""

    weight: WeightSpec
    activation: ActivationSpec | None
    segments: Segments | None
    smooth: bool
    alpha_grid: tuple[float, ...]
    gptq: bool
    lowrank: int
    smooth_scope: str = "layer"
    # which in-segments get DualScale when only some do (None: all segments follow ``activation.dual``)
    dual_segments: tuple[bool, ...] | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    weight: str | None = "int8"  # None: no quantization at all
    weight_granularity: str = "tensor"
    activation: str | None = "int8"  # None: weight-only
    activation_granularity: str = "tensor"
    dynamic: bool = False
    smooth: bool = False
    alpha: float = 0.5
    search: bool = True  # search α over alpha_grid (else use ``alpha``)
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    # "layer": one α and one smoothing vector per layer, segments keep their own quantization scales (better
    # fidelity and one GEMM for out-segments, docs/results.md); "segment": each segment gets its own
    # smoothing vector and α (the reference implementation's behaviour).
    smooth_scope: str = "layer"
    seg: bool = False
    dual: bool = False
    gptq: bool = False
    lowrank: int = 0
    excludes: tuple[str, ...] = ()
    overrides: tuple[LayerOverride, ...] = field(default=())
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION:
            raise ValueError(f"recipe {self.name!r} has version {self.version}; this engine reads {RECIPE_VERSION}")
        if self.lowrank < 0:
            raise ValueError("lowrank must be ≥ 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        if self.smooth_scope not in SMOOTH_SCOPES:
            raise ValueError(f"smooth_scope must be one of {', '.join(SMOOTH_SCOPES)}, got {self.smooth_scope!r}")
        if not self.alpha_grid or any(not 0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ValueError(f"alpha_grid values must lie in [0, 1], got {list(self.alpha_grid)}")
        if self.weight is not None:  # validate the specs eagerly for a readable error
            self._weight_spec()
            self._activation_spec(dual=False)

    # ---------------------------------------------------------------- specs
    @property
    def quantizes(self) -> bool:
        return self.weight is not None

    def _weight_spec(self) -> WeightSpec:
        assert self.weight is not None
        return WeightSpec(self.weight, Granularity(self.weight_granularity))

    def _activation_spec(self, dual: bool) -> ActivationSpec | None:
        if self.activation is None:
            return None
        return ActivationSpec(self.activation, Granularity(self.activation_granularity), self.dynamic, dual)

    def with_switches(self, **changes: Any) -> Recipe:
        """A copy with fields changed (``seg=False``, ``gptq=True``, ``lowrank=16`` …)."""
        return replace(self, **changes)

    def resolve(self, layer: str, plan: LayerPlan | None) -> LayerSpec | None:
        """The spec for ``layer`` (``None`` if it stays in floating point)."""
        r = self
        if any(fnmatch.fnmatchcase(layer, pat) for pat in self.excludes):
            return None
        for ov in self.overrides:
            if fnmatch.fnmatchcase(layer, ov.pattern):
                if ov.exclude:
                    return None
                r = replace(r, **dict(ov.changes))
        if r.weight is None:
            return None
        segments = plan.segments if (r.seg and plan is not None) else None
        mask = plan.dual_mask if (r.dual and plan is not None) else (False,)
        # Per-segment DualScale needs the segments: unsegmented, a layer is dual only if all of its input is.
        dual_segments = mask if (segments is not None and len(set(mask)) > 1) else None
        dual = any(mask) if dual_segments is not None else all(mask)
        grid = tuple(r.alpha_grid) if r.search else (float(r.alpha),)
        return LayerSpec(
            r._weight_spec(),
            r._activation_spec(dual),
            segments,
            r.smooth,
            grid,
            r.gptq,
            r.lowrank,
            r.smooth_scope,
            dual_segments,
        )

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["alpha_grid"] = list(self.alpha_grid)
        d["excludes"] = list(self.excludes)
        d["overrides"] = [o.to_dict() for o in self.overrides]
        return {"_type": "segquant.Recipe", "_version": RECIPE_VERSION, "_data": d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        if data.get("_type") != "segquant.Recipe":
            raise ValueError("not a serialised segquant recipe (missing _type 'segquant.Recipe')")
        d = dict(data["_data"])
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"recipe: unknown fields {sorted(unknown)}")
        d["alpha_grid"] = tuple(d.get("alpha_grid", DEFAULT_ALPHA_GRID))
        d["excludes"] = tuple(d.get("excludes", ()))
        d["overrides"] = tuple(LayerOverride.from_dict(o) for o in d.get("overrides", ()))
        return cls(**d)


_PRESETS: dict[str, Recipe] = {
    "fp": Recipe("fp", weight=None, activation=None),
    "w8a8": Recipe("w8a8"),
    "w8a8-smooth": Recipe("w8a8-smooth", smooth=True),
    "w8a8-segquant": Recipe("w8a8-segquant", smooth=True, seg=True, dual=True),
    "w4a8-segquant": Recipe(
        "w4a8-segquant",
        weight="int4",
        weight_granularity="channel",
        activation_granularity="token",
        dynamic=True,
        smooth=True,
        seg=True,
        dual=True,
        gptq=True,
    ),
    "fp8-segquant": Recipe("fp8-segquant", weight="fp8_e4m3", activation="fp8_e4m3", seg=True, dual=True),
}


def recipe_names() -> list[str]:
    return list(_PRESETS)


def _parse_switch(key: str, value: str) -> tuple[str, Any]:
    if key not in _SWITCHES:
        raise ValueError(f"unknown recipe switch {key!r}; expected one of: {', '.join(_SWITCHES)}")
    v = value.strip().lower()
    if key == "lowrank":
        if not v.isdigit():
            raise ValueError(f"lowrank expects a rank (integer ≥ 0), got {value!r}")
        return key, int(v)
    if key == "smooth_scope":
        if v not in SMOOTH_SCOPES:
            raise ValueError(f"smooth_scope expects one of {', '.join(SMOOTH_SCOPES)}, got {value!r}")
        return key, v
    if key == "alpha":
        try:
            return key, float(v)
        except ValueError:
            raise ValueError(f"alpha expects a number in [0, 1], got {value!r}") from None
    if v in ("on", "true", "1", "yes"):
        return key, True
    if v in ("off", "false", "0", "no"):
        return key, False
    raise ValueError(f"switch {key!r} expects on/off, got {value!r}")


def recipe(spec: str | Recipe, **switches: Any) -> Recipe:
    """A preset by name, optionally with switches: ``recipe("w8a8-segquant:dual=off", gptq=True)``."""
    if isinstance(spec, Recipe):
        base = spec
    else:
        name, _, rest = spec.partition(":")
        if name not in _PRESETS:
            raise ValueError(f"unknown recipe {name!r}; expected one of: {', '.join(_PRESETS)}")
        base = _PRESETS[name]
        parsed: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in rest.replace("+", ",").split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"recipe switch {item!r} must look like key=value (e.g. dual=off)")
            k, v = _parse_switch(key.strip(), value)
            parsed[k] = v
        if parsed:
            base = replace(base, name=spec, **parsed)
    if switches:
        unknown = set(switches) - {f.name for f in fields(Recipe)}
        if unknown:
            raise ValueError(f"unknown recipe fields {sorted(unknown)}")
        base = replace(base, **switches)
    return base
