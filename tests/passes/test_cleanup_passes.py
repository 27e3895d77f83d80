"""The built-in cleanup passes, on hand-made graphs (exact behaviour) and on every
exported fixture (outputs unchanged in onnxruntime, counters consistent)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from conftest import run_ort, split_reference


def _model(nodes, inputs, outputs, inits=(), opset=18) -> graphopt.Model:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(proto)
    return graphopt.Model.from_proto(proto)


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _run_pass(model, name, **options):
    out = graphopt.optimize(model, passes=[name], verify=True, **options)
    return out, out.history[-1].counters


# ---------------------------------------------------------------- identity
def test_identity_inside_and_at_graph_output():
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Identity", ["b"], ["y"]),            # output: Relu's tensor is renamed to y
        helper.make_node("Identity", ["x"], ["z"]),            # input straight to output: must stay
        helper.make_node("Dropout", ["b"], ["d"]),             # inference dropout
        helper.make_node("Neg", ["d"], ["w"]),
    ]
    model = _model(nodes, [_vi("x", [2])], [_vi("y", [2]), _vi("z", [2]), _vi("w", [2])])
    out, counters = _run_pass(model, "identity-elimination")
    assert counters == {"removed": 3, "kept_at_boundary": 1}
    assert Counter(n.op for n in out.graph.nodes) == {"Relu": 1, "Identity": 1, "Neg": 1}
    assert [t.name for t in out.graph.outputs] == ["y", "z", "w"]
    x = np.array([-1.0, 2.0], np.float32)
    got, ref = run_ort(out, {"x": x}), run_ort(model, {"x": x})
    for k in ("y", "z", "w"):
        np.testing.assert_array_equal(got[k], ref[k])


def test_training_dropout_is_kept():
    inits = [numpy_helper.from_array(np.array(True), "train")]
    nodes = [helper.make_node("Dropout", ["x", "", "train"], ["y"])]
    model = _model(nodes, [_vi("x", [2])], [_vi("y", [2])], inits)
    _, counters = _run_pass(model, "identity-elimination")
    assert counters["removed"] == 0


# ---------------------------------------------------------- constant folding
def test_constant_folding_chain_and_shape():
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.arange(4, dtype=np.float32))),
        helper.make_node("Mul", ["c", "c"], ["c2"]),
        helper.make_node("Add", ["x", "c2"], ["s"]),
        helper.make_node("Shape", ["x"], ["shp"], start=-1),
        helper.make_node("Reshape", ["s", "shp"], ["y"]),
    ]
    model = _model(nodes, [_vi("x", [4])], [_vi("y", [4])])
    out, counters = _run_pass(model, "constant-folding")
    assert counters["constant_nodes"] == 1 and counters["folded"] == 1 and counters["shape_folded"] == 1
    assert [n.op for n in out.graph.nodes] == ["Add", "Reshape"]
    np.testing.assert_array_equal(out.graph.nodes[0].inputs[1].values, np.arange(4, dtype=np.float32) ** 2)
    x = np.ones(4, np.float32)
    np.testing.assert_array_equal(run_ort(out, {"x": x})["y"], run_ort(model, {"x": x})["y"])


def test_constant_folding_respects_size_bound():
    inits = [numpy_helper.from_array(np.array(0, np.int64), "start"),
             numpy_helper.from_array(np.array(1 << 20, np.int64), "limit"),
             numpy_helper.from_array(np.array(1, np.int64), "delta")]
    nodes = [helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
             helper.make_node("ReduceSum", ["r"], ["y"], keepdims=0)]
    model = _model(nodes, [], [_vi("y", [], TensorProto.INT64)], inits)
    out, counters = _run_pass(model, "constant-folding", fold_max_bytes=1024)
    assert counters["skipped_too_large"] == 1 and counters["folded"] == 0
    assert [n.op for n in out.graph.nodes] == ["Range", "ReduceSum"]
    out, counters = _run_pass(model, "constant-folding", fold_max_bytes=16 * 2**20)
    assert counters["folded"] == 1  # Range folds; ReduceSum produces the graph output and stays
    assert [n.op for n in out.graph.nodes] == ["ReduceSum"]


def test_constant_folding_leaves_random_ops():
    nodes = [helper.make_node("RandomUniform", [], ["r"], shape=[2]), helper.make_node("Add", ["x", "r"], ["y"])]
    model = _model(nodes, [_vi("x", [2])], [_vi("y", [2])])
    out = graphopt.optimize(model, target="onnxruntime", passes=["constant-folding"], verify=True)
    assert [n.op for n in out.graph.nodes] == ["RandomUniform", "Add"]


# -------------------------------------------------------------------- dedupe
def test_dedupe_merges_equal_bytes_only():
    a = np.arange(512, dtype=np.float32)
    inits = [numpy_helper.from_array(a, "a"), numpy_helper.from_array(a.copy(), "a_copy"),
             numpy_helper.from_array(a + 1, "b"), numpy_helper.from_array(a.astype(np.float64), "a_f64")]
    nodes = [helper.make_node("Add", ["x", "a"], ["s1"]), helper.make_node("Add", ["s1", "a_copy"], ["s2"]),
             helper.make_node("Add", ["s2", "b"], ["y"]),
             helper.make_node("Cast", ["y"], ["y64"], to=TensorProto.DOUBLE),
             helper.make_node("Add", ["y64", "a_f64"], ["z"])]
    model = _model(nodes, [_vi("x", [512])], [_vi("z", [512], TensorProto.DOUBLE)], inits)
    out, counters = _run_pass(model, "initializer-dedupe")
    assert counters == {"removed": 1, "bytes_saved": 2048}
    assert sorted(out.constants()) == ["a", "a_f64", "b"]
    x = np.ones(512, np.float32)
    np.testing.assert_array_equal(run_ort(out, {"x": x})["z"], run_ort(model, {"x": x})["z"])


# ----------------------------------------------------------------------- dce
def test_dead_code_keeps_graph_inputs():
    inits = [numpy_helper.from_array(np.ones(2, np.float32), "unused_w")]
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["unused_w"], ["dead"]),
             helper.make_node("Sigmoid", ["extra"], ["dead2"])]
    model = _model(nodes, [_vi("x", [2]), _vi("extra", [2])], [_vi("y", [2])], inits)
    out, counters = _run_pass(model, "dead-code-elimination")
    assert counters == {"nodes_removed": 2, "initializers_removed": 1}
    assert [t.name for t in out.graph.inputs] == ["x", "extra"]


# ------------------------------------------------------------------ fixtures
def _assert_same_outputs(original: graphopt.Model, optimized: graphopt.Model, feeds: dict,
                         atol: float = 1e-6) -> None:
    ref, got = run_ort(original, feeds), run_ort(optimized, feeds)
    assert sorted(ref) == sorted(got)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=atol, rtol=0, err_msg=k)


@pytest.mark.parametrize("pass_name", ["shape-inference", "identity-elimination", "constant-folding",
                                       "initializer-dedupe", "dead-code-elimination"])
def test_each_cleanup_pass_on_fixture(fixture_model, pass_name):
    model = graphopt.load(fixture_model)
    feeds, _ = split_reference(fixture_model)
    out, counters = _run_pass(model, pass_name)
    _assert_same_outputs(model, out, feeds)
    ops = Counter(n.op for n in out.graph.nodes)
    if pass_name == "identity-elimination":
        assert ops["Identity"] == counters["kept_at_boundary"]
        copies = sum(n.op == "Identity" or (n.op == "Concat" and len(n.inputs) == 1) for n in model.graph.nodes)
        assert ops["Identity"] + counters["removed"] == copies
    elif pass_name == "constant-folding":
        assert ops["Constant"] == 0
        foldable = [n for n in out.graph.nodes if n.inputs and all(isinstance(t, gs.Constant) or not t.name
                                                                   for t in n.inputs)]
        assert len(foldable) <= counters["skipped_too_large"] + counters["skipped_shared"] + counters["failed"]
    elif pass_name == "initializer-dedupe":
        digests = Counter((str(t.dtype), tuple(t.shape), np.asarray(t.values).tobytes())
                          for t in out.constants().values())
        assert max(digests.values(), default=1) == 1
    elif pass_name == "dead-code-elimination":
        again, counters2 = _run_pass(out, pass_name)
        assert counters2 == {"nodes_removed": 0, "initializers_removed": 0}
    elif pass_name == "shape-inference":
        typed = [t for t in out.graph.tensors().values() if isinstance(t, gs.Variable) and t.dtype is not None]
        assert len(typed) == counters["tensors_typed"] > 0


def test_default_pipeline_on_fixture_shrinks_and_matches(fixture_model):
    model = graphopt.load(fixture_model)
    feeds, _ = split_reference(fixture_model)
    out = graphopt.optimize(model, verify=True)
    assert out.node_count() <= model.node_count()
    _assert_same_outputs(model, out, feeds, atol=1e-5)  # fused ops round differently
