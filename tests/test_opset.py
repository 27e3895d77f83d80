"""Raising a model's default opset (graphopt._opset)."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from graphopt._ir import Model
from graphopt._opset import upgrade_opset


def _model(opset: int, reduce_axes_attr: bool) -> Model:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) / 10, "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Relu", ["y"], ["r"])]
    if reduce_axes_attr:  # ReduceMean-13: axes an attribute; from opset 18 an input
        nodes.append(helper.make_node("ReduceMean", ["r"], ["out"], axes=[-1], keepdims=1))
    else:
        nodes.append(helper.make_node("Add", ["r", "r"], ["out"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [w])
    return Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _run(model: Model, x: np.ndarray) -> np.ndarray:
    return ReferenceEvaluator(model.to_onnx()).run(None, {"x": x})[0]


def test_upgrade_keeps_the_graph_when_every_adapter_is_a_no_op():
    model = _model(18, reduce_axes_attr=False)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    want, graph = _run(model, x), model.graph
    assert upgrade_opset(model, 21) is True
    assert model.graph is graph  # not rebuilt: the weights stay where they were
    assert model.opset("") == 21 and model.ir_version >= 10
    np.testing.assert_array_equal(_run(model, x), want)
    assert upgrade_opset(model, 21) is False


def test_upgrade_rewrites_ops_whose_signature_changed():
    model = _model(17, reduce_axes_attr=True)
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    want, graph = _run(model, x), model.graph
    assert upgrade_opset(model, 23) is True
    assert model.graph is not graph
    (reduce,) = [n for n in model.graph.nodes if n.op == "ReduceMean"]
    assert len(reduce.inputs) == 2 and "axes" not in reduce.attrs  # the converter moved axes to an input
    assert model.opset("") == 23 and model.ir_version >= 11
    np.testing.assert_allclose(_run(model, x), want, rtol=1e-6)
