"""legalize(): what it splits back and how (ONNX function bodies, registered decompositions,
recursion, ops newer than the model's opset), what it refuses (one error naming every
node) and what it reports."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import graphopt
from graphopt._plugins import build_registry
from legalize_helpers import PRIMITIVE, Partial, cpu_run, feeds_of, max_err, one_node, ort_run

RNG = np.random.default_rng(7)


def r(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


B, S, H, HKV, D, P = 2, 3, 4, 2, 8, 5
Q4, K4, V4, PK, PV = r(B, H, S, D), r(B, HKV, S, D), r(B, HKV, S, D), r(B, HKV, P, D), r(B, HKV, P, D)
BOOL_MASK = RNG.random((B, 1, S, P + S)) > 0.3
BOOL_MASK[0, 0, 1, :] = False  # a query row with every key masked: the spec gives zeros, not NaN
FLOAT_MASK = r(B, 1, S, P + S)
FLOAT_MASK[1, 0, 2, :] = -np.inf

# op, inputs, outputs, attrs, the decomposition expected for the primitive target
STANDARD = {
    "rms_norm": ("RMSNormalization", {"x": r(2, 3, 64), "w": r(64)}, ["y"], {"epsilon": 1e-6}, "onnx function body"),
    "layer_norm_stats": ("LayerNormalization", {"x": r(2, 3, 64), "w": r(64), "b": r(64)}, ["y", "mean", "inv"],
                         {}, "onnx function body"),
    "gelu": ("Gelu", {"x": r(2, 3, 64)}, ["y"], {}, "onnx function body"),
    "gelu_tanh": ("Gelu", {"x": r(2, 3, 64)}, ["y"], {"approximate": "tanh"}, "onnx function body"),
    "rotary_interleaved": ("RotaryEmbedding", {"x": r(2, 4, 3, 16), "cos": r(2, 3, 8), "sin": r(2, 3, 8)}, ["y"],
                           {"interleaved": 1}, "onnx function body"),
    "rotary_3d_positions": ("RotaryEmbedding", {"x": r(2, 3, 64), "cos": r(16, 8), "sin": r(16, 8),
                                                "pos": np.array([[0, 1, 2], [4, 5, 6]], np.int64)}, ["y"],
                            {"num_heads": 4}, "graphopt.passes"),
    "attention_causal": ("Attention", {"q": Q4, "k": K4, "v": V4}, ["y"], {"is_causal": 1}, "onnx function body"),
    # onnx's inliner asserts on the empty mask input in front of the past key: handled
    "attention_causal_past_no_mask": ("Attention", {"q": Q4, "k": K4, "v": V4, "mask": None, "pk": PK, "pv": PV},
                                      ["y", "present_k", "present_v"], {"is_causal": 1}, "onnx function body"),
    "attention_softcap": ("Attention", {"q": Q4, "k": K4, "v": V4}, ["y"], {"softcap": 3.0}, "onnx function body"),
    "attention_bool_mask_past": ("Attention", {"q": Q4, "k": K4, "v": V4, "mask": BOOL_MASK, "pk": PK, "pv": PV},
                                 ["y", "present_k", "present_v"], {}, "graphopt.passes"),
    "attention_float_mask_inf_row": ("Attention", {"q": Q4, "k": K4, "v": V4, "mask": FLOAT_MASK, "pk": PK,
                                                   "pv": PV}, ["y", "present_k", "present_v"], {}, "graphopt.passes"),
    "attention_3d_gqa": ("Attention", {"q": Q4.transpose(0, 2, 1, 3).reshape(B, S, H * D),
                                       "k": K4.transpose(0, 2, 1, 3).reshape(B, S, HKV * D),
                                       "v": V4.transpose(0, 2, 1, 3).reshape(B, S, HKV * D)}, ["y"],
                         {"q_num_heads": H, "kv_num_heads": HKV, "scale": 0.3}, "graphopt.passes"),
}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN rows the guard replaces
@pytest.mark.parametrize("name", list(STANDARD))
def test_standard_fused_ops_split_back_to_primitives(name):
    """Expected values come from onnx's reference implementation (the spec)."""
    op, inputs, outputs, attrs, source = STANDARD[name]
    proto = one_node(op, inputs, outputs, **attrs)
    feeds = feeds_of(inputs)
    expected = ReferenceEvaluator(proto).run(None, feeds)
    model = graphopt.legalize(graphopt.Model.from_proto(proto), PRIMITIVE)

    assert graphopt.unsupported_nodes(model, PRIMITIVE) == []
    assert op not in model.op_histogram()
    stats = model.history[-1]
    assert isinstance(stats, graphopt.LegalizeStats) and stats.name == "legalize"
    assert [(s.op, s.count, s.source) for s in stats.split_back] == [(op, 1, source)]
    assert stats.lines() == [f"split back 1 × {op}: primitive does not support {op}"]
    onnx.checker.check_model(model.to_onnx())
    for got in (ort_run(model.to_onnx(), feeds), cpu_run(model, feeds)):
        assert max(max_err(e, g) for e, g in zip(expected, got)) < 1e-5


def test_fast_path_and_function_body_agree():
    """The registered Attention decomposition is an optimisation of the spec's body, not a variant."""
    op, inputs, outputs, attrs, _ = STANDARD["attention_float_mask_inf_row"]
    proto = one_node(op, inputs, outputs, **attrs)
    feeds = feeds_of(inputs)
    fast = graphopt.legalize(graphopt.Model.from_proto(proto), PRIMITIVE)
    without = build_registry(entry_points=False)
    del without.decompositions[("", "Attention")]
    body = graphopt.legalize(graphopt.Model.from_proto(proto), PRIMITIVE, registry=without)
    assert body.history[-1].split_back[0].source == "onnx function body"
    assert fast.node_count() < body.node_count()
    for a, b in zip(ort_run(fast.to_onnx(), feeds), ort_run(body.to_onnx(), feeds)):
        assert max_err(a, b) < 1e-6


def test_input_is_never_changed_and_in_place_is_explicit():
    op, inputs, outputs, attrs, _ = STANDARD["rms_norm"]
    model = graphopt.Model.from_proto(one_node(op, inputs, outputs, **attrs))
    out = graphopt.legalize(model, PRIMITIVE)
    assert [n.op for n in model.graph.nodes] == ["RMSNormalization"] and model.history == []
    assert out is not model and "RMSNormalization" not in out.op_histogram()
    same = graphopt.legalize(model, PRIMITIVE, in_place=True)
    assert same is model and "RMSNormalization" not in model.op_histogram()


def test_a_legal_model_is_left_as_it_is():
    op, inputs, outputs, attrs, _ = STANDARD["attention_3d_gqa"]
    model = graphopt.Model.from_proto(one_node(op, inputs, outputs, **attrs))
    out = graphopt.legalize(model, "cpu")
    assert [n.op for n in out.graph.nodes] == ["Attention"] and out.history == []


# ------------------------------------------------------------- plugins and recursion
def _custom_model(ops, opset=23):
    """x → each op of ``ops`` in turn (custom domain ``my.ops``) → y."""
    nodes, prev = [], "x"
    for i, op in enumerate(ops):
        domain = "" if op in ("Relu", "Neg") else "my.ops"
        nodes.append(helper.make_node(op, [prev], [f"t{i}"], name=f"{op.lower()}{i}", domain=domain))
        prev = f"t{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"], name="out"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("my.ops", 1)])
    return graphopt.Model.from_proto(proto)


def _doubled_gelu(node, model):
    """my.ops::DoubledGelu(x) = 2·Gelu(x): emits a fused op the target may split further."""
    g = gs.Variable(f"{node.name}_gelu", np.float32)
    two = gs.Constant(f"{node.name}_two", np.array(2.0, np.float32))
    return [gs.Node("Gelu", inputs=[node.inputs[0]], outputs=[g]),
            gs.Node("Mul", inputs=[g, two], outputs=[node.outputs[0]])]


def _half_made(node, model):
    """Builds a node, then gives up: legalization must not keep the half-built node."""
    gs.Node("Relu", inputs=[node.inputs[0]], outputs=[node.outputs[0]])
    raise graphopt.CannotDecompose("only for rank-4 inputs")


class _Plugin:
    @graphopt.hookimpl
    def graphopt_register_decompositions(self, register):
        register("my.ops", "DoubledGelu", _doubled_gelu)
        register("my.ops", "HalfMade", _half_made)
        register("my.ops", "Loops", lambda node, model: [gs.Node("Loops", domain="my.ops", inputs=list(node.inputs),
                                                                 outputs=list(node.outputs))])
        register("my.ops", "NotMine", lambda node, model: None)
        register("my.ops", "Twice", lambda node, model: [
            gs.Node("Relu", inputs=list(node.inputs), outputs=list(node.outputs)),
            gs.Node("Neg", inputs=list(node.inputs), outputs=list(node.outputs))])


@pytest.fixture(scope="module")
def registry():
    return build_registry(entry_points=False, extra=(("my_plugin", _Plugin()),))


def test_plugin_decomposition_recurses_through_function_bodies(registry):
    model = graphopt.legalize(_custom_model(["DoubledGelu"]), PRIMITIVE, registry=registry)
    stats = model.history[-1]
    assert [(s.op, s.source) for s in stats.split_back] == [("my.ops::DoubledGelu", "my_plugin"),
                                                            ("Gelu", "onnx function body")]
    assert stats.counters["rounds"] == 2 and not {"Gelu", "DoubledGelu"} & set(model.op_histogram())
    x = r(2, 8)
    from math import erf

    expected = 2 * 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))
    np.testing.assert_allclose(ort_run(model.to_onnx(), {"x": x})[0], expected, atol=1e-5)
    kept = graphopt.legalize(_custom_model(["DoubledGelu"]), "cpu", registry=registry)
    assert kept.op_histogram()["Gelu"] == 1  # the cpu target runs Gelu itself


def test_one_error_names_every_node_that_cannot_run(registry):
    model = _custom_model(["Swish2", "Relu", "HalfMade", "NotMine", "Mystery"])
    with pytest.raises(graphopt.LegalizeError) as info:
        graphopt.legalize(model, "cpu", registry=registry)
    assert str(info.value) == (
        "cpu cannot run 4 node(s): swish20 (my.ops::Swish2): cpu does not support my.ops::Swish2; "
        "halfmade2 (my.ops::HalfMade): cpu does not support my.ops::HalfMade (its decomposition does not apply: "
        "only for rank-4 inputs); "
        "notmine3 (my.ops::NotMine): cpu does not support my.ops::NotMine (its decomposition does not apply: the "
        "decomposition registered by 'my_plugin' does not cover this node); "
        "mystery4 (my.ops::Mystery): cpu does not support my.ops::Mystery")
    assert isinstance(info.value, graphopt.BackendError)


def test_a_decomposition_that_gives_up_leaves_the_graph_intact(registry):
    model = _custom_model(["HalfMade"])
    with pytest.raises(graphopt.LegalizeError):
        graphopt.legalize(model, "cpu", registry=registry, in_place=True)
    assert [n.op for n in model.graph.nodes] == ["HalfMade", "Identity"]
    assert [n.op for n in model.graph.tensors()["t0"].inputs] == ["HalfMade"]
    graphopt.verify_graph(model)


def test_a_decomposition_that_recreates_its_op_is_stopped(registry):
    with pytest.raises(graphopt.LegalizeError, match=r"did not converge after 16 rounds: still unsupported: "
                                                     r"my.ops::Loops"):
        graphopt.legalize(_custom_model(["Loops"]), "cpu", registry=registry)


def test_a_broken_decomposition_is_a_plugin_error(registry):
    with pytest.raises(graphopt.PluginError, match=r"decomposition of my.ops::Twice \('twice0'\) from "
                                                   r"'my_plugin' produces output 't0' 2 times, expected once"):
        graphopt.legalize(_custom_model(["Twice"]), "cpu", registry=registry)


# ------------------------------------------------------------------------ opsets
def test_standard_op_newer_than_the_models_opset_is_expanded_and_converted():
    """A decomposition may emit RMSNormalization (opset 23) into an opset-18 model."""
    model = _custom_model(["Relu"], opset=18)
    relu = model.graph.nodes[0]
    relu.op = "RMSNormalization"
    relu.inputs.append(gs.Constant("w", r(8)))
    relu.attrs = {"epsilon": 1e-5}
    assert graphopt.unsupported_nodes(model, "cpu") == [
        (relu, "RMSNormalization needs opset 23, the model imports opset 18")]
    out = graphopt.legalize(model, "cpu")
    assert out.opset("") == 18 and "RMSNormalization" not in out.op_histogram()
    onnx.checker.check_model(out.to_onnx())
    x = r(2, 8)
    expected = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * np.asarray(relu.inputs[1].values)
    np.testing.assert_allclose(ort_run(out.to_onnx(), {"x": x})[0], expected, atol=1e-5)


def test_constant_nodes_become_initializers_for_a_target_without_them():
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.FLOAT, [2], [1.0, 2.0])),
         helper.make_node("Add", ["x", "c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = graphopt.Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    out = graphopt.legalize(model, Partial({"Constant"}, name="no-constant-nodes"))
    assert [n.op for n in out.graph.nodes] == ["Add"]
    assert out.history[-1].lines() == ["split back 1 × Constant: no-constant-nodes does not support Constant"]
    np.testing.assert_allclose(ort_run(out.to_onnx(), {"x": np.ones(2, np.float32)})[0], [2.0, 3.0])


# ---------------------------------------------------------- compile and optimize
def test_compile_splits_back_on_a_copy():
    proto = one_node("SimplifiedLayerNormalization", {"x": r(2, 3, 16), "w": r(16)}, ["y"], opset=17,
                     epsilon=1e-6)
    model = graphopt.Model.from_proto(proto)
    feeds = {"x": r(2, 3, 16), "w": r(16)}
    got = graphopt.compile(model, "cpu").run(feeds)["y"]
    assert [n.op for n in model.graph.nodes] == ["SimplifiedLayerNormalization"]
    assert max_err(got, ort_run(proto, feeds)[0]) < 1e-5


def test_optimize_ends_legalized_and_says_what_it_split_back():
    proto = one_node("FastGelu", {"x": r(2, 3, 16), "b": r(16)}, ["y"], domain="com.microsoft", opset=17)
    proto.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 16]))
    out = graphopt.optimize(graphopt.Model.from_proto(proto), target="cpu", verify=True)
    assert out.history[-1].name == "legalize" and "com.microsoft::FastGelu" not in out.op_histogram()
    assert out.history[-1].lines() == ["split back 1 × com.microsoft::FastGelu: cpu does not support "
                                       "com.microsoft::FastGelu"]
    assert out.history[-1].to_dict()["split_back"] == [
        {"op": "com.microsoft::FastGelu", "reason": "cpu does not support com.microsoft::FastGelu", "count": 1,
         "source": "graphopt.passes"}]
