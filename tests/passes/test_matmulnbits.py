"""matmulnbits-format (``--quant-format matmulnbits``): the quantize pass's DequantizeLinear → MatMul
pairs as onnxruntime's com.microsoft MatMulNBits, codes and scales bit for bit; the tied LM head too;
the decomposition takes them back for a target without MatMulNBits."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import graphopt
from conftest import FIXTURES, run_cli, run_ort, split_reference
from graphopt._inputs import InputSpec, build_inputs
from graphopt.passes.matmulnbits import pack_matmulnbits

SETTINGS = [dict(quant_bits=4, quant_block=32), dict(quant_bits=4, quant_block=16, quant_symmetric=False),
            dict(quant_bits=8, quant_block=128, quant_lm_bits=8)]


def _nbits(model) -> list:
    return [n for n in model.graph.nodes if n.op == "MatMulNBits" and n.domain == "com.microsoft"]


@pytest.mark.parametrize("name", ["llama-dynamo-decode", "qwen2-dynamo-decode"])
@pytest.mark.parametrize("options", SETTINGS, ids=["int4-b32", "uint4-b16-asym", "int8-b128"])
def test_matmulnbits_output_equals_the_qdq_output(name, options):
    src = graphopt.load(FIXTURES / f"{name}.onnx")
    qdq = graphopt.optimize(src, target="onnxruntime", **options)
    nb = graphopt.optimize(src, target="onnxruntime", quant_format="matmulnbits", **options)
    quantized = next(s for s in qdq.history if s.name == "quantize").counters
    matmuls = quantized.get("linear", 0) + quantized.get("lm_head", 0) + quantized.get("tied", 0)
    assert len(_nbits(nb)) == matmuls > 0
    assert nb.opset("com.microsoft") == 1
    # what stays QDQ is only what feeds a Gather (qwen2's tied embedding, read by the LM head as MatMulNBits)
    assert all(c.op == "Gather" for n in nb.graph.nodes if n.op == "DequantizeLinear" for c in n.outputs[0].outputs)
    if name.startswith("qwen2"):
        assert any(n.attrs["N"] == 512 for n in _nbits(nb))  # the tied LM head (vocab 512)
    feeds, want = split_reference(FIXTURES / f"{name}.onnx")
    got, ref = run_ort(nb, feeds), run_ort(qdq, feeds)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=0, err_msg=k)


@pytest.mark.parametrize("options", SETTINGS, ids=["int4-b32", "uint4-b16-asym", "int8-b128"])
def test_the_decomposition_takes_matmulnbits_back_for_the_cpu_backend(options):
    """Our packing against the independent MatMulNBits decomposition: legalized for cpu (which does
    not declare MatMulNBits) and run by the cpu backend, the model computes what the QDQ one does."""
    path = FIXTURES / "qwen2-dynamo-decode.onnx"
    nb = graphopt.optimize(graphopt.load(path), target="onnxruntime", quant_format="matmulnbits", **options)
    back = graphopt.legalize(nb, "cpu")
    assert not _nbits(back)
    qdq = graphopt.optimize(graphopt.load(path), target="cpu", **options)
    feeds, _ = split_reference(path)
    got, want = graphopt.compile(back, "cpu").run(feeds), graphopt.compile(qdq, "cpu").run(feeds)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=0, err_msg=k)


def test_round_to_nearest_is_onnxruntimes_quantizer_byte_for_byte():
    """rtn, 4 bits, block 32, symmetric, as MatMulNBits: every codes blob and scale equals what
    onnxruntime's MatMulNBitsQuantizer wrote for the same model (the committed
    ort-llama_dynamo_decode_nbits4 fixture, tests/legalize/make_ort_fixtures.py), LM head included."""
    from onnx import numpy_helper

    ours = graphopt.optimize(graphopt.load(FIXTURES / "llama-dynamo-decode.onnx"), target="onnxruntime",
                             passes=["quantize", "matmulnbits-format", "dead-code-elimination"], quant_bits=4,
                             quant_block=32, quant_lm_bits=4, quant_format="matmulnbits").to_onnx()
    theirs = onnx.load(str(FIXTURES / "ort-llama_dynamo_decode_nbits4.onnx"))

    def blobs(model) -> dict:
        init = {t.name: t for t in model.graph.initializer}
        return {n.output[0]: [numpy_helper.to_array(init[name]).ravel() for name in n.input[1:3]]
                for n in model.graph.node if n.op_type == "MatMulNBits"}
    ours, theirs = blobs(ours), blobs(theirs)
    assert sorted(ours) == sorted(theirs) and len(ours) == 15
    for out, (codes, scales) in theirs.items():
        assert ours[out][0].tobytes() == codes.tobytes(), out
        assert ours[out][1].tobytes() == scales.tobytes(), out


def test_packing_layout():
    codes = np.array([[-8, 7, 0, 1, -1]], np.int8)  # one column, K = 5, block 4: a partial second block
    b, s, z = pack_matmulnbits(codes, np.array([[0.5, 2.0]], np.float32), None, 4, True, 4)
    # +8: 0, 15, 8, 9 | 7 (then zero padding); low nibble first
    assert b.shape == (1, 2, 2) and b.tolist() == [[[0xF0, 0x98], [0x07, 0x00]]]
    assert s.tolist() == [0.5, 2.0] and z is None
    u = np.array([[3, 12]], np.uint8)
    _, _, z = pack_matmulnbits(u, np.ones((1, 1), np.float32), np.array([[5]], np.uint8), 4, False, 16)
    assert z.tolist() == [5]  # one block: one nibble, padded to a byte


def test_bad_format_and_format_without_bits(tmp_path):
    with pytest.raises(graphopt.PassError, match="quant format 'gguf' is not one of qdq, matmulnbits"):
        graphopt.optimize(graphopt.load(FIXTURES / "llama-dynamo-decode.onnx"), quant_bits=4, quant_format="gguf")
    res = run_cli("optimize", FIXTURES / "llama-dynamo-decode.onnx", "-o", tmp_path / "o.onnx",
                  "--quant-format", "matmulnbits")
    assert res.returncode != 0 and res.stderr.strip() == \
        "graphopt optimize: error: quantization options need --quant-bits (4 or 8)"
    assert not (tmp_path / "o.onnx").exists()


def test_accuracy_level_is_written_and_onnxruntime_honours_it(tmp_path):
    src = FIXTURES / "llama-dynamo-decode.onnx"
    outs = {}
    for level in (0, 4):
        dst = tmp_path / f"l{level}.onnx"
        res = run_cli("optimize", src, "-o", dst, "--target", "onnxruntime", "--quant-bits", "4",
                      "--quant-format", "matmulnbits", "--quant-accuracy-level", str(level), "--no-quality")
        assert res.returncode == 0, res.stderr
        nodes = [n for n in onnx.load(dst).graph.node if n.op_type == "MatMulNBits"]
        assert nodes and all(helper.get_node_attr_value(n, "accuracy_level") == level for n in nodes)
        feeds = build_inputs(graphopt.load(dst), InputSpec(batch=2, seq=3, past=4))
        outs[level] = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    diff = np.abs(outs[4] - outs[0])
    assert 0 < diff.max() < 0.05 * np.abs(outs[0]).max()  # int8 activations: a small, real difference


def test_bad_accuracy_level(tmp_path):
    with pytest.raises(graphopt.PassError, match="quant accuracy level 7 is not one of 0, 1, 2, 3, 4"):
        graphopt.optimize(graphopt.load(FIXTURES / "llama-dynamo-decode.onnx"), quant_bits=4,
                          quant_format="matmulnbits", quant_accuracy_level=7)
    res = run_cli("optimize", FIXTURES / "llama-dynamo-decode.onnx", "-o", tmp_path / "o.onnx",
                  "--quant-bits", "4", "--quant-accuracy-level", "4")
    assert res.returncode != 0 and res.stderr.strip().startswith(
        "graphopt optimize: error: --quant-accuracy-level is an attribute of MatMulNBits: use it with --quant-format "
        "matmulnbits")
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.onnx").exists()
