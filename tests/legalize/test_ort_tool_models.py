"""Models written by onnxruntime's own tools run on graphopt's cpu backend and match onnxruntime.

``tests/fixtures/ort-*.onnx`` are exported fixtures passed through onnxruntime's
transformers optimizer and/or its ``MatMulNBitsQuantizer`` (``make_ort_fixtures.py``
writes them). They hold ``com.microsoft`` contrib ops (and ``SimplifiedLayerNormalization``
in the default domain) the cpu backend does not declare: ``graphopt.compile`` splits them
back into standard ops, and the result must match onnxruntime running the same file
(MatMulNBits with float activations: accuracy_level 0) within 1e-4, and torch where the
weights are not quantized.
"""

from __future__ import annotations

import collections
import importlib.util

import numpy as np
import onnx
import pytest

import graphopt
from conftest import FIXTURES, run_ort, split_reference
from make_ort_fixtures import FIXTURES_MADE, build

NAMES = list(FIXTURES_MADE)


def _contrib(proto: onnx.ModelProto) -> dict[str, int]:
    ops = collections.Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                              for n in proto.graph.node)
    return {op: c for op, c in ops.items() if "::" in op or op == "SimplifiedLayerNormalization"}


@pytest.mark.parametrize("name", NAMES)
def test_runs_on_cpu_like_onnxruntime(name):
    spec, path = FIXTURES_MADE[name], FIXTURES / f"{name}.onnx"
    proto = onnx.load(str(path))
    assert _contrib(proto) == dict(spec.contrib)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":  # float activations in onnxruntime: 0 (the default) or absent
            assert {a.name: a.i for a in node.attribute}.get("accuracy_level", 0) == 0, node.name
    model = graphopt.load(path)
    refused = {f"{n.domain}::{n.op}" if n.domain else n.op for n, _ in graphopt.unsupported_nodes(model, "cpu")}
    assert refused == set(dict(spec.contrib))

    feeds, torch_out = split_reference(FIXTURES / f"{spec.source}.onnx")
    want = run_ort(path, feeds)  # session config: DequantizeLinear -> MatMul kept in float too
    got = graphopt.compile(model, "cpu").run(feeds)  # legalizes a copy first
    assert set(got) == set(want) == set(torch_out)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-4, rtol=0, err_msg=key)
        if not spec.quantized:
            np.testing.assert_allclose(got[key], torch_out[key], atol=1e-4, rtol=0, err_msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_split_back_report(name):
    spec = FIXTURES_MADE[name]
    legal = graphopt.legalize(graphopt.load(FIXTURES / f"{name}.onnx"), "cpu")
    assert graphopt.unsupported_nodes(legal, "cpu") == []
    assert {n.domain or "" for n in legal.graph.nodes} <= {"", "ai.onnx"}
    stats = legal.history[-1]
    assert {(s.op, s.count) for s in stats.split_back if s.source == "graphopt.passes"} >= set(spec.contrib)
    for s in stats.split_back:
        if (s.op, s.count) in set(spec.contrib):
            assert s.reason == f"cpu does not support {s.op}"
    onnx.checker.check_model(legal.to_onnx())


@pytest.mark.skipif(importlib.util.find_spec("sympy") is None or importlib.util.find_spec("onnx_ir") is None,
                    reason="regenerating needs sympy (transformers optimizer) and onnx-ir (MatMulNBitsQuantizer)")
@pytest.mark.parametrize("name", NAMES)
def test_committed_files_are_what_the_tools_write(name):
    """The committed file is what make_ort_fixtures.py writes with the installed onnxruntime."""
    made = build(name)
    committed = onnx.load(str(FIXTURES / f"{name}.onnx"))
    assert _contrib(made) == _contrib(committed)
    assert collections.Counter(n.op_type for n in made.graph.node) == \
        collections.Counter(n.op_type for n in committed.graph.node)


def test_types_flow_again_between_split_back_nodes():
    """Opset 17, no value_info (as torchscript exports): the first norm's decomposition emits
    RMSNormalization-23, which onnx cannot infer at opset 17, so the second norm's input has no
    type until the first is split back further; legalization infers again and goes on."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(17)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    weights = [numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "w0"], ["t0"], name="norm0", epsilon=1e-6),
             helper.make_node("SimplifiedLayerNormalization", ["t0", "w1"], ["t1"], name="norm1", epsilon=1e-6),
             helper.make_node("SkipSimplifiedLayerNormalization", ["t1", "t0", "w2"], ["y"], name="norm2",
                              domain="com.microsoft", epsilon=1e-6)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 64])], weights)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model = graphopt.legalize(graphopt.Model.from_proto(proto), "cpu")
    assert model.opset("") == 17 and graphopt.unsupported_nodes(model, "cpu") == []
    assert not {"RMSNormalization", "SimplifiedLayerNormalization"} & set(model.op_histogram())
    want = run_ort(graphopt.Model.from_proto(proto), {"x": x})["y"]
    np.testing.assert_allclose(graphopt.compile(model, "cpu").run({"x": x})["y"], want, atol=1e-5, rtol=0)
