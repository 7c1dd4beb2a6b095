"""SegLinear: a linear layer whose weight is cut into segments, each with its own quantizers.

*Out-segmentation* (``axis="out"``) cuts the output features: every segment sees the whole input and the
segment outputs are concatenated. It is used where the layer's output is later ``chunk``ed or ``split``
(AdaLN modulation, GEGLU projections), so each chunk gets a scale sized to its own range.

*In-segmentation* (``axis="in"``) cuts the input features: segment ``k`` sees input columns
``[a_k, b_k)`` and the partial outputs are summed. It is used where the input is a concatenation or a
per-head reshape, so each part/head gets its own activation (and weight) scale.

Per segment there is a weight block (codes + scales), an optional SmoothQuant vector ``s`` (the segment's
input is divided by ``s`` and the weight was multiplied by it), a static activation scale (one, or two
for DualScale) and an optional low-rank pair ``(down, up)`` that runs in floating point on the *unquantized*
smoothed input: ``y_k = Q(x_k / s) · Q(W_k s)ᵀ + (x_k / s) · down · up``. Ragged segment sizes are fine.

The arithmetic lives in a backend (:mod:`segquant_core.backends`); this module only holds the data and
never writes into its caller's input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from segquant_core.detect.plan import Segments
from segquant_core.formats import QuantFormat
from segquant_core.quantizers import ActivationSpec, QuantizedWeight, WeightSpec

if TYPE_CHECKING:
    from segquant_core.backends.base import Backend


def tensor_bytes_once(t: torch.Tensor, seen: set[int]) -> int:
    """``t``'s storage bytes, or 0 if it is on the meta device or its storage was counted already."""
    if t.is_meta or t.device.type == "meta":
        return 0
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # opaque tensors (e.g. oneDNN prepacked weights)
        return t.numel() * t.element_size()
    key = storage.data_ptr()
    if key in seen:
        return 0
    seen.add(key)
    return storage.nbytes()


@dataclass(frozen=True)
class SegLinearConfig:
    """Everything needed to rebuild an empty :class:`SegLinear` (the artifact stores it as JSON).

    ``dual_segments`` says which in-segments get DualScale when only some do (Flux's single-stream
    ``proj_out``: attention | GELU-MLP); ``None`` means every segment follows ``activation.dual``, which is
    also how configs written before per-segment DualScale read.
    """

    in_features: int
    out_features: int
    segments: Segments
    weight: WeightSpec | None
    activation: ActivationSpec | None
    bias: bool
    smooth: bool = False
    lowrank_rank: int = 0
    dual_segments: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        if self.dual_segments is None:
            return
        mask = tuple(bool(f) for f in self.dual_segments)
        act = self.activation
        if act is None or not act.dual:
            raise ValueError("dual_segments needs a DualScale activation spec (activation.dual = true)")
        if len(mask) != self.segments.count:
            raise ValueError(f"dual_segments has {len(mask)} flags for {self.segments.count} segments")
        if all(mask):
            object.__setattr__(self, "dual_segments", None)
            return
        if not any(mask):
            object.__setattr__(self, "activation", replace(act, dual=False))
            object.__setattr__(self, "dual_segments", None)
            return
        if self.segments.axis != "in":
            raise ValueError("out-segments all read the same input: their DualScale is one flag for the layer")
        object.__setattr__(self, "dual_segments", mask)

    def segment_activation(self, index: int) -> ActivationSpec | None:
        """Segment ``index``'s activation quantizer (DualScale or not, per ``dual_segments``)."""
        act = self.activation
        if act is None or self.dual_segments is None or self.dual_segments[index]:
            return act
        return replace(act, dual=False)

    def segment_activations(self) -> list[ActivationSpec | None]:
        return [self.segment_activation(i) for i in range(self.segments.count)]

    def segment_shapes(self) -> list[tuple[int, int]]:
        """``[(n_k, k_k)]``: the weight block shape of every segment."""
        if self.segments.axis == "out":
            return [(n, self.in_features) for n in self.segments.sizes]
        return [(self.out_features, k) for k in self.segments.sizes]

    def to_dict(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "segments": self.segments.to_dict(),
            "weight": self.weight.to_dict() if self.weight else None,
            "activation": self.activation.to_dict() if self.activation else None,
            "bias": self.bias,
            "smooth": self.smooth,
            "lowrank_rank": self.lowrank_rank,
        } | ({"dual_segments": list(self.dual_segments)} if self.dual_segments is not None else {})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegLinearConfig:
        return cls(
            in_features=int(d["in_features"]),
            out_features=int(d["out_features"]),
            segments=Segments.from_dict(d["segments"]),
            weight=WeightSpec(**d["weight"]) if d.get("weight") else None,
            activation=ActivationSpec(**d["activation"]) if d.get("activation") else None,
            bias=bool(d["bias"]),
            smooth=bool(d.get("smooth", False)),
            lowrank_rank=int(d.get("lowrank_rank", 0)),
            dual_segments=tuple(d["dual_segments"]) if d.get("dual_segments") is not None else None,
        )


class QuantSegment(nn.Module):
    """Buffers of one segment. Absent pieces are ``None`` buffers (skipped by ``state_dict``)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor | None
    smooth: torch.Tensor | None
    act_scale: torch.Tensor | None
    lowrank_down: torch.Tensor | None
    lowrank_up: torch.Tensor | None

    def __init__(self, n: int, k: int, cfg: SegLinearConfig, act: ActivationSpec | None) -> None:
        """``act`` is this segment's activation quantizer (:meth:`SegLinearConfig.segment_activation`)."""
        super().__init__()
        ws = cfg.weight
        if ws is None:
            weight = torch.zeros(n, k)
        elif ws.fmt is QuantFormat.INT4:
            if k % 2:
                raise ValueError(f"int4 weights need an even input size per segment, got {k}")
            weight = torch.zeros(n, k // 2, dtype=torch.uint8)
        else:
            weight = torch.zeros(n, k, dtype=ws.fmt.code_dtype)
        self.register_buffer("weight", weight)
        n_scales = (n if ws.granularity.value == "channel" else 1) if ws else 0
        self.register_buffer("weight_scale", torch.ones(n_scales) if ws else None)
        self.register_buffer("smooth", torch.ones(k) if cfg.smooth else None)
        static = act is not None and not act.dynamic
        self.register_buffer("act_scale", torch.ones(act.parts) if static else None)
        r = cfg.lowrank_rank
        self.register_buffer("lowrank_down", torch.zeros(k, r) if r else None)
        self.register_buffer("lowrank_up", torch.zeros(r, n) if r else None)
        self.fmt = ws.fmt if ws else None
        self.activation = act  # this segment's activation quantizer (None: float input)
        self.recover: Callable[[], torch.Tensor] | None = None  # set while a kernel holds the codes

    def quantized_weight(self) -> QuantizedWeight:
        if self.fmt is None or self.weight_scale is None:
            raise ValueError("this segment's weight is not quantized")
        data = self.weight
        if data.is_meta:
            if self.recover is None:
                raise RuntimeError("this segment's weight codes are on the meta device (never loaded)")
            data = self.recover()  # released: re-derived from the kernel that holds them, not kept
        return QuantizedWeight(data=data, scale=self.weight_scale, fmt=self.fmt)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight block as the arithmetic sees it (fp32)."""
        if self.fmt is None:
            return self.weight.float()
        return self.quantized_weight().dequantize()

    def weight_nbytes(self) -> int:
        total = 0
        for t in (self.weight, self.weight_scale, self.smooth, self.act_scale, self.lowrank_down, self.lowrank_up):
            if t is not None:
                total += t.numel() * t.element_size()
        return total


class SegLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` holding per-segment quantized weights."""

    def __init__(self, cfg: SegLinearConfig) -> None:
        super().__init__()
        if cfg.segments.total != (cfg.out_features if cfg.segments.axis == "out" else cfg.in_features):
            raise ValueError(
                f"segment sizes {list(cfg.segments.sizes)} sum to {cfg.segments.total}, but the layer has "
                f"{cfg.out_features if cfg.segments.axis == 'out' else cfg.in_features} "
                f"{'output' if cfg.segments.axis == 'out' else 'input'} features"
            )
        self.cfg = cfg
        self.in_features = cfg.in_features
        self.out_features = cfg.out_features
        self.segs = nn.ModuleList(
            QuantSegment(n, k, cfg, act) for (n, k), act in zip(cfg.segment_shapes(), cfg.segment_activations())
        )
        self.register_buffer("bias", torch.zeros(cfg.out_features) if cfg.bias else None)
        self._backend: Backend | None = None
        self._prepared: Any = None
        self._released: Backend | None = None  # the backend whose kernel holds the codes while released

    @classmethod
    def empty(cls, cfg: SegLinearConfig) -> SegLinear:
        """A layer with every buffer on the meta device: no memory until tensors are assigned to it."""
        with torch.device("meta"):
            return cls(cfg)

    def assign_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take ``state`` (as from :meth:`state_dict`) as the layer's own buffers, without copying.

        Raises ``ValueError`` naming the first missing, unexpected or mis-shaped tensor.
        """
        own = dict(self.named_buffers())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"missing tensors {missing[:3]}, unexpected tensors {unexpected[:3]}")
        for key, t in state.items():
            if t.shape != own[key].shape or t.dtype != own[key].dtype:
                raise ValueError(
                    f"{key}: stored {t.dtype} {tuple(t.shape)}, the config needs "
                    f"{own[key].dtype} {tuple(own[key].shape)}"
                )
            owner_name, _, attr = key.rpartition(".")
            owner = self.get_submodule(owner_name) if owner_name else self
            owner._buffers[attr] = t

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def unquantized(cls, linear: nn.Linear, segments: Segments | None = None) -> SegLinear:
        """A float SegLinear with ``linear``'s weights, cut into ``segments`` (no quantization)."""
        segments = segments or Segments("out", (linear.out_features,))
        cfg = SegLinearConfig(linear.in_features, linear.out_features, segments, None, None, linear.bias is not None)
        layer = cls(cfg)
        w = linear.weight.detach()
        for seg, (a, b) in zip(layer.segs, segments.bounds()):
            block = w[a:b] if segments.axis == "out" else w[:, a:b]
            seg.weight = block.clone()
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer.to(w.device)

    def segment_inputs(self, x2d: torch.Tensor) -> list[torch.Tensor]:
        """The input each segment sees (views; never modified)."""
        if self.cfg.segments.axis == "out":
            return [x2d] * len(self.segs)
        return [x2d[:, a:b] for a, b in self.cfg.segments.bounds()]

    # ------------------------------------------------------------------ backend
    @property
    def backend(self) -> Backend:
        if self._backend is None:
            from segquant_core.backends.reference import ReferenceBackend

            self.set_backend(ReferenceBackend())
        assert self._backend is not None
        return self._backend

    def set_backend(self, backend: Backend) -> None:
        self.restore_codes()
        reason = backend.unsupported_reason(self)
        if reason:
            raise ValueError(f"backend {backend.name!r} cannot run this layer: {reason}")
        self._backend = backend
        self._prepared = backend.prepare(self)
        if backend.holds_codes(self._prepared):
            self.release_codes()
        from segquant_core.backends.ops import bind

        bind(self)  # the handle its custom op finds it by under torch.compile (fresh: a copy never aliases)

    # ------------------------------------------------------------------ one resident copy of each weight
    @property
    def device(self) -> torch.device:
        """Where the layer lives (its weight codes may be released; its scales never are)."""
        for t in self.buffers():
            if not t.is_meta:
                return t.device
        return self.segs[0].weight.device

    @property
    def codes_released(self) -> bool:
        return self._released is not None

    def release_codes(self) -> None:
        """Drop the segments' weight codes: the backend's prepacked kernel is then their only resident copy.

        Shapes and dtypes stay (as meta tensors), so configs and byte counts still read them;
        :meth:`restore_codes` brings the codes back from the kernel when something needs them (save,
        export, a backend or device change).
        """
        if self._backend is None or self.cfg.weight is None:
            return
        for i, seg in enumerate(self.segs):
            seg.weight = torch.empty(seg.weight.shape, dtype=seg.weight.dtype, device="meta")
            seg.recover = partial(self._recovered_codes, i)
        self._released = self._backend

    def _recovered_codes(self, index: int) -> torch.Tensor:
        assert self._released is not None
        codes = self._released.recover_codes(self, self._prepared)
        assert codes is not None
        return codes[index]

    def restore_codes(self) -> None:
        """Re-derive the weight codes from the kernel that holds them (no-op when they are resident)."""
        if self._released is None:
            return
        codes = self._released.recover_codes(self, self._prepared)
        if codes is None:  # holds_codes() promised otherwise: a backend bug, not bad input
            raise RuntimeError(f"backend {self._released.name!r} released codes it cannot recover")
        for seg, c in zip(self.segs, codes):
            seg.weight = c
            seg.recover = None
        self._released = None

    def stored_state(self) -> dict[str, torch.Tensor]:
        """The state dict with real weight codes, re-derived from the kernel if released (the layer keeps
        its single resident copy)."""
        state = {k: v for k, v in self.state_dict().items()}
        if self._released is not None:
            codes = self._released.recover_codes(self, self._prepared)
            assert codes is not None
            for i, c in enumerate(codes):
                state[f"segs.{i}.weight"] = c
        return state

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """Device moves apply; dtype casts do not (``model.to(torch.bfloat16)`` must not turn int8 codes,
        fp8 codes or fp32 scales into bf16). Prepacked kernel state is rebuilt for the new device."""

        def move_only(t: torch.Tensor) -> torch.Tensor:
            target = fn(torch.empty(0, dtype=t.dtype, device=t.device))
            return t if target.device == t.device else t.to(target.device)

        self.restore_codes()
        out = super()._apply(move_only, recurse)
        if self._backend is not None:
            self._prepared = self._backend.prepare(self)
            if self._backend.holds_codes(self._prepared):
                self.release_codes()
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SegLinear expects {self.in_features} input features, got {x.shape[-1]}")
        if (
            self.cfg.weight is None
            and self.cfg.activation is None
            and len(self.segs) == 1
            and not self.cfg.smooth
            and not self.cfg.lowrank_rank
        ):
            return F.linear(x, self.segs[0].weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if torch.compiler.is_compiling():  # one opaque custom op per layer: no graph break
            from segquant_core.backends.ops import compiled_forward

            return compiled_forward(self, x)
        backend = self.backend
        x2d = x.reshape(-1, self.in_features)
        y = backend.run(self, self._prepared, x2d)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    # ------------------------------------------------------------------ introspection
    def weight_nbytes(self) -> int:
        """Bytes of everything the layer stores (codes, scales, smoothing, low-rank, bias)."""
        total = sum(s.weight_nbytes() for s in self.segs)
        if self.bias is not None:
            total += self.bias.numel() * self.bias.element_size()
        return total

    def resident_bytes(self, seen: set[int] | None = None) -> int:
        """Bytes this layer really holds: its non-released buffers plus the backend's kernel state.

        ``seen`` (storage addresses already counted) lets a caller count a whole model without counting a
        tensor twice when the kernel state shares storage with a buffer.
        """
        seen = set() if seen is None else seen
        total = 0
        for t in self.buffers():
            total += tensor_bytes_once(t, seen)
        if self._backend is not None:
            total += self._backend.state_bytes(self._prepared, seen)
        return total

    def dequantized_weight(self) -> torch.Tensor:
        """``[N, K]`` effective weight in the *smoothed* domain of each segment (for inspection)."""
        self.restore_codes()
        blocks = [s.dequantized_weight() for s in self.segs]
        return torch.cat(blocks, dim=0 if self.cfg.segments.axis == "out" else 1)

    def extra_repr(self) -> str:
        c = self.cfg
        w = c.weight.fmt.value if c.weight else "float"
        dual = "" if c.activation is None or not c.activation.dual else "-dual"
        if dual and c.dual_segments is not None:
            dual += str([i for i, d in enumerate(c.dual_segments) if d])
        a = (c.activation.fmt.value + dual + ("-dyn" if c.activation.dynamic else "")) if c.activation else "float"
        segs = f"{c.segments.axis}{list(c.segments.sizes)}" if len(c.segments.sizes) > 1 else "1"
        backend = self._backend.name if self._backend else "unset"
        return (
            f"in={c.in_features}, out={c.out_features}, w={w}, a={a}, segments={segs}, "
            f"smooth={c.smooth}, rank={c.lowrank_rank}, backend={backend}"
        )
