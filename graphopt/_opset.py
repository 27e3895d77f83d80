"""Raising a model's default opset so it can carry opset-23 fused ops.

Decision (issue 4): fused results are *standard* ops (``RMSNormalization``,
``RotaryEmbedding``, ``Attention`` of opset 23), so a model exported at an
older opset is upgraded with onnx's version converter, which rewrites every
other op through its per-version adapters (e.g. ReduceMean's ``axes``
attribute becoming an input at 18). This keeps optimized models portable: they
run in stock onnxruntime and any runtime that implements opset 23, with no
custom domain. The conversion runs on a weightless copy of the graph (weights
become typed inputs and are re-attached afterwards, still lazy), so it costs
the same for any model size. A model the converter cannot upgrade is left as it
was and the fusion is skipped, with the converter's reason.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs
from onnx import version_converter

from graphopt._errors import GraphoptError
from graphopt._ir import Model

#: Minimum IR version for each opset graphopt may raise a model to.
IR_FOR_OPSET = {21: 10, 22: 10, 23: 11, 24: 11, 25: 11}


def upgrade_opset(model: Model, version: int) -> bool:
    """Raise ``model``'s default opset to ``version`` in place. Returns False if it was already there."""
    current = model.opset("") or 1
    if current >= version:
        return False
    proto = model.to_onnx_without_weights()
    moved = {t.name for t in proto.graph.input} - {t.name for t in model.graph.inputs}
    try:
        converted = version_converter.convert_version(proto, version)
    except Exception as e:  # the converter raises RuntimeError/ValueError/C++ errors
        raise GraphoptError(f"cannot upgrade the model from opset {current} to {version}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
    converted.ir_version = max(converted.ir_version, IR_FOR_OPSET.get(version, converted.ir_version))
    if _same_graph(proto.graph, converted.graph):  # every adapter was a no-op: keep the graph as it is
        model.graph.opset = version
    else:
        constants = model.constants()
        upgraded = Model.from_proto(converted)
        tensors = upgraded.graph.tensors()
        for name in moved:  # re-attach the weights, still lazy
            t = tensors.get(name)
            if t is None:
                continue  # the converter dropped a use; the weight is dead
            if isinstance(t, gs.Variable):
                t.to_constant(constants[name]._values)
        upgraded.graph.inputs = [t for t in upgraded.graph.inputs if t.name not in moved]
        model.graph = upgraded.graph
    model.opset_imports = {**model.opset_imports, **{o.domain: o.version for o in converted.opset_import}}
    model.opset_imports[""] = version
    model.ir_version = converted.ir_version
    return True


def _same_graph(a, b) -> bool:
    """The converter left nodes, initializers and the graph's input/output names as they were
    (it may only have inferred shapes)."""
    return (list(a.node) == list(b.node) and list(a.initializer) == list(b.initializer)
            and [v.name for v in a.input] == [v.name for v in b.input]
            and [v.name for v in a.output] == [v.name for v in b.output])


def ensure_opset(model: Model, version: int) -> str | None:
    """Upgrade if needed; the reason as a string when impossible (None on success)."""
    try:
        upgrade_opset(model, version)
    except GraphoptError as e:
        return str(e)
    return None


__all__ = ["IR_FOR_OPSET", "ensure_opset", "upgrade_opset"]
