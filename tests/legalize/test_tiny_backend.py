"""A third-party backend with a deliberately small op set runs every exported fixture.

The ``tiny`` target (see :mod:`tiny_plugin`) is installed as a distribution with an entry
point and found through graphopt's plugin discovery. It declares no ``Attention``,
``RMSNormalization`` or ``RotaryEmbedding`` and refuses blocked ``DequantizeLinear``.
``graphopt.optimize(path, target="tiny")`` must end with a graph tiny runs (the fusion
passes ask the target first; legalization splits back the rest, the 4-bit weights'
blocked DequantizeLinear included), and that graph must compute what torch computed
(fp32) or what onnxruntime computes on the same quantized model before legalization.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphopt
from conftest import FIXTURE_MODELS, fixture_ids, run_ort, split_reference
from tiny_plugin import DIST, ENTRY_POINT, LEFT_OUT, MODULE, tiny_target  # noqa: F401 - a fixture

QUANT = dict(quant_bits=4, quant_block=32)


def _blocked_dq(model: graphopt.Model) -> list[str]:
    return [n.name for n in model.graph.nodes if n.op == "DequantizeLinear" and int(n.attrs.get("block_size", 0))]


def test_found_through_its_entry_point(tiny_target):
    registry = graphopt.get_registry()
    assert registry.backends[tiny_target].plugin == ENTRY_POINT
    assert registry.plugins[ENTRY_POINT] == f"{DIST} 0.1"
    assert registry.problems == []
    tiny = graphopt.get_backend(tiny_target)
    assert type(tiny).__module__ == MODULE and tiny.can_execute() and tiny.available() is None
    for op in LEFT_OUT:
        assert not tiny.supports_op(op, "", 23), op
    assert tiny.supports_op("DequantizeLinear", "", 21) and tiny.supports_op("MatMul", "", 18)
    assert {o["op_type"] for o in tiny.describe()["ops"]} >= {"MatMul", "Softmax", "DequantizeLinear", "Gather"}


def test_refuses_blocked_dequantize_linear_with_the_reason(tiny_target):
    model = graphopt.optimize(FIXTURE_MODELS[0], target="cpu", passes=["shape-inference", "quantize"], **QUANT)
    dq = next(n for n in model.graph.nodes if n.op == "DequantizeLinear")
    assert graphopt.get_backend(tiny_target).check(dq, model) == (
        "tiny cannot run this DequantizeLinear: blocked DequantizeLinear (block_size > 0) is not supported")
    with pytest.raises(graphopt.BackendError, match=r"tiny cannot run \d+ node\(s\): .*blocked DequantizeLinear"):
        graphopt.get_backend(tiny_target).compile(model)  # compile itself never runs what it refuses


@pytest.mark.parametrize("path", FIXTURE_MODELS, ids=fixture_ids())
def test_runs_fixture_like_torch(path, tiny_target):
    model = graphopt.optimize(path, target=tiny_target)

    assert graphopt.unsupported_nodes(model, tiny_target) == []
    assert not set(LEFT_OUT) & set(model.op_histogram())
    feeds, expected = split_reference(path)
    got = graphopt.compile(model, tiny_target).run(feeds)
    assert set(got) == set(expected)
    for name, want in expected.items():
        np.testing.assert_allclose(got[name], want, atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize("path", FIXTURE_MODELS, ids=fixture_ids())
def test_runs_fixture_4bit_like_onnxruntime(path, tiny_target):
    """onnxruntime runs the quantized model as the passes left it (blocked DequantizeLinear,
    activations kept in float); tiny runs what optimize legalized of it."""
    ctx = graphopt.PassContext(target=graphopt.get_backend(tiny_target), options=dict(QUANT))
    quantized = graphopt.build_pipeline().run(graphopt.load(path), ctx)
    assert _blocked_dq(quantized)
    model = graphopt.optimize(path, target=tiny_target, **QUANT)

    assert graphopt.unsupported_nodes(model, tiny_target) == [] and _blocked_dq(model) == []
    assert not set(LEFT_OUT) & set(model.op_histogram())
    (split,) = [s for s in model.history[-1].split_back if s.op == "DequantizeLinear"]
    assert split.count == len(_blocked_dq(quantized)) and split.source == "graphopt.passes"
    assert split.reason == "tiny cannot run this DequantizeLinear: blocked DequantizeLinear (block_size > 0) is " \
                           "not supported"
    onnx.checker.check_model(model.to_onnx())
    feeds, _ = split_reference(path)
    want = run_ort(quantized, feeds)
    got = graphopt.compile(model, tiny_target).run(feeds)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=0, err_msg=name)


def test_runs_other_architectures_like_torch(arch_model, tiny_target):
    """Gemma, Qwen3, Mistral, Phi-3 and the opset-23 export (whose exporter-written
    RMSNormalization / RotaryEmbedding tiny splits back)."""
    model = graphopt.optimize(arch_model, target=tiny_target)
    assert graphopt.unsupported_nodes(model, tiny_target) == []
    assert not set(LEFT_OUT) & set(model.op_histogram())
    feeds, expected = split_reference(arch_model)
    got = graphopt.compile(model, tiny_target).run(feeds)
    for name, want in expected.items():
        np.testing.assert_allclose(got[name], want, atol=1e-4, rtol=0, err_msg=name)
