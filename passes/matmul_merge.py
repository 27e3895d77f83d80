"""Merge MatMuls that read the same input: Q/K/V projections, an MLP's gate and up.

``MatMul(x, W1) … MatMul(x, Wn)`` with constant ``Wi`` [K, Ni] becomes one
``MatMul(x, Concat(W1 … Wn))`` [K, ΣNi] followed by one ``Split`` on the last axis
(and a bias ``Add`` each, if the projections had constant biases, merged the same
way before the Split). A decode step then streams the same weight bytes in fewer,
wider matrix-vector products, which BLAS runs closer to memory bandwidth, and the
graph has fewer nodes.

Runs after the fusions (they match the unmerged projections) and before
quantization (the merged weight is quantized as one, block-wise along K, which is
the same as quantizing the parts). Weights are merged only when all are float
constants of the same dtype and K, used by nothing else.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from graphopt._ir import ConcatValues, Model
from graphopt._pipeline import Pass, PassContext, PassResult
from graphopt.pattern import const_value
from graphopt.rewrite import naming_scope, remove_dead, unique_name


def _bias(mm: gs.Node) -> tuple[gs.Node, np.ndarray] | None:
    """The ``Add(y, b)`` right after the MatMul with a constant 1-D bias, if that is its only use."""
    users = mm.outputs[0].outputs
    if len(users) != 1 or users[0].op != "Add":
        return None
    add = users[0]
    other = add.inputs[1] if add.inputs[0] is mm.outputs[0] else add.inputs[0]
    value = const_value(other)
    if value is None or value.ndim != 1 or value.shape[0] != mm.inputs[1].shape[1]:
        return None
    return add, value


class MatMulMerge(Pass):
    name = "matmul-merge"
    summary = "merge MatMuls that share their input (Q/K/V, gate/up) into one wider MatMul + Split"
    after = ("attention-fuse", "rmsnorm-fuse", "tie-embedding-dedupe", "constant-folding")
    before = ("quantize", "dead-code-elimination")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        groups: dict[int, list[gs.Node]] = defaultdict(list)
        for node in graph.nodes:
            if node.op != "MatMul" or len(node.inputs) != 2:
                continue
            w = node.inputs[1]
            if isinstance(w, gs.Constant) and len(w.shape) == 2 and len(w.outputs) == 1 and \
                    np.dtype(w.dtype).kind == "f":
                groups[id(node.inputs[0])].append(node)
        merged = removed = 0
        with naming_scope(graph):
            for nodes in groups.values():
                by_key: dict[tuple, list[gs.Node]] = defaultdict(list)
                for n in nodes:
                    by_key[(str(n.inputs[1].dtype), n.inputs[1].shape[0])].append(n)
                for group in by_key.values():
                    if len(group) < 2:
                        continue
                    self._merge(graph, group)
                    merged += 1
                    removed += len(group) - 1
        if merged:
            remove_dead(graph)
        return PassResult(merged > 0, {"merged_groups": merged, "matmuls_removed": removed})

    @staticmethod
    def _merge(graph: gs.Graph, group: list[gs.Node]) -> None:
        x = group[0].inputs[0]
        widths = [n.inputs[1].shape[1] for n in group]
        biases = [_bias(n) for n in group]
        use_bias = all(b is not None for b in biases)
        base = group[0].inputs[1].name
        name = unique_name(graph, f"{base}_merged")
        # the merged weight keeps its parts: joined only when read or saved, never loaded here
        merged = ConcatValues(name, [n.inputs[1]._values for n in group])
        w = gs.Constant(name, merged)
        dtype = np.dtype(merged.dtype)
        y = gs.Variable(unique_name(graph, f"{base}_merged_out"), dtype, None)
        mm = gs.Node("MatMul", unique_name(graph, f"MatMul_{base}_merged"), inputs=[x, w], outputs=[y])
        mm.meta = {"graphopt.rule": f"matmul-merge-{len(group)}"}
        graph.nodes.append(mm)
        if use_bias:
            b = gs.Constant(unique_name(graph, f"{base}_merged_bias"),
                            np.concatenate([bv for _, bv in biases]).astype(dtype))
            yb = gs.Variable(unique_name(graph, f"{base}_merged_biased"), dtype, None)
            graph.nodes.append(gs.Node("Add", unique_name(graph, f"Add_{base}_merged"), inputs=[y, b], outputs=[yb]))
            y = yb
        outs = []
        for n, bias in zip(group, biases):
            target = bias[0].outputs[0] if use_bias else n.outputs[0]
            (bias[0] if use_bias else n).outputs = []  # the old producer lets go of the tensor
            outs.append(target)
        split = gs.Constant(unique_name(graph, f"{base}_merged_split"), np.array(widths, np.int64))
        node = gs.Node("Split", unique_name(graph, f"Split_{base}_merged"), attrs={"axis": -1},
                       inputs=[y, split], outputs=outs)
        graph.nodes.append(node)
