"""Dead-code and identity elimination."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt._ir import Model
from graphopt._pipeline import Pass, PassContext, PassResult
from graphopt.rewrite import bypass, remove_dead


class DeadCodeElimination(Pass):
    """Removes nodes and initializers no graph output depends on.

    Graph inputs are kept even when unused (removing one would change the
    model's interface). Runs last so it sweeps up after every other pass.
    """

    name = "dead-code-elimination"
    summary = "remove nodes and initializers that no graph output depends on"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        nodes, consts = remove_dead(model.graph)
        return PassResult(bool(nodes or consts), {"nodes_removed": nodes, "initializers_removed": consts})


def _is_inference_dropout(node: gs.Node) -> bool:
    if node.op != "Dropout":
        return False
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        return False  # the mask is used
    if len(node.inputs) >= 3 and node.inputs[2].name:
        training = node.inputs[2]
        if not isinstance(training, gs.Constant) or bool(np.asarray(training.values).any()):
            return False
    return True


def _single_input_variadic(node: gs.Node) -> bool:
    """``Concat``/``Sum``/``Max``/``Min``/``Mean`` of one input copy it (TorchScript emits these)."""
    return node.op in ("Concat", "Sum", "Max", "Min", "Mean") and (node.domain or "") in ("", "ai.onnx") \
        and len(node.inputs) == 1 and len(node.outputs) == 1


class IdentityElimination(Pass):
    """Removes ``Identity`` nodes, ``Dropout`` in inference mode and single-input ``Concat``/``Sum``/…

    1. ``y = Identity(x)``: consumers of y read x.
    2. When y is a graph output, x is renamed to y so the interface keeps its name.
    3. Kept: an Identity that copies a graph input or a constant straight to a graph
       output (there is nothing to rename).
    """

    name = "identity-elimination"
    summary = "remove Identity nodes and inference-mode Dropout"
    before = ("dead-code-elimination",)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        removed = kept = 0
        for node in list(model.graph.nodes):
            if node.op == "Identity" or _is_inference_dropout(node) or _single_input_variadic(node):
                if not node.inputs or not node.outputs:
                    continue
                if bypass(model.graph, node, node.inputs[0], node.outputs[0]):
                    removed += 1
                else:
                    kept += 1
        if removed:
            remove_dead(model.graph)
        return PassResult(removed > 0, {"removed": removed, "kept_at_boundary": kept})
