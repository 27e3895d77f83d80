"""RMSNorm fuse: every RMS normalisation becomes a standard ``RMSNormalization`` (opset 23).

Matched variants (the math, not names):

1. square as ``Pow(x, 2)`` or ``Mul(x, x)``; ``ReduceMean`` over the last axis with
   axes as attribute or input;
2. ``x * Reciprocal(Sqrt(mean + eps))``, ``x * 1/Sqrt(...)``, ``x * Pow(mean + eps, -0.5)``,
   ``x / Sqrt(mean + eps)``, multiplications in either order;
3. the weight as ``w * normed`` or ``normed * w``, or Gemma's ``(1 + w)``; none at all
   (scale of ones);
4. Cast/Identity wrappers anywhere between the steps (an fp16 model upcast to fp32 for
   the norm); per-head q/k norms (x of rank 4 normalised over head_dim) are the same pattern.

Not fused: a mean over other axes than the last, a non-constant or wrongly shaped
weight, an epsilon that is not a scalar constant, intermediates used elsewhere. With
``--explain`` each candidate that did not fuse says why.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt._ir import Model
from graphopt._pipeline import PassContext
from graphopt.fusion import FusionPass
from graphopt.pattern import Any, Const, Match, Op, OneOf, Wrapped, const_value, escapes, find
from graphopt.rewrite import fuse, unique_name

OPSET = 23


def _last_axis(node: gs.Node, m: Match) -> str | None:
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        v = const_value(node.inputs[1])
        if v is None:
            return "axes are not constant"
        axes = v.reshape(-1).tolist()
    if axes is None:
        return "reduces over all axes"
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    if list(axes) == [-1] or (rank is not None and list(axes) == [rank - 1]):
        return None if int(node.attrs.get("keepdims", 1)) == 1 else "keepdims=0"
    return f"reduces over axes {list(axes)}, not the last one"


def _patterns():
    x = Any("x")
    square = Wrapped(OneOf(Op("Pow", x, Const(value=2.0)), Op("Mul", x, x)))
    mean = Op("ReduceMean", square, extra_inputs=True, check=_last_axis)
    var = Wrapped(Op("Add", Wrapped(mean), Const("eps", scalar=True)))
    sqrt = Wrapped(Op("Sqrt", var))
    inv = OneOf(Op("Reciprocal", sqrt), Op("Div", Const(value=1.0), sqrt), Op("Pow", var, Const(value=-0.5)))
    normed = OneOf(Op("Mul", Wrapped(x), Wrapped(inv)), Op("Div", Wrapped(x), sqrt))
    weight = OneOf(Op("Add", Const("w_gemma"), Const(value=1.0)), Const("w"))
    scaled = Op("Mul", Wrapped(normed, name="casts"), weight)
    return [("rmsnorm", scaled), ("rmsnorm-unscaled", normed)]


PATTERNS = _patterns()


def _check(m: Match, root: gs.Tensor, graph: gs.Graph) -> tuple[np.ndarray | None, str | None]:
    x = m["x"]
    eps = float(m["eps.value"].reshape(-1)[0])
    if not 0 <= eps < 1:
        return None, f"epsilon {eps} is not a small non-negative number"
    if "w_gemma.value" in m.bindings:
        w = 1.0 + m["w_gemma.value"].astype(np.float64)
    elif "w.value" in m.bindings:
        w = m["w.value"]
    else:
        w = None
    dim = x.shape[-1] if x.shape else None
    if w is not None:
        if w.ndim > 1 and any(d != 1 for d in w.shape[:-1]):
            return None, f"weight of shape {list(w.shape)} is not per-channel"
        if isinstance(dim, int) and w.size != dim:
            return None, f"weight has {w.size} elements, the normalised axis {dim}"
        w = w.reshape(-1)
    elif not isinstance(dim, int):
        return None, "unscaled norm over an axis of unknown size"
    reason = escapes(m, root, graph)
    if reason:
        return None, reason
    return w, None


class RMSNormFuse(FusionPass):
    name = "rmsnorm-fuse"
    summary = "fuse RMS normalisations into standard RMSNormalization (opset 23)"
    after = ("shape-inference", "constant-folding", "cast-cleanup", "identity-elimination")
    before = ("attention-fuse", "dead-code-elimination")
    emits = ("RMSNormalization",)
    opset = OPSET

    def scan(self, model: Model, ctx: PassContext, *, rewrite: bool) -> dict[str, int]:
        graph = model.graph
        graph.toposort()
        counts: dict[str, int] = {}
        outputs = {id(t) for t in graph.outputs}
        for node in reversed(list(graph.nodes)):  # outermost first: a weighted norm before its inner part
            if node.op not in ("Mul", "Div") or not node.outputs:
                continue
            root = node.outputs[0]
            if not root.outputs and id(root) not in outputs:
                continue  # dead, e.g. the inside of a norm fused a moment ago
            first_reason = None
            for rule, pattern in PATTERNS:
                m, why = find(pattern, root)
                if m is None:
                    first_reason = first_reason or why
                    continue
                w, why = _check(m, root, graph)
                if why:
                    first_reason = why
                    break
                counts[rule] = counts.get(rule, 0) + 1
                if not rewrite:
                    return counts
                self._rewrite(graph, m, root, w, rule)
                first_reason = None
                break
            if first_reason and ctx.explain and rewrite and _looks_like_norm(node):
                ctx.notes.append(f"rmsnorm-fuse: {node.name!r} not fused: {first_reason}")
        return counts

    @staticmethod
    def _rewrite(graph: gs.Graph, m: Match, root: gs.Tensor, w: np.ndarray | None, rule: str) -> None:
        x = m["x"]
        dtype = np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.float32)
        dim = x.shape[-1]
        scale = (w if w is not None else np.ones(dim)).astype(dtype)
        scale_t = gs.Constant(unique_name(graph, f"{root.name}_scale"), np.ascontiguousarray(scale))
        eps = float(m["eps.value"].reshape(-1)[0])
        out = root
        casts = m.get("casts") or []
        needs_cast = root.dtype is not None and x.dtype is not None and np.dtype(root.dtype) != dtype
        if needs_cast:  # x is wider than the result (fp16 model normalised in fp32): cast after
            out = gs.Variable(unique_name(graph, f"{root.name}_rms"), dtype, root.shape)
        node = gs.Node("RMSNormalization", unique_name(graph, f"RMSNormalization_{root.name}"),
                       attrs={"axis": -1, "epsilon": eps, "stash_type": 1}, inputs=[x, scale_t])
        fuse(graph, [root], node, rule, replaced=m.nodes)
        if needs_cast:
            node.outputs = [out]
            cast_to = casts[-1].attrs["to"] if casts else None
            cast = gs.Node("Cast", unique_name(graph, f"Cast_{root.name}"), attrs={"to": cast_to}, inputs=[out],
                           outputs=[root])
            graph.nodes.append(cast)


def _looks_like_norm(node: gs.Node) -> bool:
    """Cheap filter for --explain: a Mul/Div within six producer hops of a ReduceMean."""
    frontier = [t for t in node.inputs]
    for _ in range(6):
        nxt = []
        for t in frontier:
            for p in t.inputs:
                if p.op == "ReduceMean":
                    return True
                nxt.extend(p.inputs)
        frontier = nxt
    return False
