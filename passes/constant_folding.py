"""Constant folding, bounded by tensor size.

1. ``Constant`` nodes become initializers.
2. A node whose inputs are all constants is evaluated once (onnx's reference
   implementation, so every standard op folds exactly as the spec says) and its
   outputs become initializers — if each output is at most ``fold_max_bytes``
   (default 4 MiB) and no input exceeds ``fold_max_input_bytes`` (default 64 MiB,
   so weights are never materialised to fold, e.g., a transpose of the LM head).
3. ``Shape``/``Size`` of a tensor whose shape is fully static fold to constants, and so
   does ``Gather(Shape(x), i)`` when the dims it picks are static (TorchScript exports
   compute head sizes that way).

Not folded: a result about as large as a weight that other nodes also read (folding
``Transpose(W)`` of a tied embedding would store it twice), random ops, ops with subgraphs, ops in non-standard domains, nodes
whose outputs are graph outputs, and results numpy cannot represent exactly
(bfloat16, float8, 4-bit).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.reference import ReferenceEvaluator

from graphopt._ir import Model
from graphopt._pipeline import Pass, PassContext, PassResult
from graphopt.rewrite import is_standard, remove_dead

logger = logging.getLogger(__name__)

NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                    "Multinomial", "Bernoulli"}
#: Folding these would undo quantization (materialise the float weight).
KEEP = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"}
_STANDARD_KINDS = set("biuf")


def _exact_numpy(arr: np.ndarray) -> bool:
    return isinstance(arr, np.ndarray) and arr.dtype.kind in _STANDARD_KINDS and arr.dtype.names is None \
        and arr.dtype.type.__module__ == "numpy"


def _static_shape(t: gs.Tensor) -> list[int] | None:
    if t.shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in t.shape):
        return None
    return [int(d) for d in t.shape]


def _const_nbytes(t: gs.Constant) -> int:
    v = t._values
    return int(getattr(v, "nbytes", 0) or np.asarray(v).nbytes)


class ConstantFolding(Pass):
    name = "constant-folding"
    summary = "evaluate nodes whose inputs are all constants (bounded output size)"
    after = ("shape-inference", "identity-elimination")
    before = ("dead-code-elimination",)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        max_bytes = int(ctx.option("fold_max_bytes", 4 * 2**20))
        max_in = int(ctx.option("fold_max_input_bytes", 64 * 2**20))
        graph = model.graph
        graph.toposort()
        outputs = {id(t) for t in graph.outputs}
        counts = {"folded": 0, "shape_folded": 0, "constant_nodes": 0, "skipped_too_large": 0, "skipped_shared": 0,
                  "failed": 0}
        for node in list(graph.nodes):
            if not node.outputs or any(id(t) in outputs for t in node.outputs):
                continue
            if is_standard(node, "Constant"):
                if self._fold_constant_node(node):
                    counts["constant_nodes"] += 1
                continue
            if is_standard(node, "Shape", "Size"):
                if self._fold_shape(node):
                    counts["shape_folded"] += 1
                    continue
            if is_standard(node, "Gather") and self._fold_gathered_dims(node):
                counts["shape_folded"] += 1
                continue
            if not self._foldable(node):
                continue
            if any(_const_nbytes(t) > max_in for t in node.inputs if t.name):
                counts["skipped_too_large"] += 1
                continue
            try:
                results = self._evaluate(node, model)
            except Exception as e:  # unsupported by the reference or a bad graph: leave it
                counts["failed"] += 1
                logger.debug("cannot fold %s (%s): %s", node.name, node.op, e)
                if ctx.explain:
                    ctx.notes.append(f"constant-folding: {node.name} ({node.op}) not folded: {e}")
                continue
            if any(not _exact_numpy(r) for r in results):
                continue
            if any(r.nbytes > max_bytes for r in results):
                counts["skipped_too_large"] += 1
                continue
            if self._duplicates_shared_weight(node, results):
                counts["skipped_shared"] += 1
                continue
            for out, value in zip(node.outputs, results):
                out.to_constant(np.array(value))  # a copy; keeps 0-d shapes (ascontiguousarray would not)
            node.outputs.clear()
            counts["folded"] += 1
        if any(counts[k] for k in ("folded", "shape_folded", "constant_nodes")):
            remove_dead(graph)
            return PassResult(True, counts)
        return PassResult(False, counts)

    @staticmethod
    def _duplicates_shared_weight(node: gs.Node, results: list[np.ndarray]) -> bool:
        """Folding ``Transpose(W)`` (or a Cast, Reshape…) of a weight that other nodes also read
        would store it twice — the tied LM head of a dynamo export is exactly that."""
        size = max((r.nbytes for r in results), default=0)
        for t in node.inputs:
            if isinstance(t, gs.Constant) and len(t.outputs) > 1 and size >= _const_nbytes(t) // 2 >= 1024:
                return True
        return False

    @staticmethod
    def _foldable(node: gs.Node) -> bool:
        if not is_standard(node) or node.op in NONDETERMINISTIC or node.op in KEEP:
            return False
        if any(isinstance(a, gs.Graph) for a in node.attrs.values()):
            return False
        return bool(node.inputs) and all(isinstance(t, gs.Constant) or not t.name for t in node.inputs)

    @staticmethod
    def _fold_constant_node(node: gs.Node) -> bool:
        attrs = node.attrs
        if "value" in attrs and isinstance(attrs["value"], gs.Constant):
            values = attrs["value"].values
        else:
            for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
                if key in attrs:
                    values = np.array(attrs[key], dtype=dtype)
                    break
            else:
                for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
                    if key in attrs:
                        values = np.array(attrs[key], dtype=dtype)
                        break
                else:
                    return False  # sparse or string constants stay as they are
        if not _exact_numpy(np.asarray(values)):
            return False
        node.outputs[0].to_constant(np.asarray(values))
        node.outputs.clear()
        return True

    @staticmethod
    def _fold_shape(node: gs.Node) -> bool:
        shape = _static_shape(node.inputs[0])
        if shape is None:
            return False
        if node.op == "Size":
            value = np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
        else:
            rank = len(shape)
            start = int(node.attrs.get("start", 0))
            end = int(node.attrs.get("end", rank))
            start = min(max(start + rank if start < 0 else start, 0), rank)
            end = min(max(end + rank if end < 0 else end, 0), rank)
            value = np.array(shape[start:end], dtype=np.int64)
        node.outputs[0].to_constant(value)
        node.outputs.clear()
        return True

    @staticmethod
    def _fold_gathered_dims(node: gs.Node) -> bool:
        """``Gather(Shape(x), i)`` where the gathered dims of x are static (the rest may not be)."""
        data, idx = node.inputs[0], node.inputs[1]
        shape_node = data.inputs[0] if len(data.inputs) == 1 else None
        if shape_node is None or not is_standard(shape_node, "Shape") or not isinstance(idx, gs.Constant):
            return False
        dims = shape_node.inputs[0].shape
        if dims is None:
            return False
        rank = len(dims)
        start = int(shape_node.attrs.get("start", 0))
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = shape_node.attrs.get("end", rank)
        end = min(max(int(end) + rank if int(end) < 0 else int(end), 0), rank)
        visible = list(dims[start:end])
        picked = np.asarray(idx.values).astype(np.int64)
        flat = [visible[int(i)] if -len(visible) <= int(i) < len(visible) else None for i in picked.reshape(-1)]
        if any(not isinstance(d, (int, np.integer)) or d < 0 for d in flat):
            return False
        node.outputs[0].to_constant(np.array(flat, dtype=np.int64).reshape(picked.shape))
        node.outputs.clear()
        return True

    @staticmethod
    def _evaluate(node: gs.Node, model: Model) -> list[np.ndarray]:
        names = [f"in{i}" if t.name else "" for i, t in enumerate(node.inputs)]
        attrs = {}
        for k, v in node.attrs.items():
            attrs[k] = onnx.numpy_helper.from_array(np.asarray(v.values), k) if isinstance(v, gs.Constant) else v
        proto = onnx.helper.make_node(node.op, names, [f"out{i}" for i in range(len(node.outputs))],
                                      domain=node.domain or "", **attrs)
        feeds = {n: np.asarray(t.values) for n, t in zip(names, node.inputs) if n}
        opsets = {d or "": v for d, v in model.opset_imports.items()}
        results = ReferenceEvaluator(proto, opsets=opsets).run(None, feeds)
        return [np.asarray(r) for r in results]
