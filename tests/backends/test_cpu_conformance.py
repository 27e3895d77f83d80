"""The ONNX backend node tests (shipped in the onnx wheel) against every op the cpu backend declares."""

from __future__ import annotations

import pytest

import graphopt
from graphopt._conformance import applicable, classify, run_case

CPU = graphopt.get_backend("cpu")
CASES, APPLIES = applicable(CPU)


def test_conformance_covers_the_llm_op_set():
    ops = {n.op_type for name in APPLIES for n in CASES[name].model.graph.node}
    required = set("MatMul Gemm Add Sub Mul Div Pow Sqrt Reciprocal Neg Exp Log Sin Cos Sigmoid Tanh Erf Relu "
                   "Gelu Softmax ReduceMean ReduceSum ReduceMax Transpose Reshape Flatten Gather GatherElements "
                   "Concat Slice Split Squeeze Unsqueeze Expand Tile Where Cast CastLike Shape Size Range Equal "
                   "Less Greater And Or Not Trilu ConstantOfShape Constant Identity ScatterND TopK ArgMax Einsum "
                   "IsNaN Max Min Clip".split())
    assert required <= ops, sorted(required - ops)
    assert len(APPLIES) >= 700


@pytest.mark.parametrize("name", APPLIES)
def test_node_case(name):
    result = run_case(CPU, CASES[name])
    assert result.status == "passed", result.detail


def test_undeclared_ops_are_refused_with_a_reason():
    case = CASES["test_conv_with_strides_padding"]
    status, reason, _ = classify(CPU, case)
    assert status == "undeclared" and reason == "cpu does not support Conv"
    status, reason, _ = classify(CPU, CASES["test_castlike_FLOAT_to_BFLOAT16"])
    assert (status, reason) == ("narrowed", "cpu cannot run this CastLike: dtype bfloat16 of 'like' is not supported")
