"""matmul-merge: projections that share an input become one MatMul + Split."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphopt
from conftest import FIXTURES, run_ort, split_reference


def _three_projections(shared_weight_elsewhere: bool = False, bias: bool = True):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, n)).astype(np.float32), f"w{i}")
             for i, n in enumerate((8, 4, 4))]
    inits += [numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"b{i}")
              for i, n in enumerate((8, 4, 4))]
    nodes, outs = [], []
    for i in range(3):
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"]))
        if bias:
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"]))
        outs.append(helper.make_tensor_value_info(f"y{i}" if bias else f"m{i}", TensorProto.FLOAT, [2, 3, (8, 4, 4)[i]]))
    if shared_weight_elsewhere:
        nodes.append(helper.make_node("Identity", ["w0"], ["w0_copy"]))
        outs.append(helper.make_tensor_value_info("w0_copy", TensorProto.FLOAT, [8, 8]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])], outs, inits)
    return graphopt.Model.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))


def test_merges_projections_with_biases():
    model = _three_projections()
    out = graphopt.optimize(model, target="cpu", passes=["matmul-merge"], verify=True)
    assert out.history[0].counters == {"merged_groups": 1, "matmuls_removed": 2}
    assert sorted(n.op for n in out.graph.nodes) == ["Add", "MatMul", "Split"]
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    want, got = run_ort(model, {"x": x}), run_ort(out, {"x": x})
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6)
    cpu = graphopt.compile(out, "cpu").run({"x": x})
    for k in want:
        np.testing.assert_allclose(cpu[k], want[k], atol=1e-5)


def test_weight_used_elsewhere_is_not_merged():
    out = graphopt.optimize(_three_projections(shared_weight_elsewhere=True), target="onnxruntime",
                            passes=["matmul-merge"])
    assert out.history[0].counters == {"merged_groups": 1, "matmuls_removed": 1}  # only w1 and w2


def test_fixture_qkv_and_gate_up_merged():
    path = FIXTURES / "qwen2-torchscript-decode.onnx"
    out = graphopt.optimize(graphopt.load(path), target="cpu", verify=True)
    stats = {s.name: s.counters for s in out.history}
    assert stats["matmul-merge"] == {"merged_groups": 4, "matmuls_removed": 6}  # per layer: q/k/v, gate/up
    feeds, expected = split_reference(path)
    got = graphopt.compile(out, "cpu").run(feeds)
    np.testing.assert_allclose(got["logits"], expected["logits"], atol=1e-4)
