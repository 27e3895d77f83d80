"""The cpu backend end to end: fixtures against torch, greedy decoding, the executor's schedule."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from conftest import FIXTURES, split_reference
from graphopt._evaluate import generate


def test_fixture_matches_torch(fixture_model):
    feeds, expected = split_reference(fixture_model)
    got = graphopt.compile(graphopt.load(fixture_model), "cpu").run(feeds)
    assert sorted(got) == sorted(expected)
    for name, ref in expected.items():
        assert got[name].shape == ref.shape and got[name].dtype == ref.dtype, name
        np.testing.assert_allclose(got[name], ref, atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize("name", ["llama-dynamo-decode", "llama-torchscript-decode", "qwen2-dynamo-decode",
                                  "qwen2-torchscript-decode", "qwen2-dynamo-prefill"])
def test_greedy_tokens_match_torch(name):
    ref = np.load(FIXTURES / f"{name.split('-')[0]}-greedy.npz")
    tokens = generate(FIXTURES / f"{name}.onnx", ref["prompt_ids"].tolist(), 32, "cpu")
    assert tokens == ref["tokens"].tolist()


def test_schedule_frees_every_intermediate_after_last_use():
    path = FIXTURES / "llama-torchscript-decode.onnx"
    exe = graphopt.compile(graphopt.load(path), "cpu")
    keep = set(exe.output_slots.values()) | set(exe.input_slots.values()) | set(exe.constants)
    freed = [s for step in exe.steps for s in step.free]
    assert len(freed) == len(set(freed))  # each freed once
    produced = {s for step in exe.steps for s in step.outputs if s >= 0}
    assert produced - keep == set(freed) - keep  # every intermediate is freed
    last_read = {}
    for i, step in enumerate(exe.steps):
        for s in step.inputs:
            last_read[s] = i
    for i, step in enumerate(exe.steps):
        for s in step.free:
            assert last_read.get(s, i) == i or s in step.outputs  # freed exactly at its last use


def _tiny(nodes, inputs, outputs, opset=18):
    g = helper.make_graph(nodes, "g", inputs, outputs)
    return graphopt.Model.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))


def test_compile_refuses_with_every_unsupported_node():
    vi = helper.make_tensor_value_info
    model = _tiny([helper.make_node("Conv", ["x", "w"], ["c"], name="conv1"),
                   helper.make_node("Relu", ["c"], ["r"], name="relu"),
                   helper.make_node("LpPool", ["r"], ["y"], name="pool")],
                  [vi("x", TensorProto.FLOAT, [1, 1, 4, 4]), vi("w", TensorProto.FLOAT, [1, 1, 3, 3])],
                  [vi("y", TensorProto.FLOAT, None)])
    with pytest.raises(graphopt.BackendError) as info:
        graphopt.compile(model, "cpu")
    assert str(info.value) == ("cpu cannot run 2 node(s): conv1 (Conv): cpu does not support Conv; "
                               "pool (LpPool): cpu does not support LpPool")


def test_run_errors_name_the_node_and_the_missing_inputs():
    vi = helper.make_tensor_value_info
    model = _tiny([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                  [vi("a", TensorProto.FLOAT, ["n", "k"]), vi("b", TensorProto.FLOAT, ["k", "m"])],
                  [vi("y", TensorProto.FLOAT, None)])
    exe = graphopt.compile(model, "cpu")
    with pytest.raises(graphopt.BackendError, match="missing inputs: b"):
        exe.run({"a": np.ones((2, 3), np.float32)})
    with pytest.raises(graphopt.BackendError, match=r"node 'mm' \(MatMul\) failed on inputs of shape \[\(2, 3\), \(4, 5\)\]"):
        exe.run({"a": np.ones((2, 3), np.float32), "b": np.ones((4, 5), np.float32)})


def test_declaration_is_version_aware():
    cpu = graphopt.get_backend("cpu")
    assert cpu.supports_op("Softmax", "", 18)
    assert cpu.supports_op("Cast", "", 21)
    vi = helper.make_tensor_value_info
    model = _tiny([helper.make_node("Softmax", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, [2])],
                  [vi("y", TensorProto.FLOAT, [2])], opset=11)
    assert cpu.check(model.graph.nodes[0], model) is None
    x = np.array([[1.0, 2.0], [3.0, 5.0]], np.float32)
    model = _tiny([helper.make_node("Softmax", ["x"], ["y"], axis=0)], [vi("x", TensorProto.FLOAT, [2, 2])],
                  [vi("y", TensorProto.FLOAT, [2, 2])], opset=11)  # legacy: flattened to 2-D at axis 0
    y = graphopt.compile(model, "cpu").run({"x": x})["y"]
    flat = np.exp(x.reshape(-1) - x.max())
    np.testing.assert_allclose(y, (flat / flat.sum()).reshape(2, 2), rtol=1e-6)


def test_compile_makes_glibc_reuse_freed_memory(monkeypatch):
    import sys as _sys

    from graphopt import _memory

    monkeypatch.setattr(_memory, "_malloc_tuned", None)
    monkeypatch.setenv("GRAPHOPT_KEEP_MALLOC", "1")
    assert _memory.reuse_freed_memory() is False  # the opt-out leaves the allocator alone
    monkeypatch.setattr(_memory, "_malloc_tuned", None)
    monkeypatch.delenv("GRAPHOPT_KEEP_MALLOC")
    graphopt.compile(graphopt.load(FIXTURES / "llama-dynamo-decode.onnx"), "cpu")
    if _sys.platform.startswith("linux"):
        assert _memory._malloc_tuned is True  # mallopt accepted both settings (glibc)


def test_an_executables_weights_are_freed_with_it_without_the_cyclic_collector():
    """compile() works on a copy of the graph, and graphsurgeon graphs are cyclic: a weight
    cached on that copy would stay resident after the executable is dropped, until the cyclic
    garbage collector ran (a quantization report kept the fp32 reference's 600 MB that way)."""
    import gc
    import weakref

    model = graphopt.load(FIXTURES / "llama-dynamo-decode.onnx")
    gc.collect()
    gc.disable()
    try:
        exe = graphopt.compile(model, "cpu")
        weights = [weakref.ref(v) for v in exe.constants.values() if isinstance(v, np.ndarray) and v.size >= 1024]
        assert weights and all(w() is not None for w in weights)
        del exe
        assert all(w() is None for w in weights)
    finally:
        gc.enable()
