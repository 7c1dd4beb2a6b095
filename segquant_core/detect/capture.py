"""Capture one forward pass of a model as a small aten-level dataflow graph.

Detection needs the *dataflow* around every ``nn.Linear`` call (what its output flows into, what its input
came from), on stock models, including the ops that only touch raw inputs (the timestep sin/cos embedding).
Two capture methods feed the same graph representation (:class:`Graph`):

* ``"export"`` — ``torch.export.export(model, args, kwargs, strict=False)``. Nothing is computed (fake tensors),
  inputs stay symbolic placeholders so ops on raw inputs are visible, and every node carries its module path in
  ``meta["nn_module_stack"]``; an ``aten.linear`` node whose innermost module is an ``nn.Linear`` is that
  layer's call.
* ``"dispatch"`` — a real forward under ``torch.no_grad()`` recorded by a ``TorchDispatchMode`` (every aten op,
  post-decomposition: ``chunk`` shows up as ``split``, ``reshape`` as ``view``/``_unsafe_view``), with temporary
  forward hooks on the ``nn.Linear`` modules that collapse each layer's internal ops into one ``linear`` node.
  Used when export fails (data-dependent control flow, unsupported ops) or when asked for.

Arguments of every op are normalised against its schema (positional, keyword and default values all land under
the argument's name), so ``chunk(x, 2, -1)`` and ``chunk(x, 2, dim=-1)`` look the same to the rules.

The model is left as it was: it runs in eval mode during capture and every module's ``training`` flag is restored;
the hooks are removed before returning; parameters are never written.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

logger = logging.getLogger(__name__)

CaptureMethod = Literal["auto", "export", "dispatch"]


class CaptureError(RuntimeError):
    """Raised when the requested capture method cannot trace the model."""


@dataclass(frozen=True)
class Ref:
    """A tensor argument of an op, by value id."""

    vid: int


@dataclass
class Value:
    """One tensor in the captured dataflow (an op output, a model input, a parameter or a constant)."""

    vid: int
    shape: tuple[int, ...] | None
    producer: int | None = None  # index of the producing OpNode; None for inputs/parameters/constants
    index: int = 0  # which output of the producer


@dataclass
class OpNode:
    """One op call. ``op`` is ``"<namespace>.<name>"`` without overload (``"aten.chunk"``), or ``"linear"``
    for a call of an ``nn.Linear`` module named ``module``."""

    idx: int
    op: str
    overload: str
    args: dict[str, Any]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    module: str | None = None
    scope: str = ""

    @property
    def target(self) -> str:
        return f"{self.op}.{self.overload}" if self.overload else self.op

    def tensor_arg(self, name: str) -> int | None:
        val = self.args.get(name)
        return val.vid if isinstance(val, Ref) else None


@dataclass
class Graph:
    """The captured forward: ops in execution order plus the tensors flowing between them."""

    method: str
    nodes: list[OpNode] = field(default_factory=list)
    values: dict[int, Value] = field(default_factory=dict)
    _users: dict[int, list[int]] = field(default_factory=dict)

    # -- construction -------------------------------------------------------------------------------------
    def new_value(self, shape: tuple[int, ...] | None, producer: int | None = None, index: int = 0) -> int:
        vid = len(self.values)
        self.values[vid] = Value(vid, shape, producer, index)
        return vid

    def add_node(
        self,
        op: str,
        overload: str,
        args: dict[str, Any],
        inputs: Sequence[int],
        out_shapes: Sequence[tuple[int, ...] | None],
        module: str | None = None,
        scope: str = "",
    ) -> OpNode:
        idx = len(self.nodes)
        outs = tuple(self.new_value(s, idx, i) for i, s in enumerate(out_shapes))
        node = OpNode(idx, op, overload, args, tuple(inputs), outs, module, scope)
        self.nodes.append(node)
        for vid in dict.fromkeys(node.inputs):
            self._users.setdefault(vid, []).append(idx)
        return node

    # -- queries ------------------------------------------------------------------------------------------
    def users(self, vid: int) -> list[OpNode]:
        return [self.nodes[i] for i in self._users.get(vid, ())]

    def producer(self, vid: int) -> OpNode | None:
        p = self.values[vid].producer
        return None if p is None else self.nodes[p]

    def shape(self, vid: int) -> tuple[int, ...] | None:
        return self.values[vid].shape

    def linear_calls(self) -> list[OpNode]:
        return [n for n in self.nodes if n.op == "linear"]


# ------------------------------------------------------------------------------------------------------------
# helpers shared by both capture methods
# ------------------------------------------------------------------------------------------------------------
def _op_name(func: torch._ops.OpOverload) -> tuple[str, str]:
    name = func._schema.name.replace("::", ".")
    return name, func._overloadname


def _normalize_args(
    func: torch._ops.OpOverload, args: Sequence[Any], kwargs: Mapping[str, Any], convert: Any
) -> dict[str, Any]:
    """Map positional + keyword arguments onto the schema's names, filling defaults (so ``dim`` is always there)."""
    out: dict[str, Any] = {}
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            val = args[i]
        elif arg.name in kwargs:
            val = kwargs[arg.name]
        elif arg.has_default_value():
            val = arg.default_value
        else:
            val = None
        out[arg.name] = convert(val)
    return out


def _collect_refs(val: Any, acc: list[int]) -> None:
    if isinstance(val, Ref):
        acc.append(val.vid)
    elif isinstance(val, (list, tuple)):
        for v in val:
            _collect_refs(v, acc)


def _static_shape(t: Any) -> tuple[int, ...] | None:
    shape = getattr(t, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(s) for s in shape)
    except (TypeError, ValueError):  # unbacked / symbolic sizes
        return None


def _canonical_linear_names(model: nn.Module) -> tuple[dict[str, str], dict[int, str]]:
    """``alias name -> canonical name`` and ``id(module) -> canonical name`` for every nn.Linear."""
    by_id: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, nn.Linear):
            canon = by_id.setdefault(id(mod), name)
            alias[name] = canon
    return alias, by_id


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode and restore every submodule's ``training`` flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for mod, flag in flags:
            mod.training = flag


# ------------------------------------------------------------------------------------------------------------
# torch.export
# ------------------------------------------------------------------------------------------------------------
def _innermost_module(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    fqn = list(stack.values())[-1][0]
    return fqn if isinstance(fqn, str) else None


def capture_export(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Graph:
    """Trace with non-strict ``torch.export`` and convert the exported aten graph."""
    alias, _ = _canonical_linear_names(model)
    ep = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
    graph = Graph(method="torch.export")
    env: dict[torch.fx.Node, Any] = {}  # fx node -> Ref | list[Ref] | None

    def convert(val: Any) -> Any:
        if isinstance(val, torch.fx.Node):
            return env.get(val)
        if isinstance(val, (list, tuple)):
            return type(val)(convert(v) for v in val)
        return val

    for node in ep.graph.nodes:
        if node.op == "placeholder":
            env[node] = Ref(graph.new_value(_static_shape(node.meta.get("val"))))
        elif node.op == "get_attr":
            attr = getattr(ep.graph_module, str(node.target), None)
            env[node] = Ref(graph.new_value(_static_shape(attr))) if isinstance(attr, torch.Tensor) else None
        elif node.op == "call_function":
            target = node.target
            if target is operator.getitem:
                container, i = env.get(node.args[0]), node.args[1]
                env[node] = container[i] if isinstance(container, (list, tuple)) else None
                continue
            if isinstance(target, torch._ops.HigherOrderOperator):
                raise CaptureError(f"exported graph contains a higher-order op ({target}); its body is opaque")
            meta_val = node.meta.get("val")
            multi = isinstance(meta_val, (list, tuple))
            out_shapes = (
                [_static_shape(v) for v in meta_val]
                if multi
                else ([_static_shape(meta_val)] if isinstance(meta_val, torch.Tensor) else [])
            )
            if isinstance(target, torch._ops.OpOverload):
                op, overload = _op_name(target)
                norm = _normalize_args(target, node.args, node.kwargs, convert)
            else:  # python-level callables (sym ints, ...) are opaque to the rules
                op, overload = getattr(target, "__name__", str(target)), ""
                norm = {"args": convert(list(node.args))}
            refs: list[int] = []
            _collect_refs(list(norm.values()), refs)
            module = None
            if op == "aten.linear":
                fqn = _innermost_module(node)
                if fqn is not None and fqn in alias:
                    module = alias[fqn]
                    x = norm.get("input")
                    refs = [x.vid] if isinstance(x, Ref) else []
                    op, overload, norm = "linear", "", {"input": x}
            gnode = graph.add_node(op, overload, norm, refs, out_shapes, module, _innermost_module(node) or "")
            outs = [Ref(v) for v in gnode.outputs]
            env[node] = outs if multi else (outs[0] if outs else None)
    return graph


# ------------------------------------------------------------------------------------------------------------
# dispatch-level recording
# ------------------------------------------------------------------------------------------------------------
class _Recorder(TorchDispatchMode):
    """Records every aten op of a real forward; ops inside an nn.Linear call are collapsed by hooks."""

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        self.graph = graph
        self._ids: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self.suspended = 0

    def vid_of(self, t: torch.Tensor) -> int:
        """Value id of a live tensor; a tensor seen for the first time becomes a graph input."""
        hit = self._ids.get(id(t))
        if hit is not None and hit[0]() is t:
            return hit[1]
        return self.bind(t, self.graph.new_value(_static_shape(t)))

    def bind(self, t: torch.Tensor, vid: int) -> int:
        self._ids[id(t)] = (weakref.ref(t), vid)
        return vid

    def _convert(self, val: Any) -> Any:
        if isinstance(val, torch.Tensor):
            return Ref(self.vid_of(val))
        if isinstance(val, (list, tuple)):
            return type(val)(self._convert(v) for v in val)
        return val

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.suspended or not isinstance(func, torch._ops.OpOverload):
            return out
        op, overload = _op_name(func)
        norm = _normalize_args(func, args, kwargs, self._convert)
        refs: list[int] = []
        _collect_refs(list(norm.values()), refs)
        outs = [o for o in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(o, torch.Tensor)]
        node = self.graph.add_node(op, overload, norm, refs, [_static_shape(o) for o in outs])
        for t, vid in zip(outs, node.outputs):
            self.bind(t, vid)  # in-place ops rebind the same tensor object to a new version
        return out


def capture_dispatch(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Graph:
    """Run one real forward under a recording TorchDispatchMode (see module docstring)."""
    _, by_id = _canonical_linear_names(model)
    graph = Graph(method="dispatch")
    rec = _Recorder(graph)
    pending: list[int] = []

    def pre_hook(mod: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = inputs[0] if inputs else kwargs.get("input")
        pending.append(rec.vid_of(x) if isinstance(x, torch.Tensor) else -1)
        rec.suspended += 1

    def post_hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        rec.suspended -= 1
        x_vid = pending.pop()
        if rec.suspended or not isinstance(output, torch.Tensor):
            return
        ins = [x_vid] if x_vid >= 0 else []
        node = graph.add_node(
            "linear",
            "",
            {"input": Ref(x_vid) if x_vid >= 0 else None},
            ins,
            [_static_shape(output)],
            module=by_id[id(mod)],
        )
        rec.bind(output, node.outputs[0])

    handles = []
    try:
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))
                handles.append(mod.register_forward_hook(post_hook))
        with torch.no_grad(), rec:
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return graph


# ------------------------------------------------------------------------------------------------------------
def capture(
    model: nn.Module,
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
    method: CaptureMethod = "auto",
) -> Graph:
    """Capture ``model(*args, **kwargs)`` as a :class:`Graph`.

    ``method="auto"`` tries ``torch.export`` (no compute, symbolic inputs) and falls back to the dispatch
    recorder if export fails; the method used is logged and stored in ``Graph.method``.
    """
    if method not in ("auto", "export", "dispatch"):
        raise ValueError(f"capture method must be 'auto', 'export' or 'dispatch', got {method!r}")
    kwargs = dict(kwargs or {})
    with eval_mode(model):
        if method in ("auto", "export"):
            try:
                graph = capture_export(model, args, kwargs)
            except Exception as exc:
                if method == "export":
                    raise CaptureError(f"torch.export failed on {type(model).__name__}: {exc}") from exc
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                logger.warning(
                    "torch.export failed on %s (%s: %s); falling back to dispatch-level capture",
                    type(model).__name__,
                    type(exc).__name__,
                    first[:200],
                )
            else:
                logger.info(
                    "captured %s with torch.export (non-strict): %d ops, %d linear calls",
                    type(model).__name__,
                    len(graph.nodes),
                    len(graph.linear_calls()),
                )
                return graph
        graph = capture_dispatch(model, args, kwargs)
        logger.info(
            "captured %s with dispatch-level recording: %d ops, %d linear calls",
            type(model).__name__,
            len(graph.nodes),
            len(graph.linear_calls()),
        )
        return graph
