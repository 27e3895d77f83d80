"""tie-embedding-dedupe: tied weights stored once, whichever way the exporter stored them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from conftest import FIXTURES, run_ort, split_reference


def _matrices(model: graphopt.Model, numel: int) -> list[tuple]:
    return sorted(tuple(t.shape) for t in model.constants().values() if int(np.prod(t.shape)) == numel)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_tied_qwen2_keeps_one_matrix(exporter, tmp_path):
    src = FIXTURES / f"qwen2-{exporter}-decode.onnx"
    model = graphopt.load(src)
    out = graphopt.optimize(model, target="onnxruntime", verify=True)
    stats = {s.name: s.counters for s in out.history}
    assert _matrices(out, 512 * 64) == [(512, 64)]
    saved = tmp_path / "out.onnx"
    out.save(saved)
    if exporter == "torchscript":  # stored twice by the exporter: one copy goes
        assert _matrices(model, 512 * 64) == [(64, 512), (512, 64)]
        assert stats["tie-embedding-dedupe"] == {"tied": 1, "bytes_saved": 512 * 64 * 4}
    else:  # stored once, transposed at run time: the pass has nothing to do, folding must not copy it
        assert stats["tie-embedding-dedupe"] == {"tied": 0, "bytes_saved": 0}
        assert stats["constant-folding"]["skipped_shared"] == 1
    feeds, expected = split_reference(src)
    got = run_ort(saved, feeds)
    np.testing.assert_allclose(got["logits"], expected["logits"], atol=1e-4, rtol=0)


def test_torchscript_file_shrinks_by_the_duplicate(tmp_path):
    src = FIXTURES / "qwen2-torchscript-decode.onnx"
    model = graphopt.load(src)
    passes = ["shape-inference", "tie-embedding-dedupe", "dead-code-elimination"]
    graphopt.optimize(model, passes=["shape-inference", "dead-code-elimination"]).save(tmp_path / "a.onnx")
    graphopt.optimize(model, passes=passes, verify=True).save(tmp_path / "b.onnx")
    shrink = (tmp_path / "a.onnx").stat().st_size - (tmp_path / "b.onnx").stat().st_size
    assert 512 * 64 * 4 - 1024 < shrink <= 512 * 64 * 4  # the tensor, less the Transpose node that replaces it


def test_untied_llama_is_left_alone():
    model = graphopt.load(FIXTURES / "llama-torchscript-decode.onnx")
    out = graphopt.optimize(model, passes=["tie-embedding-dedupe"])
    assert out.history[0].counters == {"tied": 0, "bytes_saved": 0}


def _tied(second: np.ndarray) -> graphopt.Model:
    table = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"]),
             helper.make_node("MatMul", ["h", "head"], ["logits"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 64])],
                          [numpy_helper.from_array(table, "table"), numpy_helper.from_array(second(table), "head")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(proto)
    return graphopt.Model.from_proto(proto)


def test_transposed_copy_becomes_a_transpose_of_the_table():
    model = _tied(lambda t: np.ascontiguousarray(t.T))
    out = graphopt.optimize(model, passes=["tie-embedding-dedupe", "dead-code-elimination"], verify=True)
    assert sorted(out.constants()) == ["table"]
    assert [n.op for n in out.graph.nodes] == ["Gather", "Transpose", "MatMul"]
    feeds = {"ids": np.array([[1, 5, 63]], np.int64)}
    np.testing.assert_array_equal(run_ort(out, feeds)["logits"], run_ort(model, feeds)["logits"])


def test_almost_transposed_copy_is_kept():
    def perturbed(t):
        c = np.ascontiguousarray(t.T)
        c[3, 7] += 1e-3
        return c
    out = graphopt.optimize(_tied(perturbed), passes=["tie-embedding-dedupe"])
    assert out.history[0].counters["tied"] == 0 and sorted(out.constants()) == ["head", "table"]
