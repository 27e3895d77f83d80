"""graphopt plugin: remove Casts that cannot change a value."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

import graphopt
from graphopt.rewrite import bypass, is_standard, remove_dead

# (from, to) pairs where every value of `from` is exactly representable in `to`.
_EXACT = {
    ("float16", "float32"), ("float16", "float64"), ("float32", "float64"),
    ("int8", "int16"), ("int8", "int32"), ("int8", "int64"), ("int16", "int32"), ("int16", "int64"),
    ("int32", "int64"), ("uint8", "int16"), ("uint8", "int32"), ("uint8", "int64"), ("uint8", "uint16"),
    ("uint8", "uint32"), ("uint8", "uint64"), ("uint16", "int32"), ("uint16", "int64"), ("uint16", "uint32"),
    ("uint16", "uint64"), ("uint32", "int64"), ("uint32", "uint64"),
    ("bool", "int8"), ("bool", "int16"), ("bool", "int32"), ("bool", "int64"), ("bool", "uint8"),
    ("bool", "float16"), ("bool", "float32"), ("bool", "float64"),
}


def _name(dtype) -> str | None:
    if dtype is None:
        return None
    try:
        if isinstance(dtype, (int, np.integer)):
            dtype = onnx.helper.tensor_dtype_to_np_dtype(int(dtype))
        return np.dtype(dtype).name
    except (TypeError, KeyError, ValueError):
        return None


def _cast_to(node: gs.Node) -> str | None:
    return _name(node.attrs.get("to")) if is_standard(node, "Cast") else None


class CastCleanup(graphopt.Pass):
    """Removes no-op Casts and collapses lossless Cast round trips.

    Needs dtypes on tensors, so it runs after shape inference. Casts whose input
    type is unknown are left alone.
    """

    name = "cast-cleanup"
    summary = "remove no-op Casts and collapse lossless Cast chains"
    after = ("shape-inference",)
    before = ("dead-code-elimination",)

    def run(self, model, ctx):
        graph = model.graph
        graph.toposort()
        noop = collapsed = 0
        for node in list(graph.nodes):
            to = _cast_to(node)
            if to is None or not node.inputs or not node.outputs:
                continue
            src = node.inputs[0]
            src_type = _name(src.dtype)
            inner = src.inputs[0] if len(src.inputs) == 1 else None
            if src_type == to:
                if bypass(graph, node, src, node.outputs[0]):
                    noop += 1
                continue
            if inner is not None and _cast_to(inner) is not None and not any(t is src for t in graph.outputs):
                origin = inner.inputs[0]
                origin_type = _name(origin.dtype)
                if origin_type is None or (origin_type, _cast_to(inner)) not in _EXACT:
                    continue
                if origin_type == to:
                    if bypass(graph, node, origin, node.outputs[0]):
                        collapsed += 1
                else:
                    node.inputs[0] = origin
                    collapsed += 1
        if noop or collapsed:
            remove_dead(graph)
        return graphopt.PassResult(bool(noop or collapsed), {"noop_removed": noop, "chains_collapsed": collapsed})


@graphopt.hookimpl
def graphopt_register_passes(register):
    register(CastCleanup)
