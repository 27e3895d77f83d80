"""Fuse, then split back, on every exported fixture: the split-back graph is no bigger than
the unfused export and computes the same outputs (onnxruntime and the cpu backend)."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.backends.cuda import CudaBackend
from conftest import FIXTURES, run_cli, run_ort, split_reference
from legalize_helpers import PRIMITIVE

FUSED_OPS = {"RMSNormalization", "RotaryEmbedding", "Attention"}
#: The cuda table without its Attention/RotaryEmbedding (``GRAPHOPT_CUDA_FUSED_ATTENTION=0``): a real
#: target that lacks some fused ops, so the split-back design is exercised on it.
CUDA_SPLIT = CudaBackend(fused_attention=False)
NO_FUSED_ATTENTION = {**os.environ, "GRAPHOPT_CUDA_FUSED_ATTENTION": "0"}


@pytest.fixture(scope="module")
def fused_models():
    cache = {}

    def get(path):
        if path not in cache:
            original = graphopt.load(path)
            cache[path] = (original, graphopt.optimize(original, target="cpu"))
        return cache[path]
    return get


@pytest.mark.parametrize("target", [CUDA_SPLIT, PRIMITIVE], ids=["cuda-split-attention", "primitive"])
def test_fuse_then_split_back(fixture_model, target, fused_models):
    original, fused = fused_models(fixture_model)
    assert FUSED_OPS <= set(fused.op_histogram())
    split = graphopt.legalize(fused, target)

    assert graphopt.unsupported_nodes(split, target) == []
    assert split.node_count() <= original.node_count()
    kept = {"RMSNormalization"} if target is CUDA_SPLIT else set()
    assert set(split.op_histogram()) & FUSED_OPS == kept
    feeds, _ = split_reference(fixture_model)
    want_ort = run_ort(original, feeds)
    want_cpu = graphopt.compile(original, "cpu").run(feeds)
    got_ort = run_ort(split, feeds)
    got_cpu = graphopt.compile(split, "cpu").run(feeds)
    for name, want in want_ort.items():
        np.testing.assert_allclose(got_ort[name], want, atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(got_cpu[name], want_cpu[name], atol=1e-5, rtol=0, err_msg=name)


def _cli(*args, env=None):
    return run_cli(*args, env=env, timeout=300)


@pytest.mark.parametrize("name", ["llama-dynamo-decode", "qwen2-torchscript-prefill"])
def test_optimize_for_cuda_writes_only_what_cuda_declares(name, tmp_path):
    src, out, report = FIXTURES / f"{name}.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    res = _cli("optimize", str(src), "-o", str(out), "--target", "cuda", "--report", str(report))
    assert res.returncode == 0, res.stderr
    model = graphopt.load(out)
    assert graphopt.unsupported_nodes(model, "cuda") == []
    assert model.op_histogram()["RMSNormalization"] == 5  # cuda declares it: it stays fused
    assert model.op_histogram()["Attention"] == 2  # and Attention (one per layer)
    feeds, expected = split_reference(src)
    got = run_ort(out, feeds)
    for key, want in expected.items():
        np.testing.assert_allclose(got[key], want, atol=1e-4, rtol=0, err_msg=key)
    assert json.loads(report.read_text())["split_back"] == []  # attention-fuse asked cuda first


def test_optimize_reports_what_it_split_back(tmp_path):
    """A model fused for cpu (Attention, RotaryEmbedding), re-targeted at cuda without fused attention."""
    fused, out, report = tmp_path / "fused.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    src = FIXTURES / "qwen2-dynamo-decode.onnx"
    assert _cli("optimize", str(src), "-o", str(fused), "--target", "cpu").returncode == 0
    res = _cli("optimize", str(fused), "-o", str(out), "--target", "cuda", "--report", str(report), "--verify",
               env=NO_FUSED_ATTENTION)
    assert res.returncode == 0, res.stderr
    lines = [line.strip() for line in res.stdout.splitlines() if line.strip().startswith("split back")]
    assert lines == ["split back 4 × RotaryEmbedding: cuda does not support RotaryEmbedding",
                     "split back 2 × Attention: cuda does not support Attention"]
    data = json.loads(report.read_text())
    assert [(s["op"], s["count"], s["reason"], s["source"]) for s in data["split_back"]] == [
        ("RotaryEmbedding", 4, "cuda does not support RotaryEmbedding", "graphopt.passes"),
        ("Attention", 2, "cuda does not support Attention", "graphopt.passes")]
    assert data["passes"][-1]["name"] == "legalize" and data["passes"][-1]["counters"]["split_back"] == 6
    assert data["nodes_after"] == len(onnx.load(str(out)).graph.node) <= len(onnx.load(str(src)).graph.node)
    feeds, expected = split_reference(src)
    got = run_ort(out, feeds)
    for key, want in expected.items():
        np.testing.assert_allclose(got[key], want, atol=1e-4, rtol=0, err_msg=key)


def test_unsupported_op_fails_optimize_with_one_line(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("LpPool", ["x"], ["y"], name="pool", kernel_shape=[2])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 3])])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src))
    res = _cli("optimize", str(src), "-o", str(tmp_path / "out.onnx"), "--target", "cuda")
    assert res.returncode == 1 and not (tmp_path / "out.onnx").exists()
    assert res.stderr.strip() == "graphopt optimize: error: cuda cannot run 1 node(s): pool (LpPool): cuda does " \
                                 "not support LpPool"
