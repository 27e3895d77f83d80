"""The cuda target's table exists on any machine: importable and queryable without CuPy or
a GPU; without one, compiling is refused with the reason."""

from __future__ import annotations

import subprocess
import sys

import pytest

import graphopt
from graphopt.backends.cuda import CudaBackend


def test_importing_never_imports_cupy():
    code = "import sys, graphopt; graphopt.get_backend('cuda').ops(); print('cupy' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


def test_table_is_the_contract():
    cuda = graphopt.get_backend("cuda")
    assert isinstance(cuda, CudaBackend) and cuda.device == "cuda"
    assert cuda.supports_op("RMSNormalization", "", 23) and cuda.supports_op("MatMul", "", 18)
    assert cuda.supports_op("DequantizeLinear", "", 21) and not cuda.supports_op("DequantizeLinear", "", 19)
    for op in ("Attention", "RotaryEmbedding"):  # verified on an H100: declared by default
        assert cuda.supports_op(op, "", 23), op
        assert not CudaBackend(fused_attention=False).supports_op(op, "", 23), op
    for op in ("LayerNormalization", "Gelu"):
        assert not cuda.supports_op(op, "", 23), op
    assert not cuda.supports_op("GroupQueryAttention", "com.microsoft", 1)
    described = cuda.describe()
    assert described["executes"] is True and described["available"] is (cuda.available() is None)
    assert {o["op_type"] for o in described["ops"]} >= {"MatMul", "Softmax", "RMSNormalization", "Gather"}


def test_compile_says_why_not():
    cuda = graphopt.get_backend("cuda")
    reason = cuda.available()
    if reason is None:
        pytest.skip("a GPU is present: the cuda target compiles here")
    assert "CuPy" in reason or "GPU" in reason
    with pytest.raises(graphopt.BackendError, match=r"target 'cuda' is unavailable here: "):
        graphopt.compile(graphopt.load(__import__("conftest").FIXTURES / "llama-dynamo-decode.onnx"), "cuda")
    with pytest.raises(graphopt.BackendError, match=r"backend 'cuda' cannot compile here: .*still legalizes"):
        cuda.compile(None)


def test_predicates_look_at_dtypes():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"], name="add")], "g",
                              [helper.make_tensor_value_info(n, TensorProto.DOUBLE, [2]) for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2])])
    model = graphopt.Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert graphopt.get_backend("cuda").check(model.graph.nodes[0], model) == \
        "cuda cannot run this Add: dtype double of 'a' is not supported"
