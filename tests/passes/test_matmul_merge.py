"""matmul-merge: projections that share an input become one MatMul + Split."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
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


def _wide_projections(k: int, widths: tuple[int, ...]) -> graphopt.Model:
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), f"w{i}")
             for i, n in enumerate(widths)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(len(widths))]
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]) for i, n in enumerate(widths)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])], outs, inits)
    return graphopt.Model.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))


@pytest.mark.parametrize("external", [False, True])
def test_merged_weight_is_joined_only_when_saved_and_saves_exactly(tmp_path, monkeypatch, external):
    """The merged weight keeps its parts (no joined copy in memory after the pass); saving
    streams the joined rows in blocks (small blocks here: several per weight), inline or to
    external data, and the file holds exactly the concatenation."""
    from graphopt._ir import ConcatValues

    monkeypatch.setattr(ConcatValues, "BLOCK_BYTES", 4096)
    model = _three_projections()
    want_w = np.concatenate([numpy_helper.to_array(t) for t in model.to_onnx().graph.initializer
                             if t.name in ("w0", "w1", "w2")], axis=1)
    out = graphopt.optimize(model, target="cpu", passes=["matmul-merge"])
    (merged,) = [n.inputs[1] for n in out.graph.nodes if n.op == "MatMul"]
    assert isinstance(merged._values, ConcatValues) and merged._values.shape == (8, 16)
    wide = _wide_projections(600, (300, 100, 100))  # 2.4 MB: written as a payload, in 6 blocks
    wide_out = graphopt.optimize(wide, target="cpu", passes=["matmul-merge"])
    for m, name, want in ((out, "a.onnx", want_w), (wide_out, "b.onnx", None)):
        m.save(tmp_path / name, external_data=external)
        saved = onnx.load(tmp_path / name)
        (w,) = [t for t in saved.graph.initializer if t.dims[0] in (8, 600) and len(t.dims) == 2]
        if want is None:
            want = np.concatenate([numpy_helper.to_array(t) for t in wide.to_onnx().graph.initializer], axis=1)
        np.testing.assert_array_equal(numpy_helper.to_array(w), want)
        x = np.random.default_rng(5).standard_normal((1, want.shape[0]) if want.shape[0] == 600 else (2, 3, 8))
        feeds = {"x": x.astype(np.float32)}
        ref = run_ort(wide if want.shape[0] == 600 else model, feeds)
        sess = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], atol=1e-4)
    assert isinstance(merged._values, ConcatValues)  # saving did not replace the lazy values
