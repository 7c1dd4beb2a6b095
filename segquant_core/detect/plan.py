"""The quantization plan: one inspectable, editable JSON record per ``nn.Linear``.

The plan is the seam between detection (which reads a model's dataflow) and quantization (which acts
on it). A record says whether a layer's weight is cut into segments, along which axis, and whether its
input gets DualScale (separate positive/negative activation scales)::

    {"layer": "transformer_blocks.0.norm1.linear",
     "segments": {"axis": "out", "sizes": [64, 64, 64, 64, 64, 64]},
     "dual_scale": true}

``axis="out"`` cuts output features (the layer's output is chunked/split); ``axis="in"`` cuts input
features (the layer's input is a concatenation or a per-head reshape). Sizes may be ragged but must sum
to the layer's feature count on that axis.

``dual_scale`` is ``true`` / ``false`` for the whole input, or, for in-segments whose parts differ (Flux's
single-stream ``proj_out``: attention | GELU-MLP), one flag per in-segment::

    {"layer": "single_transformer_blocks.0.proj_out",
     "segments": {"axis": "in", "sizes": [3072, 12288]},
     "dual_scale": [false, true]}

A list whose flags are all equal is written (and read) as that one bool, so plans without mixed inputs look
as they always did, and a bool in an older plan means "every segment".
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Axis = Literal["out", "in"]


@dataclass(frozen=True)
class Segments:
    """How a linear layer's weight is cut: along ``axis`` into contiguous blocks of ``sizes``."""

    axis: Axis
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.axis not in ("out", "in"):
            raise ValueError(f"segments.axis must be 'out' or 'in', got {self.axis!r}")
        if len(self.sizes) < 1 or any(int(s) <= 0 for s in self.sizes):
            raise ValueError(f"segments.sizes must be positive integers, got {list(self.sizes)}")
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))

    @property
    def count(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def bounds(self) -> list[tuple[int, int]]:
        """``[(start, stop), ...]`` of each segment along its axis."""
        out, start = [], 0
        for size in self.sizes:
            out.append((start, start + size))
            start += size
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"axis": self.axis, "sizes": list(self.sizes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Segments:
        unknown = set(data) - {"axis", "sizes"}
        if unknown:
            raise ValueError(f"segments: unknown keys {sorted(unknown)} (expected 'axis' and 'sizes')")
        if "axis" not in data or "sizes" not in data:
            raise ValueError("segments: needs both 'axis' and 'sizes'")
        return cls(axis=data["axis"], sizes=tuple(data["sizes"]))


#: DualScale of a layer: one flag for the whole input, or one per in-segment.
DualScale = bool | tuple[bool, ...]


@dataclass(frozen=True)
class LayerPlan:
    """What SegQuant does to one linear layer."""

    layer: str
    segments: Segments | None = None
    dual_scale: DualScale = False
    # Why detection chose this (e.g. "output chunked into 6 on dim -1"); informational, not required.
    reasons: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.dual_scale, bool):
            return
        flags = tuple(self.dual_scale)
        if not flags or not all(isinstance(f, bool) for f in flags):
            raise ValueError(f"plan record for {self.layer!r}: dual_scale must be true/false or a list of them")
        if len(set(flags)) == 1:  # the same for every segment: that is the plain flag
            object.__setattr__(self, "dual_scale", flags[0])
            return
        if self.segments is None or self.segments.axis != "in" or len(flags) != self.segments.count:
            raise ValueError(
                f"plan record for {self.layer!r}: a mixed dual_scale list needs in-segments and one flag per "
                f"segment (segments {self.segments.to_dict() if self.segments else None}, {len(flags)} flags)"
            )
        object.__setattr__(self, "dual_scale", flags)

    @property
    def any_dual(self) -> bool:
        """Whether DualScale applies to any part of the input."""
        return any(self.dual_mask)

    @property
    def dual_mask(self) -> tuple[bool, ...]:
        """One DualScale flag per segment (one flag when the layer is not segmented)."""
        if isinstance(self.dual_scale, tuple):
            return self.dual_scale
        return (self.dual_scale,) * (self.segments.count if self.segments else 1)

    def to_dict(self, with_reasons: bool = False) -> dict[str, Any]:
        dual = self.dual_scale
        data: dict[str, Any] = {
            "layer": self.layer,
            "segments": self.segments.to_dict() if self.segments else None,
            "dual_scale": list(dual) if isinstance(dual, tuple) else dual,
        }
        if with_reasons and self.reasons:
            data["reasons"] = list(self.reasons)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerPlan:
        if "layer" not in data or not isinstance(data["layer"], str):
            raise ValueError(f"plan record needs a string 'layer', got {dict(data)!r}")
        unknown = set(data) - {"layer", "segments", "dual_scale", "reasons"}
        if unknown:
            raise ValueError(f"plan record for {data['layer']!r}: unknown keys {sorted(unknown)}")
        seg = data.get("segments")
        dual = data.get("dual_scale", False)
        if isinstance(dual, list):
            dual = tuple(dual)
        elif not isinstance(dual, bool):
            raise ValueError(f"plan record for {data['layer']!r}: dual_scale must be true/false or a list of them")
        return cls(
            layer=data["layer"],
            segments=Segments.from_dict(seg) if seg is not None else None,
            dual_scale=dual,
            reasons=tuple(data.get("reasons", ())),
        )


class Plan:
    """An ordered collection of :class:`LayerPlan` records, keyed by layer name."""

    def __init__(self, records: Iterable[LayerPlan] = ()) -> None:
        self._records: dict[str, LayerPlan] = {}
        for rec in records:
            if rec.layer in self._records:
                raise ValueError(f"plan lists layer {rec.layer!r} twice")
            self._records[rec.layer] = rec

    def __iter__(self) -> Iterator[LayerPlan]:
        return iter(self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, layer: object) -> bool:
        return layer in self._records

    def __getitem__(self, layer: str) -> LayerPlan:
        return self._records[layer]

    def get(self, layer: str) -> LayerPlan | None:
        return self._records.get(layer)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and list(self) == list(other)

    def __repr__(self) -> str:
        seg = sum(1 for r in self if r.segments)
        dual = sum(1 for r in self if r.dual_scale is True)
        partial = sum(1 for r in self if isinstance(r.dual_scale, tuple))
        per_segment = f", {partial} dual-scale on some segments" if partial else ""
        return f"Plan({len(self)} linears, {seg} segmented, {dual} dual-scale{per_segment})"

    @property
    def layers(self) -> list[str]:
        return list(self._records)

    def to_list(self, with_reasons: bool = False) -> list[dict[str, Any]]:
        return [r.to_dict(with_reasons) for r in self]

    @classmethod
    def from_list(cls, data: Iterable[Mapping[str, Any]]) -> Plan:
        return cls(LayerPlan.from_dict(d) for d in data)

    def to_json(self, indent: int | None = 2, with_reasons: bool = False) -> str:
        return json.dumps(self.to_list(with_reasons), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError("a plan is a JSON list of layer records")
        return cls.from_list(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(with_reasons=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_json(Path(path).read_text())
