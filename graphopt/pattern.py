"""A small declarative pattern matcher that every fusion pass uses.

Patterns describe the math, never tensor names. They are matched from an
output tensor upwards (towards producers)::

    x = Any("x")
    square = OneOf(Op("Pow", x, Const(value=2.0)), Op("Mul", x, x))
    mean = Op("ReduceMean", square, axes=Axes(-1))

Features:

- commutative ops (Add, Mul, Max, Min, And, Or, Equal, Sum) try both input orders;
- ``Wrapped(p)`` skips optional ``Cast``/``Identity`` wrappers (and
  ``Unsqueeze``/``Squeeze`` of scalars) above ``p``;
- ``Const(value=…)`` checks a constant's value within a tolerance, whether it is
  an initializer or a ``Constant`` node;
- a name bound twice must bind the same tensor (``Op("Mul", x, x)``);
- ``Op(..., name="n")`` binds the node as well;
- every failure records *why* (the deepest one wins), so ``--explain`` can say
  "expected ReduceMean at 'mean_1', found ReduceSum".

A match is a :class:`Match`: the bindings plus the nodes it covers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any as AnyT

import numpy as np
import onnx_graphsurgeon as gs

COMMUTATIVE = {"Add", "Mul", "Max", "Min", "And", "Or", "Equal", "Sum", "Xor"}


@dataclass
class Match:
    bindings: dict[str, AnyT] = field(default_factory=dict)
    nodes: list[gs.Node] = field(default_factory=list)

    def __getitem__(self, key: str) -> AnyT:
        return self.bindings[key]

    def get(self, key: str, default=None):
        return self.bindings.get(key, default)

    def extend(self, **kw) -> Match:
        return Match({**self.bindings, **kw}, list(self.nodes))

    def with_node(self, node: gs.Node) -> Match:
        return Match(dict(self.bindings), self.nodes + [node])


class Trace:
    """Remembers the deepest failure of a match attempt."""

    def __init__(self):
        self.depth = -1
        self.reason = "no match"

    def fail(self, depth: int, reason: str) -> None:
        if depth >= self.depth:
            self.depth, self.reason = depth, reason


def _tname(t: gs.Tensor) -> str:
    return repr(t.name) if t.name else "<anonymous>"


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 else None


def const_value(t: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor: an initializer or a ``Constant`` node's output."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    node = producer(t)
    if node is not None and node.op == "Constant" and "value" in node.attrs:
        v = node.attrs["value"]
        return np.asarray(v.values if isinstance(v, gs.Constant) else v)
    return None


class Pattern:
    def match(self, t: gs.Tensor, m: Match, trace: Trace, depth: int = 0) -> Iterator[Match]:
        raise NotImplementedError


class Any(Pattern):
    """Any tensor; with a name, binds it (the same name must bind the same tensor)."""

    def __init__(self, name: str | None = None, check: Callable[[gs.Tensor], str | None] | None = None):
        self.name, self.check = name, check

    def match(self, t, m, trace, depth=0):
        if self.check is not None:
            reason = self.check(t)
            if reason:
                trace.fail(depth, f"{_tname(t)}: {reason}")
                return
        if self.name is None:
            yield m
        elif self.name in m.bindings:
            if m.bindings[self.name] is t:
                yield m
            else:
                trace.fail(depth, f"{_tname(t)} should be the same tensor as {_tname(m.bindings[self.name])}")
        else:
            yield m.extend(**{self.name: t})


class Const(Pattern):
    """A constant; ``value`` (scalar) checks every element within ``tol``; ``scalar`` needs one element."""

    def __init__(self, name: str | None = None, value: float | None = None, tol: float = 1e-6,
                 scalar: bool = False):
        self.name, self.value, self.tol, self.scalar = name, value, tol, scalar

    def match(self, t, m, trace, depth=0):
        v = const_value(t)
        if v is None:
            trace.fail(depth, f"{_tname(t)} should be a constant")
            return
        if (self.scalar or self.value is not None) and v.size != 1:
            trace.fail(depth, f"{_tname(t)} should be a scalar constant, has shape {list(v.shape)}")
            return
        if self.value is not None and not np.allclose(v.astype(np.float64), self.value, atol=self.tol, rtol=0):
            trace.fail(depth, f"{_tname(t)} should be {self.value}, is {v.reshape(-1)[0]}")
            return
        if self.name is not None:
            yield m.extend(**{self.name: t, self.name + ".value": v})
        else:
            yield m


class Op(Pattern):
    """A tensor produced by ``op_type`` (one of several if a tuple) whose inputs match ``inputs``.

    ``attrs`` maps attribute names to expected values or predicates ``f(value) -> bool``.
    ``output`` is which output of the node the tensor must be. ``extra_inputs`` allows the
    node to have more inputs than patterns given (e.g. optional ones).
    """

    def __init__(self, op_type: str | tuple[str, ...], *inputs: Pattern, name: str | None = None,
                 commutative: bool | None = None, output: int = 0, extra_inputs: bool = False,
                 check: Callable[[gs.Node, Match], str | None] | None = None, **attrs):
        self.ops = (op_type,) if isinstance(op_type, str) else tuple(op_type)
        self.inputs, self.name, self.output, self.extra_inputs = inputs, name, output, extra_inputs
        self.commutative = commutative if commutative is not None else all(o in COMMUTATIVE for o in self.ops)
        self.attrs, self.check = attrs, check

    def match(self, t, m, trace, depth=0):
        node = producer(t)
        want = "/".join(self.ops)
        if node is None:
            trace.fail(depth, f"expected {want} producing {_tname(t)}, found a graph input or constant")
            return
        if node.op not in self.ops or (node.domain or "") not in ("", "ai.onnx"):
            trace.fail(depth, f"expected {want} producing {_tname(t)}, found {node.op}")
            return
        if node.outputs.index(t) != self.output:
            trace.fail(depth, f"{_tname(t)} is output {node.outputs.index(t)} of {node.op}, expected {self.output}")
            return
        for key, expected in self.attrs.items():
            value = node.attrs.get(key)
            ok = expected(value) if callable(expected) else value == expected
            if not ok:
                trace.fail(depth, f"{node.op} {node.name!r}: attribute {key}={value!r} does not match")
                return
        n_in = len(node.inputs)
        if n_in < len(self.inputs) or (n_in > len(self.inputs) and not self.extra_inputs):
            trace.fail(depth, f"{node.op} {node.name!r} has {n_in} inputs, expected {len(self.inputs)}")
            return
        if self.name is not None and self.name in m.bindings and m.bindings[self.name] is not node:
            trace.fail(depth, f"{node.op} {node.name!r} should be the node bound to {self.name!r}")
            return
        base = m.with_node(node) if node not in m.nodes else m
        if self.name is not None:
            base = base.extend(**{self.name: node})
        orders = [list(node.inputs[: len(self.inputs)])]
        if self.commutative and len(self.inputs) == 2:
            orders.append(orders[0][::-1])
        for order in orders:
            yield from self._inputs(node, order, 0, base, trace, depth + 1)

    def _inputs(self, node, tensors, i, m, trace, depth):
        if i == len(self.inputs):
            if self.check is not None:
                reason = self.check(node, m)
                if reason:  # every input matched: this got further than a sibling's failure
                    trace.fail(depth + 1, f"{node.op} {node.name!r}: {reason}")
                    return
            yield m
            return
        for m2 in self.inputs[i].match(tensors[i], m, trace, depth):
            yield from self._inputs(node, tensors, i + 1, m2, trace, depth)


class OneOf(Pattern):
    """The first alternatives that match (all are tried, in order)."""

    def __init__(self, *alternatives: Pattern):
        self.alternatives = alternatives

    def match(self, t, m, trace, depth=0):
        for alt in self.alternatives:
            yield from alt.match(t, m, trace, depth)


def _is_scalar_reshape(node: gs.Node) -> bool:
    if node.op not in ("Unsqueeze", "Squeeze"):
        return False
    src = node.inputs[0]
    shape = src.shape
    return shape is not None and all(isinstance(d, int) and d == 1 for d in shape)


class Wrapped(Pattern):
    """``inner``, possibly under Cast/Identity (and Unsqueeze/Squeeze of one-element tensors).

    With ``name``, binds the outermost wrapper's input chain's dtype-changing casts list
    (``name`` → list of Cast nodes skipped) so a rewrite can restore dtypes.
    """

    def __init__(self, inner: Pattern, ops: tuple[str, ...] = ("Cast", "Identity"), name: str | None = None):
        self.inner, self.ops, self.name = inner, ops, name

    def match(self, t, m, trace, depth=0):
        skipped: list[gs.Node] = []
        current = t
        while True:
            m2 = m.extend(**{self.name: list(skipped)}) if self.name else m
            for n in skipped:
                m2 = m2.with_node(n)
            yield from self.inner.match(current, m2, trace, depth)
            node = producer(current)
            if node is None or not node.inputs:
                return
            if node.op in self.ops or _is_scalar_reshape(node):
                skipped.append(node)
                current = node.inputs[0]
            else:
                return


def find(pattern: Pattern, t: gs.Tensor) -> tuple[Match | None, str]:
    """The first match of ``pattern`` at ``t``, or None and the reason."""
    trace = Trace()
    for m in pattern.match(t, Match(), trace):
        return m, ""
    return None, trace.reason


def escapes(match: Match, root: gs.Tensor, graph: gs.Graph, keep: tuple[gs.Tensor, ...] = ()) -> str | None:
    """Reason if a tensor computed inside the match (other than ``root`` and ``keep``) is used
    outside it or is a graph output: fusing would then have to keep computing it."""
    inside = {id(n) for n in match.nodes}
    outputs = {id(t) for t in graph.outputs}
    allowed = {id(root)} | {id(t) for t in keep}
    for node in match.nodes:
        for out in node.outputs:
            if id(out) in allowed:
                continue
            if id(out) in outputs:
                return f"{_tname(out)} is a graph output"
            for consumer in out.outputs:
                if id(consumer) not in inside and not _feeds_only(consumer, inside, outputs):
                    return f"{_tname(out)} is also used by {consumer.op} {consumer.name!r}"
    return None


def _feeds_only(node: gs.Node, inside: set[int], outputs: set[int], depth: int = 8) -> bool:
    """Whether everything ``node`` computes is read only by the matched nodes (e.g. a Shape
    of an intermediate that builds a reshape target inside the match): it dies with them."""
    if depth == 0:
        return False
    for out in node.outputs:
        if id(out) in outputs:
            return False
        for consumer in out.outputs:
            if id(consumer) not in inside and not _feeds_only(consumer, inside, outputs, depth - 1):
                return False
    return True
