"""Legalization: make a graph runnable on a target by splitting back what it cannot run.

``legalize(model, target)`` repeats until nothing changes:

1. ask the target about every node (:meth:`Backend.check`); a standard op the
   model's opset import does not cover yet (a decomposition may emit opset-23
   ``Attention`` into an opset-17 model) is unsupported whatever the target says;
2. replace each unsupported node by its decomposition: first one registered
   through ``graphopt_register_decompositions`` (contrib and custom-domain ops,
   or a better rule for a standard op), else the function body the ONNX spec
   defines for the op, built by onnx for the node's attributes and input types
   (:mod:`graphopt._expand`);
3. the replacements may be unsupported themselves: the next round splits them
   in turn. (onnx cannot infer types through an op newer than the model's
   opset, so a node after one may have untyped inputs; once the nodes before
   it are split back, types are inferred again and its decomposition retried.)

A ``Constant`` node a target does not run becomes an initializer. A node that
is unsupported and has no decomposition is collected, and legalization ends
with one :class:`LegalizeError` naming every such node, its op and the
target's reason (and why its decomposition did not apply, if it has one);
nothing runs silently wrong. When something was split back, the seams are
tidied (reshape chains between two split-back nodes, reshapes that keep their
input's shape, common subexpressions such as the shape values every split-back
attention computes), and the model's ``history`` gets a :class:`LegalizeStats`
entry saying what was split back and why.

Not legalized: nodes inside subgraphs (``If``/``Loop`` bodies); the backends
only look at the top level too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt._errors import BackendError, PluginError
from graphopt._expand import (CannotDecompose, expand_function, is_noop_reshape, merge_reshape_chain,
                              norm_domain, op_label, opset_problem)
from graphopt._ir import Model
from graphopt._pipeline import PassContext, PassStats
from graphopt.rewrite import Namer, bypass, remove_dead

if TYPE_CHECKING:
    from graphopt._backend import Backend
    from graphopt._plugins import Registry

logger = logging.getLogger(__name__)

#: Rounds before legalization gives up (a decomposition that re-creates its own op never converges).
MAX_ROUNDS = 16
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli"}
#: Constants up to this size are merged by value when merging common subexpressions.
_DEDUPE_CONST_BYTES = 4096

__all__ = ["CannotDecompose", "LegalizeError", "LegalizeStats", "SplitBack", "legalize", "unsupported_nodes"]


class LegalizeError(BackendError):
    """Nodes the target cannot run and that have no (applicable) decomposition."""


@dataclass
class SplitBack:
    """``count`` nodes of ``op`` were replaced by their decomposition because of ``reason``."""

    op: str
    reason: str
    count: int
    source: str  # "onnx function body" or the plugin that registered the decomposition

    def line(self) -> str:
        return f"split back {self.count} × {self.op}: {self.reason}"


@dataclass
class LegalizeStats(PassStats):
    """A :class:`PassStats` entry (name ``legalize``) plus what was split back and why."""

    split_back: list[SplitBack] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [s.line() for s in self.split_back]


def _resolve(target: str | Backend) -> Backend:
    from graphopt._backend import Backend
    from graphopt._plugins import get_registry

    return target if isinstance(target, Backend) else get_registry().backend(target)


def _reason(node: gs.Node, model: Model, backend: Backend) -> str | None:
    """Why ``node`` must be split back, or None when the target runs it as it is."""
    return opset_problem(node, model) or backend.check(node, model)


def _describe(left: list[tuple[gs.Node, str, str]], detail: int = 6) -> str:
    """Every node left, one by one when few, else grouped by op and reason (names still all listed)."""
    if len(left) <= detail:
        return "; ".join(f"{n.name or '<unnamed>'} ({op_label(n)}): {reason}" + (f" ({why})" if why else "")
                         for n, reason, why in left)
    groups: dict[tuple[str, str], list[str]] = {}
    for n, reason, why in left:
        groups.setdefault((op_label(n), reason + (f" ({why})" if why else "")), []).append(n.name or "<unnamed>")
    return "; ".join(f"{len(names)} × {op} ({reason}): {', '.join(names)}"
                     for (op, reason), names in sorted(groups.items(), key=lambda kv: -len(kv[1])))


def unsupported_nodes(model: Model, target: str | Backend) -> list[tuple[gs.Node, str]]:
    """Every node ``target`` cannot run as it is, with the reason."""
    backend = _resolve(target)
    return [(n, r) for n in model.graph.nodes if (r := _reason(n, model, backend)) is not None]


def legalize(model: Model, target: str | Backend, *, in_place: bool = False,
             registry: Registry | None = None) -> Model:
    """Split back every node ``target`` cannot run, recursively, until the graph is legal.

    Returns the legalized model (a copy unless ``in_place``; the input is never
    changed otherwise). Raises :class:`LegalizeError` listing every node that is
    unsupported and has no decomposition that applies to it.
    """
    from graphopt._plugins import get_registry

    backend = _resolve(target)
    registry = registry or get_registry()
    work = model if in_place else model.copy()
    graph = work.graph
    before = work.node_count()
    start = time.perf_counter()
    splits: dict[tuple[str, str], SplitBack] = {}
    created: list[gs.Node] = []
    stuck: dict[int, tuple[gs.Node, str, str]] = {}
    rounds = 0
    while True:
        todo = [(n, r) for n in graph.nodes if id(n) not in stuck and (r := _reason(n, work, backend)) is not None]
        if not todo:
            break
        rounds += 1
        if rounds > MAX_ROUNDS:
            left = ", ".join(sorted({op_label(n) for n, _ in todo}))
            raise LegalizeError(f"legalization for {backend.name} did not converge after {MAX_ROUNDS} rounds: "
                                f"still unsupported: {left} (a decomposition keeps re-creating its op)")
        _ensure_types(work, [n for n, _ in todo], registry)
        names = Namer(graph)
        replaced: set[int] = set()
        typed_at = 0  # replacements made when types were last inferred
        for node, reason in todo:
            if node.op == "Constant" and norm_domain(node.domain) == "" and _to_initializer(node):
                replaced.add(id(node))
                _count(splits, node, reason, "initializer")
                continue
            try:
                new, source = _decompose(node, work, registry)
            except CannotDecompose as e:
                # Types stop at a node onnx cannot infer (an op newer than the model's opset);
                # once the nodes before this one are split back they flow again: infer, retry.
                if len(replaced) == typed_at or not _untyped([node]):
                    stuck[id(node)] = (node, reason, f"its decomposition does not apply: {e}")
                    continue
                graph.nodes = [n for n in graph.nodes if id(n) not in replaced]
                _ensure_types(work, [node], registry, force=True)
                typed_at = len(replaced)
                try:
                    new, source = _decompose(node, work, registry)
                except CannotDecompose as e2:
                    stuck[id(node)] = (node, reason, f"its decomposition does not apply: {e2}")
                    continue
            if new is None:
                stuck[id(node)] = (node, reason, "")
                continue
            _splice(graph, node, new, names, source)
            created.extend(new)
            replaced.add(id(node))
            _count(splits, node, reason, source)
        graph.nodes = [n for n in graph.nodes if id(n) not in replaced]
        if not replaced:
            break
        remove_dead(graph)
    alive = {id(n) for n in graph.nodes}
    left = [v for k, v in stuck.items() if k in alive]
    if left:
        raise LegalizeError(f"{backend.name} cannot run {len(left)} node(s): " + _describe(left))
    if splits:
        merged = _tidy(work, created, registry)
        graph.toposort()
        total = sum(s.count for s in splits.values())
        work.history.append(LegalizeStats(
            "legalize", before, work.node_count(), time.perf_counter() - start, True,
            {"split_back": total, "rounds": rounds, "merged": merged}, split_back=list(splits.values())))
        logger.info("legalize for %s: %s", backend.name, "; ".join(s.line() for s in splits.values()))
    return work


# ------------------------------------------------------------------ helpers
def _count(splits: dict[tuple[str, str], SplitBack], node: gs.Node, reason: str, source: str) -> None:
    key = (op_label(node), reason)
    if key not in splits:
        splits[key] = SplitBack(key[0], reason, 0, source)
    splits[key].count += 1


def _to_initializer(node: gs.Node) -> bool:
    """A ``Constant`` node a target does not run as a node becomes an initializer (data, not work)."""
    if len(node.outputs) != 1 or not node.outputs[0].name:
        return False
    attrs = node.attrs
    if isinstance(attrs.get("value"), gs.Constant):
        values = np.asarray(attrs["value"].values)
    else:
        for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                           ("value_ints", np.int64)):
            if key in attrs:
                values = np.array(attrs[key], dtype=dtype)
                break
        else:
            return False  # sparse and string constants stay nodes
    out = node.outputs[0]
    node.outputs.clear()
    out.to_constant(values)
    return True


def _ensure_types(model: Model, nodes: list[gs.Node], registry: Registry, *, force: bool = False) -> None:
    """Shape-infer the model when a node to split back has inputs of unknown dtype or rank
    (decompositions and onnx's function builder need them), or when ``force``."""
    if not (force or _untyped(nodes)) or "shape-inference" not in registry.passes:
        return
    try:
        registry.pass_class("shape-inference")().run(model, PassContext())
    except Exception as e:  # a graph onnx cannot infer: decompositions say what they miss
        logger.debug("shape inference before legalization failed: %s", e)


def _untyped(nodes: list[gs.Node]) -> bool:
    """Whether an input of ``nodes`` has an unknown dtype or rank, or an output an unknown dtype."""
    return any(t.name and (t.dtype is None or t.shape is None) and not isinstance(t, gs.Constant)
               for n in nodes for t in n.inputs) or any(t.name and t.dtype is None for n in nodes for t in n.outputs)


def _decompose(node: gs.Node, model: Model, registry: Registry) -> tuple[list[gs.Node] | None, str]:
    entry = registry.decompositions.get((norm_domain(node.domain), node.op))
    if entry is not None:
        before = _links(node)
        try:
            new = entry.obj(node, model)
        except BaseException:
            _unlink_new(node, before)  # a decomposition that gave up half way leaves no nodes behind
            raise
        if new is not None:
            return list(new), entry.plugin
        _unlink_new(node, before)
    expanded = expand_function(node, model)
    if expanded is not None:
        return expanded, "onnx function body"
    if entry is not None:
        raise CannotDecompose(f"the decomposition registered by {entry.plugin!r} does not cover this node")
    return None, ""


def _links(node: gs.Node) -> set[int]:
    """Ids of the nodes attached to ``node``'s tensors now."""
    return {id(n) for t in list(node.inputs) + list(node.outputs) for n in list(t.inputs) + list(t.outputs)}


def _unlink_new(node: gs.Node, before: set[int]) -> None:
    """Detach every node a decomposition attached to ``node``'s tensors (and what hangs off them)."""
    todo = [n for t in list(node.inputs) + list(node.outputs) for n in list(t.inputs) + list(t.outputs)
            if id(n) not in before and n is not node]
    seen: set[int] = set()
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        for t in list(n.inputs) + list(n.outputs):
            todo.extend(m for m in list(t.inputs) + list(t.outputs) if id(m) not in before and m is not node)
        n.inputs.clear()
        n.outputs.clear()


def _splice(graph: gs.Graph, node: gs.Node, new: list[gs.Node], names: Namer, source: str) -> None:
    """Put ``new`` in place of ``node``: same input and output tensors, fresh unique names inside."""
    if not all(isinstance(n, gs.Node) for n in new):
        raise PluginError(f"the decomposition of {op_label(node)} from {source!r} must return a list of nodes")
    boundary_in = {id(t) for t in node.inputs}
    outputs = [t for t in node.outputs if t.name]
    node.inputs.clear()
    node.outputs.clear()
    made = {id(t) for n in new for t in n.outputs}
    for t in outputs:
        used = bool(t.outputs) or any(o is t for o in graph.outputs)
        producers = [p for p in t.inputs if any(p is n for n in new)]
        if used and len(producers) != 1:
            raise PluginError(f"the decomposition of {op_label(node)} ({node.name!r}) from {source!r} produces "
                              f"output {t.name!r} {len(producers)} times, expected once")
    keep = {id(t) for t in outputs} | boundary_in
    for n in new:
        for t in n.inputs:
            if t.name and id(t) not in made and id(t) not in boundary_in and not isinstance(t, gs.Constant):
                raise PluginError(f"the decomposition of {op_label(node)} ({node.name!r}) from {source!r} reads "
                                  f"{t.name!r}, which is neither an input of the node nor made by the decomposition")
    prefix = node.name or node.op
    renamed: set[int] = set()
    for n in new:
        n.name = names(f"{prefix}/{n.name or n.op}")
        for t in list(n.inputs) + list(n.outputs):
            if t.name and id(t) not in keep and id(t) not in renamed:
                renamed.add(id(t))
                t.name = names(t.name if t.name.startswith(prefix + "/") else f"{prefix}/{t.name}")
    graph.nodes.extend(new)


def _tidy(model: Model, created: list[gs.Node], registry: Registry) -> int:
    """Clean up where decompositions meet: reshape chains across two split-back nodes (a
    rotary's output reshaped back to 3-D, then to heads by the attention after it), reshapes
    that provably keep their input's shape, common subexpressions. Returns nodes merged."""
    graph = model.graph
    alive = [n for n in created if n.outputs]
    if any(merge_reshape_chain(n) for n in alive if n.op == "Reshape"):
        remove_dead(graph)
    reshapes = [n for n in alive if n.op == "Reshape" and n.outputs]
    if reshapes:
        _ensure_types(model, reshapes, registry, force=True)
        for n in reshapes:
            if is_noop_reshape(n):
                bypass(graph, n, n.inputs[0], n.outputs[0])
        remove_dead(graph)
    merged = merge_common_subexpressions(graph)
    remove_dead(graph)
    return merged


# ------------------------------------------------------- common subexpressions
def _attr_key(value: Any) -> Any:
    if isinstance(value, gs.Constant):
        v = np.asarray(value.values)
        return ("tensor", v.dtype.str, v.shape, v.tobytes())
    if isinstance(value, gs.Graph):
        raise TypeError("subgraph")
    if isinstance(value, (list, tuple)):
        return tuple(_attr_key(v) for v in value)
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    return value


def _small_constant_key(t: gs.Constant) -> tuple | None:
    v = t._values
    if not isinstance(v, np.ndarray) or v.nbytes > _DEDUPE_CONST_BYTES or v.dtype.kind not in "biuf":
        return None
    return (v.dtype.str, v.shape, v.tobytes())


def merge_common_subexpressions(graph: gs.Graph) -> int:
    """Merge nodes that compute the same thing (same op, attributes and inputs) and small
    constants with the same value. Returns the number of nodes merged away.

    Left alone: nodes with subgraphs, random ops, nodes with an unnamed output and nodes
    whose outputs are graph outputs.
    """
    graph.toposort()
    graph_outputs = {id(t) for t in graph.outputs}
    consts: dict[tuple, gs.Constant] = {}
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant) and (key := _small_constant_key(t)) is not None:
                first = consts.setdefault(key, t)
                if first is not t:
                    node.inputs[i] = first
    seen: dict[tuple, gs.Node] = {}
    merged = 0
    for node in graph.nodes:
        if node.op in _NONDETERMINISTIC or not node.outputs or \
                any(not t.name or id(t) in graph_outputs for t in node.outputs):
            continue
        try:
            attrs = tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items()))
        except TypeError:
            continue
        key = (node.domain or "", node.op, attrs, tuple(id(t) if t.name else None for t in node.inputs),
               len(node.outputs))
        first = seen.setdefault(key, node)
        if first is node:
            continue
        for old, new in zip(node.outputs, first.outputs):
            for consumer in list(old.outputs):
                for i, t in enumerate(consumer.inputs):
                    if t is old:
                        consumer.inputs[i] = new
        node.inputs.clear()
        node.outputs.clear()
        merged += 1
    if merged:
        graph.nodes = [n for n in graph.nodes if n.outputs]
    return merged
