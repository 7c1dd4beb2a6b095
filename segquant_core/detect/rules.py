"""SegQuant pattern rules over a captured aten dataflow graph (see :mod:`.capture`).

Three questions are asked of every call of every ``nn.Linear``:

**Output segmentation** (``axis="out"``). Walk *forward* from the layer's output, tracking where its output
features live: at first they are the last dim; a reshape that splits them (``(B, 6·D) → (B, 6, D)``) keeps them as
a trailing block of dims. The walk passes through

* value-preserving ops of the same shape: ``PASS_OPS`` (``to``/``_to_copy``/``clone``/``contiguous``/dropout/
  ``alias``/``detach``/...);
* views that leave the feature block intact, judged from the input and output shapes: ``RESHAPE_OPS``
  (``view``/``reshape``/``_unsafe_view``/``flatten``/``unflatten``/``squeeze``/``unsqueeze``), ``transpose``/
  ``permute`` of leading dims, ``slice``/``select``/``narrow`` of a leading dim, and ``chunk``/``split``/``unbind``
  along a leading dim (e.g. Flux's split of the joint sequence);
* (output side only) at most one arithmetic op ``add``/``sub``/``mul``/``div`` whose output has our shape (the
  other operand broadcasts onto ours, so features do not move). This is what exposes PixArt's AdaLN,
  ``(scale_shift_table[None] + t.reshape(B, 6, -1)).chunk(6, dim=1)``; the limit of one keeps the walk from
  following residual streams through the whole network.

It fires at a ``chunk``/``split``/``split_with_sizes``/``unbind``/``tensor_split`` along the first dim of the
feature block (the last dim when the features were never reshaped; the ``dim`` may be positional, keyword,
negative or positive). Segment sizes come from the op's actual output shapes, so ragged splits (a remainder,
``split_with_sizes``) are kept. A split along a leading dim (``chunk(2, dim=1)`` of a ``(B, S, C)`` output) is not a
segmentation; a split *inside* a reshaped feature block (strided segments) is not supported.

**Input segmentation** (``axis="in"``). Walk *backward* from the layer's input through the same value-preserving
ops, reshapes that keep the last dim (``(B, S, C) → (B·S, C)``), ``transpose``/``permute`` that keep the last dim
in place, and slices/splits along a non-last dim (SD3's ``hidden_states[:, :n]``). No arithmetic is crossed. It
fires at

* ``cat``/``concat``/``concatenate`` along the last dim → one segment per (non-empty) part, ragged allowed;
* ``stack`` along the (new) last dim → ``k`` segments of 1 (a stack along any other dim is not a feature concat);
* a *per-head merge*: a ``view``/``reshape``/``_unsafe_view``/``flatten`` whose input is ``(…, H, D)`` and whose
  output's last dim is exactly ``H·D`` while the leading element count is unchanged, i.e. the last two dims and only
  those are merged (``(B, S, H, D) → (B, S, H·D)`` or ``→ (B·S, H·D)``), with ``H > 1`` and ``D > 1``. It gives ``H``
  segments of ``D``. Any such merge counts, whether or not the dims are attention heads (``(B, 2, 10) → (B, 20)``
  is one); a reshape that splits the last dim (``(B, 20) → (B, 4, 5)``), flattens non-trailing dims, merges more
  than the last two dims, or folds rows of another dim into the features (``(B·6, D) → (B, 6·D)``) is not.

**DualScale.** Walk backward through every value-preserving op (all of the above views, any dim, plus ``expand``)
to ``aten.silu`` or ``aten.gelu`` (any ``approximate``), or to a gated product ``aten.mul(x, act(gate))`` whose
one operand comes from SiLU/GELU (diffusers' GEGLU, ``hidden * gelu(gate)``; SwiGLU likewise). A ``cat`` whose
parts all come from activations counts for the whole input. When the layer's in-segments come from a ``cat``
or ``stack`` whose parts differ (Flux single-block ``proj_out``: attention | GELU-MLP), each part is walked back
on its own and DualScale is recorded per in-segment (``[false, true]``). Rules key on aten ops, never module
classes.

**Combining.** A layer that matches both an output and an input pattern keeps the output one (the input match is
recorded in ``reasons``). A layer called several times keeps a segmentation only if every call that found one found
the same sizes, and gets DualScale only if every call's input comes from an activation (per in-segment: only
if every call gives the same flags).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

from segquant_core.detect.capture import Graph, OpNode, Ref
from segquant_core.detect.plan import LayerPlan, Segments

#: Same shape, same values (up to dtype): crossed in every direction.
PASS_OPS = frozenset(
    {
        "aten.to",
        "aten._to_copy",
        "aten.clone",
        "aten.contiguous",
        "aten.dropout",
        "aten.feature_dropout",
        "aten.alpha_dropout",
        "aten.feature_alpha_dropout",
        "aten.alias",
        "aten.detach",
        "aten.lift_fresh",
        "aten.lift_fresh_copy",
        "aten.type_as",
        "aten.positive",
    }
)
#: Views judged from input/output shapes.
RESHAPE_OPS = frozenset(
    {
        "aten.view",
        "aten.reshape",
        "aten._unsafe_view",
        "aten._reshape_alias",
        "aten.view_copy",
        "aten.flatten",
        "aten.unflatten",
        "aten.squeeze",
        "aten.unsqueeze",
        "aten.view_as",
        "aten.reshape_as",
    }
)
#: Views whose merge of the last two dims is a per-head merge (squeeze/unsqueeze never merge).
MERGE_OPS = frozenset(
    {
        "aten.view",
        "aten.reshape",
        "aten._unsafe_view",
        "aten._reshape_alias",
        "aten.view_copy",
        "aten.flatten",
    }
)
LAYOUT_OPS = frozenset({"aten.transpose", "aten.permute", "aten.t", "aten.swapaxes", "aten.swapdims"})
INDEX_OPS = frozenset({"aten.slice", "aten.select", "aten.narrow"})
SPLIT_OPS = frozenset(
    {
        "aten.chunk",
        "aten.split",
        "aten.split_with_sizes",
        "aten.unbind",
        "aten.tensor_split",
        "aten.unsafe_chunk",
        "aten.unsafe_split",
        "aten.unsafe_split_with_sizes",
    }
)
CONCAT_OPS = frozenset({"aten.cat", "aten.concat", "aten.concatenate"})
STACK_OPS = frozenset({"aten.stack"})
ARITH_OPS = frozenset(
    {
        "aten.add",
        "aten.sub",
        "aten.mul",
        "aten.div",
        "aten.add_",
        "aten.sub_",
        "aten.mul_",
        "aten.div_",
    }
)
GATE_OPS = frozenset({"aten.mul", "aten.mul_"})
ACTIVATION_OPS = frozenset({"aten.silu", "aten.silu_", "aten.gelu", "aten.gelu_"})
#: Crossed by the DualScale walk: anything that only moves or selects values.
VALUE_OPS = PASS_OPS | RESHAPE_OPS | LAYOUT_OPS | INDEX_OPS | SPLIT_OPS | frozenset({"aten.expand"})

#: Arithmetic ops crossed on one output-side path (see module docstring).
MAX_ARITH_ON_OUTPUT_PATH = 1

_SPLIT_VERB = {"aten.chunk": "chunked", "aten.unsafe_chunk": "chunked", "aten.unbind": "unbound"}


# ------------------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------------------
def _short(op: str) -> str:
    return op.split(".", 1)[-1]


def _primary(node: OpNode) -> int | None:
    """The tensor an op acts on (``self``/``input``), by value id."""
    for key in ("self", "input"):
        val = node.args.get(key)
        if isinstance(val, Ref):
            return val.vid
    return None


def _norm_dim(dim: object, ndim: int) -> int | None:
    if not isinstance(dim, int) or ndim <= 0:
        return None
    return dim + ndim if dim < 0 else dim


def _fmt_dim(dim: object) -> str:
    return f"dim={dim}"


def _path_text(path: Iterable[str]) -> str:
    steps: list[str] = []
    for p in path:
        if not steps or steps[-1] != p:
            steps.append(p)
    return f" via {' → '.join(steps)}" if steps else ""


def _feature_suffix(shape: tuple[int, ...], total: int) -> tuple[int, ...] | None:
    """The shortest trailing block of ``shape`` holding exactly ``total`` elements."""
    prod = 1
    for k in range(1, len(shape) + 1):
        prod *= shape[-k]
        if prod == total:
            return tuple(shape[-k:])
        if prod > total or prod == 0:
            return None
    return None


def _layout_keeps_trailing(node: OpNode, ndim: int, keep: int) -> bool:
    """Whether a transpose/permute leaves the last ``keep`` dims where they are."""
    first_kept = ndim - keep
    if node.op == "aten.permute":
        dims = node.args.get("dims")
        if not isinstance(dims, (list, tuple)):
            return False
        norm = [_norm_dim(d, ndim) for d in dims]
        return norm[first_kept:] == list(range(first_kept, ndim))
    if node.op == "aten.t":
        return ndim < 2 or first_kept >= 2
    names = ("dim0", "dim1") if node.op in ("aten.transpose", "aten.swapdims") else ("axis0", "axis1")
    d0, d1 = (_norm_dim(node.args.get(n), ndim) for n in names)
    if d0 is None or d1 is None:
        return False
    return d0 == d1 or (d0 < first_kept and d1 < first_kept)


# ------------------------------------------------------------------------------------------------------------
# output side
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Match:
    """One pattern found for one call: segment sizes and a human-readable reason.

    ``parts`` are the value ids of the concatenated tensors, one per segment, when the segments come from a
    ``cat``/``stack`` (empty for chunks and per-head merges): DualScale is decided per part from them.
    """

    sizes: tuple[int, ...]
    reason: str
    parts: tuple[int, ...] = ()


def out_matches(graph: Graph, call: OpNode) -> list[Match]:
    """Every chunk/split of this call's output features (normally zero or one)."""
    y = call.outputs[0]
    shape = graph.shape(y)
    if not shape:
        return []
    found: list[Match] = []
    todo: list[tuple[int, tuple[int, ...], tuple[str, ...], int]] = [(y, (shape[-1],), (), 0)]
    seen: set[tuple[int, tuple[int, ...]]] = set()
    while todo:
        vid, feat, path, arith = todo.pop()
        if (vid, feat) in seen:
            continue
        seen.add((vid, feat))
        cur = graph.shape(vid)
        if cur is None or len(cur) < len(feat):
            continue
        for node in graph.users(vid):
            if node.op in ARITH_OPS:
                if arith >= MAX_ARITH_ON_OUTPUT_PATH or not node.outputs or graph.shape(node.outputs[0]) != cur:
                    continue
                todo.append((node.outputs[0], feat, (*path, _short(node.op)), arith + 1))
                continue
            for nxt_vid, nxt_feat, nxt_path in _step_forward(graph, node, vid, cur, feat, path, found):
                todo.append((nxt_vid, nxt_feat, nxt_path, arith))
    return found


def _step_forward(
    graph: Graph,
    node: OpNode,
    vid: int,
    cur: tuple[int, ...],
    feat: tuple[int, ...],
    path: tuple[str, ...],
    found: list[Match],
) -> list[tuple[int, tuple[int, ...], tuple[str, ...]]]:
    op, ndim, nf = node.op, len(cur), len(feat)
    total = math.prod(feat)
    first_feat = ndim - nf
    step = (*path, _short(op))
    if _primary(node) != vid:
        return []
    outs = node.outputs
    if op in PASS_OPS:
        return [(outs[0], feat, step)] if outs and graph.shape(outs[0]) == cur else []
    if op in RESHAPE_OPS:
        new_shape = graph.shape(outs[0]) if outs else None
        if new_shape is None or math.prod(new_shape) != math.prod(cur):
            return []
        new_feat = _feature_suffix(new_shape, total)
        return [(outs[0], new_feat, step)] if new_feat is not None else []
    if op in LAYOUT_OPS:
        return [(outs[0], feat, step)] if outs and _layout_keeps_trailing(node, ndim, nf) else []
    if op in INDEX_OPS:
        d = _norm_dim(node.args.get("dim"), ndim)
        if outs and (graph.shape(outs[0]) == cur or (d is not None and d < first_feat)):
            return [(o, feat, step) for o in outs]
        return []
    if op in SPLIT_OPS:
        d = _norm_dim(node.args.get("dim"), ndim)
        if d is None or not outs:
            return []
        if d < first_feat:  # splitting tokens/batch: features travel on unchanged
            return [(o, feat, step) for o in outs]
        if d > first_feat:
            return []  # would cut inside a reshaped feature block: strided, not contiguous segments
        inner = total // feat[0]
        sizes: list[int] = []
        for o in outs:
            oshape = graph.shape(o)
            if oshape is None:
                return []
            sizes.append((oshape[d] if len(oshape) == ndim else 1) * inner)
        sizes = [s for s in sizes if s > 0]
        if len(sizes) > 1 and sum(sizes) == total:
            verb = _SPLIT_VERB.get(op, "split")
            where = "the last dim" if nf == 1 else f"dim {d - ndim} of a {tuple(cur[first_feat:])} view"
            found.append(
                Match(
                    tuple(sizes),
                    f"output {verb} into {len(sizes)} along {where} "
                    f"({_fmt_dim(node.args.get('dim'))}, {op}){_path_text(path)}",
                )
            )
        return []
    return []


# ------------------------------------------------------------------------------------------------------------
# input side
# ------------------------------------------------------------------------------------------------------------
def _walk_back_features(graph: Graph, vid: int) -> tuple[OpNode | None, int, list[str]]:
    """Follow ``vid`` back through ops that keep the last (feature) dim intact; return the first other producer."""
    path: list[str] = []
    while True:
        node = graph.producer(vid)
        if node is None:
            return None, vid, path
        src = _primary(node)
        out_shape = graph.shape(vid)
        in_shape = graph.shape(src) if src is not None else None
        if src is None or not out_shape or not in_shape:
            return node, vid, path
        if not _keeps_last_dim(node, in_shape, out_shape):
            return node, vid, path
        path.append(_short(node.op))
        vid = src


def _keeps_last_dim(node: OpNode, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> bool:
    """Whether ``node`` carries its input's last dim through unchanged (the in-side transparent set)."""
    op, ndim = node.op, len(in_shape)
    if op in PASS_OPS:
        return in_shape == out_shape
    if op in RESHAPE_OPS:
        return in_shape[-1] == out_shape[-1]
    if op in LAYOUT_OPS:
        return _layout_keeps_trailing(node, ndim, 1)
    if op in INDEX_OPS or op in SPLIT_OPS:
        d = _norm_dim(node.args.get("dim"), ndim)
        return d is not None and (d != ndim - 1 or in_shape == out_shape)
    return False


def _head_merge(graph: Graph, node: OpNode, vid: int) -> tuple[int, int] | None:
    """``(H, D)`` if ``node`` (producing ``vid``) merges exactly the last two dims ``(…, H, D) → (…, H·D)``."""
    src = _primary(node)
    if node.op not in MERGE_OPS or src is None:
        return None
    in_shape, out_shape = graph.shape(src), graph.shape(vid)
    if not in_shape or not out_shape or len(in_shape) < 2:
        return None
    heads, dim = in_shape[-2], in_shape[-1]
    if heads > 1 and dim > 1 and out_shape[-1] == heads * dim and math.prod(in_shape[:-2]) == math.prod(out_shape[:-1]):
        return heads, dim
    return None


def in_match(graph: Graph, call: OpNode) -> Match | None:
    """The cat/stack/per-head reshape this call's input comes from, if any."""
    x = call.tensor_arg("input")
    if x is None:
        return None
    node, vid, path = _walk_back_features(graph, x)
    if node is None:
        return None
    via = _path_text(reversed(path))
    out_shape = graph.shape(vid)
    if not out_shape:
        return None
    ndim = len(out_shape)
    if node.op in CONCAT_OPS or node.op in STACK_OPS:
        d = _norm_dim(node.args.get("dim"), ndim)
        parts = [p.vid for p in node.args.get("tensors") or () if isinstance(p, Ref)]
        if d != ndim - 1 or len(parts) < 2:
            return None
        if node.op in STACK_OPS:
            return Match(
                (1,) * len(parts),
                f"input is a stack of {len(parts)} along the last dim "
                f"({_fmt_dim(node.args.get('dim'))}, {node.op}){via}",
                tuple(parts),
            )
        shapes = [graph.shape(p) for p in parts]
        if any(not s for s in shapes):
            return None
        kept = [(p, s) for p, s in zip(parts, shapes) if s and math.prod(s) > 0]
        sizes = tuple(s[-1] for _, s in kept)
        if len(sizes) < 2:
            return None
        notes = []
        for i, p in enumerate(parts):
            inner, ivid, _ = _walk_back_features(graph, p)
            hd = _head_merge(graph, inner, ivid) if inner is not None else None
            if hd:
                notes.append(f"part {i} is itself a per-head reshape {hd[0]}×{hd[1]} (not refined)")
        text = (
            f"input is a cat of {len(sizes)} parts {list(sizes)} along the last dim "
            f"({_fmt_dim(node.args.get('dim'))}, {node.op}){via}"
        )
        return Match(sizes, "; ".join([text, *notes]), tuple(p for p, _ in kept))
    hd = _head_merge(graph, node, vid)
    if hd:
        heads, dim = hd
        return Match((dim,) * heads, f"input is a per-head reshape {heads}×{dim} ({node.op}){via}")
    return None


# ------------------------------------------------------------------------------------------------------------
# DualScale
# ------------------------------------------------------------------------------------------------------------
def _act_name(node: OpNode) -> str:
    if node.op.startswith("aten.gelu"):
        approximate = node.args.get("approximate", "none")
        return "GELU" if approximate in (None, "none") else f"GELU({approximate})"
    return "SiLU"


def _walk_back_values(graph: Graph, vid: int) -> tuple[OpNode | None, list[str]]:
    path: list[str] = []
    while True:
        node = graph.producer(vid)
        if node is None:
            return None, path
        src = _primary(node)
        if node.op in VALUE_OPS and src is not None:
            path.append(_short(node.op))
            vid = src
            continue
        return node, path


@dataclass
class DualResult:
    """DualScale verdict for one call: ``reason`` when it applies, ``notes`` explaining a near miss."""

    reason: str | None = None
    notes: list[str] = field(default_factory=list)


def _activation_source(graph: Graph, vid: int, allow_gate: bool = True) -> tuple[str | None, str | None]:
    """``(description, near_miss_note)`` of the SiLU/GELU/gated product ``vid`` comes from."""
    node, path = _walk_back_values(graph, vid)
    if node is None:
        return None, None
    via = _path_text(reversed(path))
    if node.op in ACTIVATION_OPS:
        return f"input from {_act_name(node)} ({node.op}){via}", None
    if allow_gate and node.op in GATE_OPS:
        if not isinstance(node.args.get("other"), Ref):  # act(x) * constant: still one-signed-heavy
            inner, _ = (
                _activation_source(graph, node.args["self"].vid, allow_gate=False)
                if isinstance(node.args.get("self"), Ref)
                else (None, None)
            )
            return (f"{inner}, scaled by a constant ({node.op}){via}" if inner else None), None
        for name in ("self", "other"):
            operand = node.args.get(name)
            if not isinstance(operand, Ref):
                continue
            src, _ = _walk_back_values(graph, operand.vid)
            if src is not None and src.op in ACTIVATION_OPS:
                return (
                    f"input from a GEGLU-style gated product x * {_act_name(src)} of the gate ({node.op}){via}",
                    None,
                )
        return None, None
    if node.op in CONCAT_OPS:
        parts = [p.vid for p in node.args.get("tensors") or () if isinstance(p, Ref)]
        got = [_activation_source(graph, p, allow_gate)[0] for p in parts]
        hits = [i for i, g in enumerate(got) if g]
        if parts and len(hits) == len(parts):
            return f"input is a cat of {len(parts)} activation outputs ({node.op}){via}", None
        if hits:
            return None, (
                f"only part(s) {hits} of the input cat come from SiLU/GELU; DualScale not applied to a mixed input"
            )
    return None, None


def dual_result(graph: Graph, call: OpNode) -> DualResult:
    x = call.tensor_arg("input")
    if x is None:
        return DualResult()
    reason, note = _activation_source(graph, x)
    return DualResult(reason, [note] if note else [])


def part_duals(graph: Graph, match: Match) -> tuple[tuple[bool, ...], list[str]]:
    """DualScale per concatenated part of an in-segment match: each part walked back on its own.

    Returns the flags and, for the parts that are dual, why.
    """
    flags, why = [], []
    for i, vid in enumerate(match.parts):
        source, _ = _activation_source(graph, vid)
        flags.append(source is not None)
        if source is not None:
            why.append(f"part {i}: {source}")
    return tuple(flags), why


# ------------------------------------------------------------------------------------------------------------
# per-layer decision
# ------------------------------------------------------------------------------------------------------------
def _agree(per_call: list[Match | None], label: str, n_calls: int) -> tuple[Match | None, list[str]]:
    """Combine one kind of match across calls: keep it if every call that found one found the same sizes."""
    hits = [m for m in per_call if m is not None]
    if not hits:
        return None, []
    distinct = list(dict.fromkeys(m.sizes for m in hits))
    if len(distinct) > 1:
        return None, [f"{label} segmentation dropped: calls disagree ({', '.join(map(str, map(list, distinct)))})"]
    reason = hits[0].reason
    if n_calls > 1:
        reason += f" [{len(hits)} of {n_calls} calls]"
    return hits[0], [reason]


def plan_layer(name: str, module: nn.Linear, graph: Graph, calls: list[OpNode]) -> LayerPlan:
    """The :class:`LayerPlan` of one linear from all its calls in ``graph``."""
    if not calls:
        return LayerPlan(name, None, False, ("not called during the example forward",))
    reasons: list[str] = []
    out_per_call: list[Match | None] = []
    conflict = False
    for call in calls:
        matches = out_matches(graph, call)
        sizes = list(dict.fromkeys(m.sizes for m in matches))
        if len(sizes) > 1:  # two consumers of the same output split it differently
            reasons.append(
                "consumers of one output split it differently "
                f"({', '.join(map(str, map(list, sizes)))}); output segmentation dropped"
            )
            conflict = True
        out_per_call.append(matches[0] if len(sizes) == 1 else None)
    out, out_reasons = (None, []) if conflict else _agree(out_per_call, "output", len(calls))
    inp, in_reasons = _agree([in_match(graph, c) for c in calls], "input", len(calls))

    if out is not None and sum(out.sizes) != module.out_features:
        out_reasons = [
            f"output split sizes {list(out.sizes)} do not add up to out_features={module.out_features}; ignored"
        ]
        out = None
    if inp is not None and sum(inp.sizes) != module.in_features:
        in_reasons = [f"input part sizes {list(inp.sizes)} do not add up to in_features={module.in_features}; ignored"]
        inp = None

    segments: Segments | None = None
    if out is not None:
        segments = Segments("out", out.sizes)
        reasons += out_reasons
        if inp is not None:
            reasons += [f"also: {r}; kept the output segmentation" for r in in_reasons]
        else:
            reasons += in_reasons
    else:
        reasons += out_reasons
        reasons += in_reasons
        if inp is not None:
            segments = Segments("in", inp.sizes)

    duals = [dual_result(graph, c) for c in calls]
    dual_hits = [d for d in duals if d.reason]
    dual: bool | tuple[bool, ...] = bool(dual_hits) and len(dual_hits) == len(duals)
    suffix = f" [{len(calls)} calls]" if len(calls) > 1 else ""
    per_part = _per_segment_dual(graph, calls, segments) if not dual_hits else None
    if dual:
        reasons.append(dual_hits[0].reason + suffix)  # type: ignore[operator]
    elif dual_hits:
        reasons.append(f"{dual_hits[0].reason} in only {len(dual_hits)} of {len(calls)} calls; DualScale not applied")
    elif per_part is not None:
        dual, why = per_part
        reasons.append(
            f"DualScale on in-segment(s) {[i for i, d in enumerate(dual) if d]} only: {'; '.join(why)}{suffix}"
        )
    for d in duals:
        for note in d.notes:
            if note not in reasons and per_part is None:
                reasons.append(note)
    return LayerPlan(name, segments, dual, tuple(reasons))


def _per_segment_dual(
    graph: Graph, calls: list[OpNode], segments: Segments | None
) -> tuple[tuple[bool, ...], list[str]] | None:
    """Mixed per-in-segment DualScale flags when every call's input is the same cat of parts, some from an
    activation and some not; ``None`` otherwise."""
    if segments is None or segments.axis != "in":
        return None
    found = []
    for call in calls:
        match = in_match(graph, call)
        if match is None or match.sizes != segments.sizes or len(match.parts) != segments.count:
            return None
        found.append(part_duals(graph, match))
    flags = {f for f, _ in found}
    if len(flags) != 1:
        return None
    mask = next(iter(flags))
    return (mask, found[0][1]) if any(mask) and not all(mask) else None


def plan_from_graph(model: nn.Module, graph: Graph, include: Callable[[str], bool] | None = None) -> list[LayerPlan]:
    """One record per ``nn.Linear`` of ``model`` (``named_modules`` order), filtered by ``include``."""
    calls: dict[str, list[OpNode]] = {}
    for node in graph.linear_calls():
        if node.module is not None:
            calls.setdefault(node.module, []).append(node)
    records = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (include is None or include(name)):
            records.append(plan_layer(name, mod, graph, calls.get(name, [])))
    return records
