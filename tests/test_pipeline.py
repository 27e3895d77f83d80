"""Pass infrastructure: ordering, verification, statistics, failure reporting."""

from __future__ import annotations

import onnx_graphsurgeon as gs
import pytest

import graphopt
from graphopt import Pass, PassResult, Pipeline
from graphopt._pipeline import order_passes


def _pass(name, *, before=(), after=(), run=None):
    def default_run(self, model, ctx):
        model.metadata_props.setdefault("order", "")
        model.metadata_props["order"] += name + ";"
        return PassResult(False)

    return type(name.title().replace("-", ""), (Pass,), {
        "name": name, "summary": name, "before": before, "after": after, "run": run or default_run})()


def test_order_respects_constraints_and_keeps_given_order_otherwise():
    a, b, c, d = _pass("a"), _pass("b", before=("a",)), _pass("c"), _pass("d", after=("c", "zzz-absent"))
    assert [p.name for p in order_passes([a, b, c, d])] == ["b", "a", "c", "d"]
    assert [p.name for p in order_passes([d, c, a])] == ["c", "d", "a"]


def test_constraint_cycle_is_an_error():
    with pytest.raises(graphopt.PluginError, match=r"form a cycle: (x -> y|y -> x)"):
        order_passes([_pass("x", before=("y",)), _pass("y", before=("x",))])


def test_duplicate_pass_is_an_error():
    with pytest.raises(graphopt.PluginError, match="appears twice"):
        order_passes([_pass("x"), _pass("x")])


def test_runs_in_order_on_a_copy_and_records_stats(mlp_proto):
    model = graphopt.Model.from_proto(mlp_proto)
    out = Pipeline([_pass("first"), _pass("second")], verify=True).run(model)
    assert out.metadata_props["order"] == "first;second;"
    assert "order" not in model.metadata_props
    assert [s.name for s in out.history] == ["first", "second"]
    assert all(s.nodes_before == s.nodes_after == model.node_count() for s in out.history)
    assert all(s.seconds >= 0 for s in out.history)


def _delete_relu_and_raise(self, model, ctx):
    model.graph.nodes = [n for n in model.graph.nodes if n.op != "Relu"]
    raise RuntimeError("boom")


def test_pass_failure_names_pass_and_history_and_leaves_model_untouched(mlp_proto):
    model = graphopt.Model.from_proto(mlp_proto)
    ops_before = [n.op for n in model.graph.nodes]
    pipe = Pipeline([_pass("one"), _pass("two"), _pass("bad", run=_delete_relu_and_raise), _pass("never")])
    with pytest.raises(graphopt.PassError) as info:
        pipe.run(model)
    assert str(info.value) == "pass 'bad' failed after ['one', 'two']: RuntimeError: boom"
    assert info.value.pass_name == "bad" and info.value.ran_before == ["one", "two"]
    assert [n.op for n in model.graph.nodes] == ops_before
    assert model.history == [] and "order" not in model.metadata_props


def _dangle(self, model, ctx):
    relu = next(n for n in model.graph.nodes if n.op == "Relu")
    relu.inputs[0] = gs.Variable("nobody_makes_this")
    return PassResult(True)


def _cycle(self, model, ctx):
    mm = [n for n in model.graph.nodes if n.op == "MatMul"]
    relu = [n for n in model.graph.nodes if n.op == "Relu"]
    mm[0].inputs[0] = relu[1].outputs[0]
    return PassResult(True)


def _bad_attr(self, model, ctx):
    model.graph.nodes[0].op = "NoSuchOp"
    return PassResult(True)


@pytest.mark.parametrize("run, message", [
    (_dangle, r"node relu0 \(Relu\) reads 'nobody_makes_this', which no node, graph input or constant produces"),
    (_cycle, r"graph has a cycle: .*mm0 \(MatMul\)"),
    (_bad_attr, r"onnx checker: No Op registered for NoSuchOp"),
], ids=["dangling-input", "cycle", "checker"])
def test_verification_catches_broken_pass(mlp_proto, run, message):
    model = graphopt.Model.from_proto(mlp_proto)
    with pytest.raises(graphopt.PassError, match=r"pass 'breaker' failed after \['fine'\]: VerificationError: " + message):
        Pipeline([_pass("fine"), _pass("breaker", run=run)], verify=True).run(model)
    # without verification the same broken pass goes through: that is what verify is for
    Pipeline([_pass("breaker", run=run)], verify=False).run(model)


def test_pass_must_return_pass_result(mlp_proto):
    with pytest.raises(graphopt.PassError, match="returned NoneType, expected PassResult"):
        Pipeline([_pass("lazy", run=lambda self, m, c: None)]).run(graphopt.Model.from_proto(mlp_proto))


def test_optimize_unknown_pass_and_target(mlp_proto):
    model = graphopt.Model.from_proto(mlp_proto)
    with pytest.raises(graphopt.UnknownNameError, match=r"unknown pass 'fuse-everything'; known passes: .*constant-folding"):
        graphopt.optimize(model, passes=["fuse-everything"])
    with pytest.raises(graphopt.UnknownNameError, match=r"unknown target 'tpu'; known targets: cpu"):
        graphopt.optimize(model, target="tpu")
    with pytest.raises(graphopt.UnknownNameError, match="unknown pass 'nope'"):
        graphopt.optimize(model, disable=["nope"])


def test_default_pipeline_order():
    pipe = graphopt.build_pipeline(passes=None)
    names = pipe.names
    assert names[-1] == "dead-code-elimination"
    assert names.index("shape-inference") < names.index("constant-folding") < names.index("initializer-dedupe")
