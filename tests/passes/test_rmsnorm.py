"""rmsnorm-fuse: every variant real exporters emit, negative cases with their reasons, fixtures."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from conftest import run_ort, split_reference
from graphopt.rewrite import fused_by

D = 16
RNG = np.random.default_rng(0)
W = (1 + 0.1 * RNG.standard_normal(D)).astype(np.float32)


def _build(body, *, x_type=TensorProto.FLOAT, y_type=TensorProto.FLOAT, shape=(2, 3, D), opset=18, inits=()):
    inits = [numpy_helper.from_array(W, "w"), numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"), *inits]
    g = helper.make_graph(body, "g", [helper.make_tensor_value_info("x", x_type, list(shape))],
                          [helper.make_tensor_value_info("y", y_type, list(shape))], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return graphopt.Model.from_proto(model)


def _mean(src, out, opset=18):
    if opset >= 18:
        return helper.make_node("ReduceMean", [src, "axes"], [out], keepdims=1)
    return helper.make_node("ReduceMean", [src], [out], axes=[-1], keepdims=1)


def _llama(opset=18, square="pow", order="x_first", weight="w"):
    sq = helper.make_node("Pow", ["x", "two"], ["sq"]) if square == "pow" else helper.make_node("Mul", ["x", "x"], ["sq"])
    norm_in = ["x", "inv"] if order == "x_first" else ["inv", "x"]
    w_in = ["w", "n"] if order == "x_first" else ["n", "w"]
    return [sq, _mean("sq", "m", opset), helper.make_node("Add", ["m", "eps"], ["v"]),
            helper.make_node("Sqrt", ["v"], ["s"]), helper.make_node("Reciprocal", ["s"], ["inv"]),
            helper.make_node("Mul", norm_in, ["n"]), helper.make_node("Mul", w_in, ["y"])]


def _div_variant():
    return [helper.make_node("Mul", ["x", "x"], ["sq"]), _mean("sq", "m"), helper.make_node("Add", ["eps", "m"], ["v"]),
            helper.make_node("Sqrt", ["v"], ["s"]), helper.make_node("Div", ["x", "s"], ["n"]),
            helper.make_node("Mul", ["n", "w"], ["y"])]


def _gemma():
    body = _llama()[:-1]
    return body + [helper.make_node("Add", ["one", "w"], ["w1"]), helper.make_node("Mul", ["n", "w1"], ["y"])]


def _fp16_upcast():
    return [helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
            helper.make_node("Pow", ["x32", "two"], ["sq"]), _mean("sq", "m"),
            helper.make_node("Add", ["m", "eps"], ["v"]), helper.make_node("Sqrt", ["v"], ["s"]),
            helper.make_node("Reciprocal", ["s"], ["inv"]), helper.make_node("Mul", ["x32", "inv"], ["n32"]),
            helper.make_node("Cast", ["n32"], ["n"], to=TensorProto.FLOAT16),
            helper.make_node("Mul", ["w16", "n"], ["y"])]


def _rsqrt_pow():
    return [helper.make_node("Pow", ["x", "two"], ["sq"]), _mean("sq", "m"), helper.make_node("Add", ["m", "eps"], ["v"]),
            helper.make_node("Pow", ["v", "mhalf"], ["inv"]), helper.make_node("Mul", ["x", "inv"], ["n"]),
            helper.make_node("Mul", ["n", "w"], ["y"])]


def _unscaled():
    return _llama()[:-1][:-1] + [helper.make_node("Mul", ["x", "inv"], ["y"])]


VARIANTS = {
    "llama-pow": (lambda: _build(_llama()), {}),
    "llama-opset17-axes-attr": (lambda: _build(_llama(opset=17), opset=17), {}),
    "mul-square-swapped-order": (lambda: _build(_llama(square="mul", order="w_first")), {}),
    "div-by-sqrt": (lambda: _build(_div_variant()), {}),
    "gemma-one-plus-w": (lambda: _build(_gemma()), {}),
    "rsqrt-as-pow": (lambda: _build(_rsqrt_pow(), inits=[numpy_helper.from_array(np.array(-0.5, np.float32),
                                                                                     "mhalf")]), {}),
    "per-head-rank4": (lambda: _build(_llama(), shape=(2, 4, 3, D)), {}),
    "unscaled": (lambda: _build(_unscaled()), {"rule": "rmsnorm-unscaled"}),
    "fp16-upcast": (lambda: _build(_fp16_upcast(), x_type=TensorProto.FLOAT16, y_type=TensorProto.FLOAT16,
                                   inits=[numpy_helper.from_array(W.astype(np.float16), "w16")]), {"atol": 2e-3}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_fuses_and_matches(variant):
    make, opts = VARIANTS[variant]
    model = make()
    out = graphopt.optimize(model, target="onnxruntime", passes=["shape-inference", "rmsnorm-fuse",
                                                                 "dead-code-elimination"], verify=True)
    ops = out.op_histogram()
    assert ops["RMSNormalization"] == 1, dict(ops)
    assert out.opset() == 23
    assert set(ops) <= {"RMSNormalization", "Cast"}
    fused = next(n for n in out.graph.nodes if n.op == "RMSNormalization")
    assert fused_by(fused) == opts.get("rule", "rmsnorm")
    stats = out.history[1]
    assert stats.counters["fused"] == 1 and stats.counters[f"rule:{opts.get('rule', 'rmsnorm')}"] == 1
    x = RNG.standard_normal(tuple(model.graph.inputs[0].shape)).astype(np.dtype(model.graph.inputs[0].dtype))
    want, got = run_ort(model, {"x": x})["y"], run_ort(out, {"x": x})["y"]
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=opts.get("atol", 1e-5), rtol=0)
    cpu = graphopt.compile(out, "cpu") if graphopt.get_backend("cpu").supports_op("RMSNormalization", "", 23) else None
    if cpu is not None:
        np.testing.assert_allclose(cpu.run({"x": x})["y"].astype(np.float32), want.astype(np.float32),
                                   atol=opts.get("atol", 1e-5), rtol=0)


def _explained(model) -> list[str]:
    out = graphopt.optimize(model, target="onnxruntime", passes=["shape-inference", "rmsnorm-fuse"], explain=True)
    assert "RMSNormalization" not in out.op_histogram()
    return out.notes


def test_mean_over_wrong_axis_is_refused_with_reason():
    body = _llama()
    body[1] = helper.make_node("ReduceMean", ["sq", "axes0"], ["m"], keepdims=1)
    model = _build(body, inits=[numpy_helper.from_array(np.array([0], np.int64), "axes0")])
    notes = _explained(model)
    assert any("reduces over axes [0], not the last one" in n for n in notes), notes


def test_intermediate_used_elsewhere_is_refused_with_reason():
    body = _llama()
    body[-1] = helper.make_node("Mul", ["w", "n"], ["wn"])
    body.append(helper.make_node("Add", ["wn", "inv"], ["y"]))  # 'inv' escapes the pattern
    model = _build(body)
    assert any("is also used by Add" in n for n in _explained(model))


def test_non_constant_weight_is_not_fused():
    body = _llama()
    body[-1] = helper.make_node("Mul", ["n", "x"], ["y"])  # "weight" is the input itself
    model = _build(body)
    out = graphopt.optimize(model, target="onnxruntime", passes=["shape-inference", "rmsnorm-fuse"])
    assert out.op_histogram()["RMSNormalization"] == 1  # only the unscaled core fuses
    x = RNG.standard_normal((2, 3, D)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"x": x})["y"], run_ort(model, {"x": x})["y"], atol=1e-5)


def test_target_without_rmsnorm_is_respected():
    class NoNorm(graphopt.Backend):
        name = "nonorm"

        def ops(self):
            return [graphopt.OpSupport(op) for op in ("Mul", "Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal")]

    model = _build(_llama())
    out = graphopt.optimize(model, target=NoNorm(), passes=["rmsnorm-fuse"])
    assert "RMSNormalization" not in out.op_histogram() and out.history[0].counters == {"skipped_target": 1}


def test_fixture_all_norms_fused(fixture_model):
    model = graphopt.load(fixture_model)
    feeds, expected = split_reference(fixture_model)
    out = graphopt.optimize(model, target="onnxruntime", verify=True)
    layers = sum(1 for t in model.graph.inputs if t.name.endswith(".key")) or 2
    assert out.op_histogram()["RMSNormalization"] == 2 * layers + 1
    got = run_ort(out, feeds)
    for name, ref in expected.items():
        np.testing.assert_allclose(got[name], ref, atol=1e-4, rtol=0, err_msg=name)
