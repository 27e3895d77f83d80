"""Tests of the example plugin, run against the installed package like a user's plugin."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt

ort = pytest.importorskip("onnxruntime")


def _model(nodes, inputs, outputs) -> graphopt.Model:
    g = helper.make_graph(nodes, "g", inputs, outputs)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(proto)
    return graphopt.Model.from_proto(proto)


def _run(model: graphopt.Model, feeds):
    sess = ort.InferenceSession(model.to_onnx().SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_discovered_through_entry_point():
    reg = graphopt.get_registry(reload=True)
    assert "cast-cleanup" in reg.passes
    assert reg.passes["cast-cleanup"].plugin == "cast_cleanup"
    assert reg.passes["cast-cleanup"].obj.__module__ == "graphopt_cast_cleanup"


def test_removes_noop_and_lossless_round_trip():
    f16 = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3])
    f32 = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [
        helper.make_node("Cast", ["x"], ["a"], to=TensorProto.FLOAT),   # f16 -> f32 (exact)
        helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT16),  # back to f16: round trip
        helper.make_node("Cast", ["b"], ["c"], to=TensorProto.FLOAT),    # needed
        helper.make_node("Cast", ["c"], ["d"], to=TensorProto.FLOAT),    # no-op
        helper.make_node("Relu", ["d"], ["y"]),
    ]
    model = _model(nodes, [f16], [f32])
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float16)
    expected = _run(model, {"x": x})
    out = graphopt.optimize(model, passes=["shape-inference", "cast-cleanup", "dead-code-elimination"], verify=True)
    stats = {s.name: s for s in out.history}
    assert stats["cast-cleanup"].counters == {"noop_removed": 1, "chains_collapsed": 1}
    assert [n.op for n in out.graph.nodes] == ["Cast", "Relu"]
    np.testing.assert_array_equal(_run(out, {"x": x})[0], expected[0])


def test_keeps_lossy_round_trip():
    f32 = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    out_vi = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    nodes = [
        helper.make_node("Cast", ["x"], ["a"], to=TensorProto.FLOAT16),  # f32 -> f16 rounds
        helper.make_node("Cast", ["a"], ["y"], to=TensorProto.FLOAT),
    ]
    model = _model(nodes, [f32], [out_vi])
    out = graphopt.optimize(model, passes=["shape-inference", "cast-cleanup"], verify=True)
    assert [n.op for n in out.graph.nodes] == ["Cast", "Cast"]
    x = np.array([1.0001, 2.5, -3.3333, 65504.0], dtype=np.float32)
    np.testing.assert_array_equal(_run(out, {"x": x})[0], _run(model, {"x": x})[0])
