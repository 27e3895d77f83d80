"""Fused and quantized kernels of the cpu backend (backends/cpu_fused.py).

Every kernel is checked against onnx's ReferenceEvaluator and, where onnxruntime
runs the op, against onnxruntime, on random inputs covering the op's variants.
The dequant-matmul compile rewrite is checked for firing, equality with the
unfused graph, and its memory bound.
"""

from __future__ import annotations

import os
import select
import signal
import time
import tracemalloc

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import graphopt
from graphopt import BackendError, Model
from graphopt.backends import cpu, cpu_fused

ATOL = 1e-5
CPU = graphopt.get_backend("cpu")


# ----------------------------------------------------------------- helpers
def _tensor_type(a: np.ndarray) -> int:
    return helper.np_dtype_to_tensor_dtype(a.dtype)


def single_op(op: str, inputs: dict, outputs: list[str], opset: int, out_types: dict | None = None,
              initializers: dict | None = None, **attrs) -> onnx.ModelProto:
    """A one-node model. ``inputs`` maps names to arrays (None: omitted optional input, named '')."""
    initializers = initializers or {}
    in_names = [name if value is not None else "" for name, value in inputs.items()]
    while in_names and in_names[-1] == "":
        in_names.pop()
    node = helper.make_node(op, in_names, outputs, **attrs)
    graph_inputs = [helper.make_tensor_value_info(k, _tensor_type(v), v.shape)
                    for k, v in inputs.items() if v is not None and k not in initializers]
    out_types = out_types or {}
    graph_outputs = [helper.make_tensor_value_info(o, out_types.get(o, TensorProto.FLOAT), None) for o in outputs if o]
    graph = helper.make_graph([node], "g", graph_inputs, graph_outputs,
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def feeds_of(inputs: dict, initializers: dict | None = None) -> dict:
    return {k: v for k, v in inputs.items() if v is not None and k not in (initializers or {})}


def run_cpu(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    model = Model.from_proto(proto)
    assert CPU.check(model.graph.nodes[0], model) is None, CPU.check(model.graph.nodes[0], model)
    exe = graphopt.compile(model, "cpu")
    got = exe.run(feeds)
    return [got[o.name] for o in proto.graph.output]


def run_ref(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    with np.errstate(all="ignore"):
        return list(ReferenceEvaluator(proto).run(None, feeds))


def run_ort(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_close(got, want, atol=ATOL, rtol=0.0):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape, (g.shape, w.shape)
        assert g.dtype == w.dtype, (g.dtype, w.dtype)
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), atol=atol, rtol=rtol)


def check(proto, feeds, ort=True, atol=ATOL, ref=True):
    got = run_cpu(proto, feeds)
    if ref:
        assert_close(got, run_ref(proto, feeds), atol=atol)
    if ort:
        want = run_ort(proto, feeds)
        # onnxruntime writes masked logits (qk_matmul_output mode 2) as the lowest float, the spec and
        # the reference as -inf
        want = [np.where((w == np.finfo(w.dtype).min) & np.isneginf(g), g, w) if w.dtype.kind == "f" else w
                for g, w in zip(got, want)]
        assert_close(got, want, atol=atol)
    return got


def rnd(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------ norms
@pytest.mark.parametrize("axis", [-1, -2, 1, 0])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_normalization(axis, with_bias):
    rng = np.random.default_rng(0)
    x = rnd(rng, 2, 3, 5, 8)
    norm_shape = x.shape[axis % 4:]
    inputs = {"X": x, "S": rnd(rng, *norm_shape), "B": rnd(rng, *norm_shape) if with_bias else None}
    proto = single_op("LayerNormalization", inputs, ["Y", "Mean", "InvStd"], 17, axis=axis, epsilon=1e-3)
    got = check(proto, feeds_of(inputs))
    assert got[1].shape == x.shape[:axis % 4] + (1,) * (4 - axis % 4)


def test_layer_normalization_float16_and_y_only():
    rng = np.random.default_rng(1)
    inputs = {"X": rnd(rng, 4, 16, dtype=np.float16), "S": rnd(rng, 16, dtype=np.float16)}
    proto = single_op("LayerNormalization", inputs, ["Y"], 17, out_types={"Y": TensorProto.FLOAT16})
    check(proto, inputs, atol=2e-3)


@pytest.mark.parametrize("axis", [-1, -2, 0, 2])
def test_rms_normalization(axis):
    rng = np.random.default_rng(2)
    x = rnd(rng, 2, 3, 4, 8)
    inputs = {"X": x, "S": rnd(rng, *x.shape[axis % 4:])}
    proto = single_op("RMSNormalization", inputs, ["Y"], 23, axis=axis, epsilon=1e-4)
    check(proto, inputs)


def test_rms_normalization_float16_computes_in_float32():
    rng = np.random.default_rng(3)
    x = (rnd(rng, 3, 64) * 100).astype(np.float16)  # x*x overflows float16 beyond 255
    x[0, 0] = 300
    inputs = {"X": x, "S": np.ones(64, np.float16)}
    proto = single_op("RMSNormalization", inputs, ["Y"], 23, out_types={"Y": TensorProto.FLOAT16})
    got = run_cpu(proto, inputs)[0]
    x32 = x.astype(np.float32)
    want = x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + 1e-5)
    assert got.dtype == np.float16 and np.isfinite(got).all()
    np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------ rotary
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("rotary_dim", [0, 4])
@pytest.mark.parametrize("rank", [4, 3])
@pytest.mark.parametrize("with_positions", [True, False])
def test_rotary_embedding(interleaved, rotary_dim, rank, with_positions):
    rng = np.random.default_rng(4)
    b, h, s, d = 2, 3, 5, 8
    half = (rotary_dim or d) // 2
    x = rnd(rng, b, h, s, d) if rank == 4 else rnd(rng, b, s, h * d)
    if with_positions:
        pos = rng.integers(0, 16, (b, s)).astype(np.int64)
        cos, sin = rnd(rng, 16, half), rnd(rng, 16, half)
    else:
        pos, cos, sin = None, rnd(rng, b, s, half), rnd(rng, b, s, half)
    inputs = {"X": x, "cos": cos, "sin": sin, "pos": pos}
    attrs = {"interleaved": interleaved, "rotary_embedding_dim": rotary_dim}
    if rank == 3:
        attrs["num_heads"] = h
    proto = single_op("RotaryEmbedding", inputs, ["Y"], 23, **attrs)
    check(proto, feeds_of(inputs))


@pytest.mark.parametrize("with_positions", [True, False])
def test_rotary_embedding_broadcasts_cache_batch(with_positions):
    """Caches (or position ids) of batch 1 against an input of batch 2: onnx's reference
    broadcasts them, onnxruntime refuses; compare with the reference, and with onnxruntime
    on explicitly repeated caches."""
    rng = np.random.default_rng(5)
    x = rnd(rng, 2, 3, 4, 8)
    if with_positions:
        inputs = {"X": x, "cos": rnd(rng, 10, 4), "sin": rnd(rng, 10, 4), "pos": np.array([[3, 1, 4, 1]], np.int64)}
    else:
        inputs = {"X": x, "cos": rnd(rng, 1, 4, 4), "sin": rnd(rng, 1, 4, 4)}
    proto = single_op("RotaryEmbedding", inputs, ["Y"], 23)
    got = check(proto, inputs, ort=False)
    # the same as giving the caches (position ids) for every batch element explicitly
    batched = ("pos",) if with_positions else ("cos", "sin")
    tiled = {k: (np.repeat(v, 2, axis=0) if k in batched else v) for k, v in inputs.items()}
    tiled_proto = single_op("RotaryEmbedding", tiled, ["Y"], 23)
    assert_close(got, run_ort(tiled_proto, tiled))


def test_rotary_embedding_rejects_a_wrong_cache_width():
    rng = np.random.default_rng(6)
    inputs = {"X": rnd(rng, 1, 2, 3, 8), "cos": rnd(rng, 1, 3, 3), "sin": rnd(rng, 1, 3, 3)}
    with pytest.raises(BackendError, match="cos_cache gives shape"):
        run_cpu(single_op("RotaryEmbedding", inputs, ["Y"], 23), inputs)


# --------------------------------------------------------------- attention
def _attention_inputs(rng, b=2, hq=4, hkv=4, sq=3, skv=5, d=8, dv=8, past=0, three_d=False, mask=None,
                      dtype=np.float32):
    q, k, v = rnd(rng, b, hq, sq, d, dtype=dtype), rnd(rng, b, hkv, skv, d, dtype=dtype), rnd(rng, b, hkv, skv, dv,
                                                                                               dtype=dtype)
    if three_d:
        q = q.transpose(0, 2, 1, 3).reshape(b, sq, hq * d)
        k = k.transpose(0, 2, 1, 3).reshape(b, skv, hkv * d)
        v = v.transpose(0, 2, 1, 3).reshape(b, skv, hkv * dv)
    total = past + skv
    m = None
    if mask == "bool":
        m = rng.random((sq, total)) > 0.3
        m[:, 0] = True
    elif mask == "bool4d":
        m = rng.random((b, hq, sq, total)) > 0.3
        m[..., 0] = True
    elif mask == "float":
        m = rnd(rng, b, 1, sq, total, dtype=dtype)
    elif mask == "float4d":
        m = rnd(rng, b, hq, sq, total, dtype=dtype)
    inputs = {"Q": q, "K": k, "V": v, "attn_mask": m}
    if past:
        inputs["past_key"] = rnd(rng, b, hkv, past, d, dtype=dtype)
        inputs["past_value"] = rnd(rng, b, hkv, past, dv, dtype=dtype)
    return inputs


ATTENTION_CASES = {
    "mha": dict(),
    "scaled": dict(attrs=dict(scale=0.05)),
    "gqa": dict(hq=6, hkv=2),
    "mqa": dict(hq=4, hkv=1),
    "diff_v_head": dict(dv=6),
    "cross_longer_q": dict(sq=7, skv=3),
    "causal": dict(sq=5, skv=5, attrs=dict(is_causal=1)),
    "causal_gqa_with_past": dict(hq=6, hkv=3, sq=3, skv=3, past=4, attrs=dict(is_causal=1)),
    "causal_with_past_decode": dict(sq=1, skv=1, past=6, attrs=dict(is_causal=1)),
    "past_no_causal_float_mask": dict(past=3, mask="float"),
    "bool_mask": dict(mask="bool"),
    "bool_mask_4d": dict(mask="bool4d"),
    "float_mask": dict(mask="float"),
    "float_mask_4d_causal": dict(sq=5, skv=5, mask="float4d", attrs=dict(is_causal=1)),
    "bool_mask_causal_gqa": dict(hq=4, hkv=2, sq=4, skv=4, mask="bool", attrs=dict(is_causal=1)),
    "softcap": dict(attrs=dict(softcap=2.0)),
    "softcap_mask_gqa": dict(hq=6, hkv=2, mask="float", attrs=dict(softcap=1.5)),
    "3d": dict(three_d=True),
    "3d_gqa_causal_past": dict(three_d=True, hq=6, hkv=2, sq=2, skv=2, past=3, attrs=dict(is_causal=1)),
    "3d_softcap_mask": dict(three_d=True, mask="bool", attrs=dict(softcap=3.0)),
    "qk_mode0": dict(mask="float", n_out=4),
    "qk_mode1_softcap": dict(mask="float", n_out=4, attrs=dict(qk_matmul_output_mode=1, softcap=2.0)),
    "qk_mode2_causal_past": dict(past=2, sq=3, skv=3, mask="bool", n_out=4,
                                 attrs=dict(qk_matmul_output_mode=2, is_causal=1)),
    "qk_mode3_gqa": dict(hq=4, hkv=2, mask="bool", n_out=4, attrs=dict(qk_matmul_output_mode=3)),
    "softmax_precision_double": dict(mask="float", attrs=dict(softmax_precision=TensorProto.DOUBLE)),
}


@pytest.mark.parametrize("opset", [23, 24])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention(case, opset):
    spec = dict(ATTENTION_CASES[case])
    attrs = dict(spec.pop("attrs", {}))
    n_out = spec.pop("n_out", 3 if spec.get("past") else 1)
    rng = np.random.default_rng(list(ATTENTION_CASES).index(case))
    inputs = _attention_inputs(rng, **spec)
    if spec.get("three_d"):
        attrs.update(q_num_heads=spec.get("hq", 4), kv_num_heads=spec.get("hkv", 4))
    outputs = ["Y", "present_key", "present_value", "qk"][:n_out]
    if n_out == 4 and not spec.get("past"):
        outputs = ["Y", "", "", "qk"]
    proto = single_op("Attention", inputs, outputs, opset, **attrs)
    check(proto, feeds_of(inputs))


def test_attention_qk_mode0_with_softcap_is_the_raw_product():
    """Spec and onnxruntime: mode 0 is the raw (scaled) Q·Kᵀ, before softcap. onnx's
    reference returns the softcapped product for mode 0 too, so compare with onnxruntime."""
    rng = np.random.default_rng(7)
    inputs = _attention_inputs(rng, mask="float")
    proto = single_op("Attention", inputs, ["Y", "", "", "qk"], 23, softcap=1.0, qk_matmul_output_mode=0)
    got = run_cpu(proto, feeds_of(inputs))
    assert_close(got, run_ort(proto, feeds_of(inputs)))
    raw = inputs["Q"] @ inputs["K"].transpose(0, 1, 3, 2) / np.sqrt(8)
    np.testing.assert_allclose(got[1], raw, atol=ATOL)
    assert np.abs(got[1]).max() > 1.0  # not capped at softcap=1


def test_attention_fully_masked_rows_are_zero():
    rng = np.random.default_rng(8)
    inputs = _attention_inputs(rng, sq=3, skv=4)
    mask = np.ones((3, 4), bool)
    mask[1] = False  # a fully masked query row
    inputs["attn_mask"] = mask
    for mode_attrs, outs in (({}, ["Y"]), ({"qk_matmul_output_mode": 3}, ["Y", "", "", "qk"])):
        proto = single_op("Attention", inputs, outs, 23, **mode_attrs)
        got = check(proto, feeds_of(inputs), ort=False)
        assert np.all(got[0][:, :, 1] == 0) and np.isfinite(got[0]).all()
        if len(got) > 1:
            assert np.all(got[1][:, :, 1] == 0)
    # an additive mask of -inf is the same
    inputs["attn_mask"] = np.where(mask, 0, -np.inf).astype(np.float32)
    got = check(single_op("Attention", inputs, ["Y"], 23), feeds_of(inputs), ort=False)
    assert np.all(got[0][:, :, 1] == 0)


@pytest.mark.parametrize("dtype", ["bool", "float"])
def test_attention_short_mask_is_padded(dtype):
    """A mask shorter than the total sequence length is padded with -inf / False (24+)."""
    rng = np.random.default_rng(9)
    inputs = _attention_inputs(rng, skv=6)
    inputs["attn_mask"] = rng.random((3, 4)) > 0.2 if dtype == "bool" else rnd(rng, 3, 4)
    proto = single_op("Attention", inputs, ["Y"], 24)
    got = check(proto, feeds_of(inputs), ort=False)
    # keys 4, 5 are never attended: changing them changes nothing
    inputs2 = dict(inputs, V=inputs["V"].copy())
    inputs2["V"][:, :, 4:] = 1e6
    np.testing.assert_allclose(run_cpu(proto, feeds_of(inputs2))[0], got[0], atol=ATOL)


@pytest.mark.parametrize("case", ["decode_gqa", "prefill", "negative_offset", "with_mask"])
def test_attention_nonpad_kv_seqlen(case):
    rng = np.random.default_rng(10)
    if case == "decode_gqa":
        inputs = _attention_inputs(rng, hq=4, hkv=2, sq=1, skv=8)
        nonpad = np.array([3, 8], np.int64)
    elif case == "prefill":
        inputs = _attention_inputs(rng, b=3, sq=2, skv=6)
        nonpad = np.array([2, 4, 6], np.int64)
    elif case == "negative_offset":
        inputs = _attention_inputs(rng, b=1, sq=4, skv=4)
        nonpad = np.array([2], np.int64)
    else:
        inputs = _attention_inputs(rng, sq=3, skv=6, mask="bool")
        nonpad = np.array([4, 6], np.int64)
    inputs.update(past_key=None, past_value=None, nonpad_kv_seqlen=nonpad)
    proto = single_op("Attention", inputs, ["Y"], 24, is_causal=1)
    got = check(proto, feeds_of(inputs), ort=case != "negative_offset")
    assert np.isfinite(got[0]).all()


@pytest.mark.parametrize("window", [(2, -1, 1), (1, 2, 0), (2, 0, 0), (-1, -1, 0)])
@pytest.mark.parametrize("past", [0, 3])
def test_attention_25_sliding_window(window, past):
    left, right, causal = window
    rng = np.random.default_rng(11)
    inputs = _attention_inputs(rng, hq=4, hkv=2, sq=4, skv=4, past=past, mask="bool")
    outs = ["Y", "present_key", "present_value"] if past else ["Y"]
    proto = single_op("Attention", inputs, outs, 25, left_window_size=left, right_window_size=right, is_causal=causal)
    check(proto, feeds_of(inputs))


def test_attention_float16():
    rng = np.random.default_rng(12)
    inputs = _attention_inputs(rng, hq=4, hkv=2, past=2, mask="float", dtype=np.float16)
    proto = single_op("Attention", inputs, ["Y", "present_key", "present_value"], 23,
                      out_types=dict.fromkeys(["Y", "present_key", "present_value"], TensorProto.FLOAT16),
                      is_causal=1)
    check(proto, feeds_of(inputs), atol=2e-3)


def test_attention_refuses_bfloat16_with_a_reason():
    q = helper.make_tensor_value_info("Q", TensorProto.BFLOAT16, [1, 1, 2, 4])
    node = helper.make_node("Attention", ["Q", "Q", "Q"], ["Y"])
    proto = helper.make_model(helper.make_graph([node], "g", [q], [helper.make_tensor_value_info(
        "Y", TensorProto.BFLOAT16, None)]), opset_imports=[helper.make_opsetid("", 23)])
    model = Model.from_proto(proto)
    assert CPU.check(model.graph.nodes[0], model) == "cpu cannot run this Attention: dtype bfloat16 of 'Q' is not supported"


# ---------------------------------------------------------- DequantizeLinear
_SUBBYTE = {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4, "int2": ml_dtypes.int2, "uint2": ml_dtypes.uint2}


def _quantized(rng, dtype, shape):
    lo, hi = {"int4": (-8, 8), "uint4": (0, 16), "int8": (-128, 128), "uint8": (0, 256),
              "int16": (-2000, 2000), "uint16": (0, 4000), "int32": (-100000, 100000), "int2": (-2, 2),
              "uint2": (0, 4)}[dtype]
    return rng.integers(lo, hi, shape).astype(_SUBBYTE.get(dtype, np.dtype(dtype)))


DQ_CASES = {
    # name: (x dtype, x shape, scale shape, axis, block, zero point, opset, extra attrs)
    "per_tensor_uint8": ("uint8", (3, 4), (), 1, 0, True, 13, {}),
    "per_axis_int8": ("int8", (3, 4, 2), (4,), 1, 0, True, 13, {}),
    "per_axis_neg_axis": ("int8", (3, 4), (4,), -1, 0, False, 19, {}),
    "int16_per_axis": ("int16", (5, 3), (5,), 0, 0, True, 21, {}),
    "uint16": ("uint16", (6,), (), 0, 0, True, 21, {}),
    "int32_no_zp": ("int32", (4, 3), (3,), 1, 0, False, 21, {}),
    "blocked_int4_zp": ("int4", (8, 6), (2, 6), 0, 4, True, 21, {}),
    "blocked_int4_no_zp": ("int4", (8, 6), (2, 6), 0, 4, False, 21, {}),
    "blocked_uint4_axis1": ("uint4", (3, 8), (3, 4), 1, 2, True, 21, {}),
    "blocked_int4_remainder": ("int4", (10, 4), (3, 4), 0, 4, True, 21, {}),
    "blocked_int8_3d": ("int8", (2, 6, 3), (2, 2, 3), 1, 3, True, 21, {}),
    "per_tensor_int4": ("int4", (7,), (), 0, 0, True, 21, {}),
    "int2": ("int2", (6,), (), 0, 0, True, 25, {}),
    "uint2_blocked": ("uint2", (4, 4), (2, 4), 0, 2, True, 25, {}),
    "float16_scale": ("int8", (4, 3), (3,), 1, 0, True, 21, {}),
    "output_dtype_float16": ("int4", (8, 4), (2, 4), 0, 4, True, 23, {"output_dtype": TensorProto.FLOAT16}),
    "opset10": ("uint8", (5,), (), 1, 0, True, 10, {}),
}
@pytest.mark.parametrize("case", list(DQ_CASES))
def test_dequantize_linear(case):
    xt, xshape, sshape, axis, block, with_zp, opset, extra = DQ_CASES[case]
    rng = np.random.default_rng(13)
    x = _quantized(rng, xt, xshape)
    scale_dtype = np.float16 if case == "float16_scale" else np.float32
    scale = np.asarray(rng.random(sshape) * 0.1 + 0.01, dtype=scale_dtype)
    zp = _quantized(rng, xt, sshape) if with_zp else None
    attrs = dict(extra)
    if opset >= 13:
        attrs["axis"] = axis
    if block:
        attrs["block_size"] = block
    out_type = extra.get("output_dtype", helper.np_dtype_to_tensor_dtype(np.dtype(scale_dtype)))
    # 2/4-bit tensors go in as initializers (as real models store them); the rest as inputs
    inits = {k: v for k, v in (("x", x), ("zp", zp)) if v is not None and xt in ("int4", "uint4", "int2", "uint2")}
    inputs = {"x": x, "scale": scale, "zp": zp}
    proto = single_op("DequantizeLinear", inputs, ["y"], opset, out_types={"y": out_type}, initializers=inits, **attrs)
    feeds = feeds_of(inputs, inits)
    tol = 1e-3 if out_type == TensorProto.FLOAT16 else ATOL
    # onnx's reference implements DequantizeLinear from version 19 on
    check(proto, feeds, ref=opset >= 19, atol=tol)


def test_dequantize_linear_int4_graph_input():
    """4-bit values arriving as a feed (ml_dtypes arrays), not as an initializer."""
    rng = np.random.default_rng(14)
    x = _quantized(rng, "int4", (8, 3))
    inputs = {"x": x, "scale": (rng.random((2, 3)) + 0.1).astype(np.float32), "zp": _quantized(rng, "int4", (2, 3))}
    proto = single_op("DequantizeLinear", inputs, ["y"], 21, axis=0, block_size=4)
    assert_close(run_cpu(proto, inputs), run_ref(proto, inputs))


@pytest.mark.parametrize("scale_shape,block,match", [  # (a partial last block is valid: "blocked_int4_remainder")
    ((3, 6), 4, r"needs \(2, 6\) \(ceil\(8/4\) blocks\)"),   # block_size outside ceil(8/3)..ceil(8/2)-1
    ((2, 5), 4, r"needs \(2, 6\)"),                          # wrong non-blocked dimension
    ((2, 6), 0, "blocked quantization needs block_size > 0"),
])
def test_dequantize_linear_invalid_blocking_is_a_clear_error(scale_shape, block, match):
    """The spec accepts block sizes in [ceil(D/S), ceil(D/(S-1))-1] (the last block may be
    partial, as the reference implements); a scale inconsistent with block_size is an error."""
    rng = np.random.default_rng(15)
    inputs = {"x": _quantized(rng, "int8", (8, 6)), "scale": np.ones(scale_shape, np.float32)}
    attrs = {"axis": 0} | ({"block_size": block} if block else {})
    proto = single_op("DequantizeLinear", inputs, ["y"], 21, **attrs)
    with pytest.raises(BackendError, match=match):
        run_cpu(proto, inputs)


def test_norms_refuse_a_bfloat16_stash_type():
    node = helper.make_node("LayerNormalization", ["x", "s"], ["y"], stash_type=TensorProto.BFLOAT16)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                                            helper.make_tensor_value_info("s", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert CPU.check(model.graph.nodes[0], model) == \
        "cpu cannot run this LayerNormalization: stash_type=16 (bfloat16) is not supported"


@pytest.mark.parametrize("x_type,scale_type,attrs,reason", [
    (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT, {}, "dtype float8_e4m3fn of 'x' is not supported"),
    (TensorProto.FLOAT4E2M1, TensorProto.FLOAT, {}, "dtype float4_e2m1fn of 'x' is not supported"),
    (TensorProto.INT8, TensorProto.BFLOAT16, {}, "scale dtype bfloat16 of 's' is not supported"),
    (TensorProto.INT8, TensorProto.FLOAT, {"output_dtype": TensorProto.BFLOAT16}, "output_dtype=16 (bfloat16)"),
])
def test_dequantize_linear_predicate_refuses_with_a_reason(x_type, scale_type, attrs, reason):
    node = helper.make_node("DequantizeLinear", ["x", "s"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", x_type, [4]),
                                            helper.make_tensor_value_info("s", scale_type, [])],
                              [helper.make_tensor_value_info("y", attrs.get("output_dtype", scale_type), [4])])
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
    got = CPU.check(model.graph.nodes[0], model)
    assert got is not None and got.startswith("cpu cannot run this DequantizeLinear: ") and reason in got


# -------------------------------------------------------- dequant-matmul rewrite
def _dq_model(rng, k, n, *, qtype="int4", axis=0, block=32, zp=True, consumers=("matmul",), x_shape=(3,),
              vocab_ids=(5,), out_extra=False) -> tuple[Model, dict]:
    """DequantizeLinear(W const) feeding MatMul(s) (second input) and/or Gather (embedding)."""
    w = _quantized(rng, qtype, (k, n))
    if block:
        sshape = (-(-k // block), n) if axis == 0 else (k, -(-n // block))
    elif axis is None:
        sshape = ()
    else:
        sshape = ((k, n)[axis],)
    scale = (rng.random(sshape) * 0.02 + 0.001).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(scale, "W_scale")]
    dq_in = ["W", "W_scale"]
    if zp:
        inits.append(numpy_helper.from_array(_quantized(rng, qtype, sshape), "W_zp"))
        dq_in.append("W_zp")
    attrs = {"axis": axis if axis is not None else 1} | ({"block_size": block} if block else {})
    nodes = [helper.make_node("DequantizeLinear", dq_in, ["Wf"], name="dq", **attrs)]
    inputs, outputs, feeds = [], [], {}
    for i, c in enumerate(consumers):
        if c == "matmul":
            xn = f"X{i}"
            feeds[xn] = rnd(rng, *x_shape, k)
            inputs.append(helper.make_tensor_value_info(xn, TensorProto.FLOAT, list(x_shape) + [k]))
            nodes.append(helper.make_node("MatMul", [xn, "Wf"], [f"Y{i}"], name=f"mm{i}"))
        elif c == "gather":
            ids = rng.integers(-k, k, vocab_ids).astype(np.int64)
            feeds[f"ids{i}"] = ids
            inputs.append(helper.make_tensor_value_info(f"ids{i}", TensorProto.INT64, list(vocab_ids)))
            nodes.append(helper.make_node("Gather", ["Wf", f"ids{i}"], [f"Y{i}"], name=f"gather{i}", axis=0))
        elif c == "add":  # a consumer the rewrite does not handle
            nodes.append(helper.make_node("Add", ["Wf", "Wf"], [f"Y{i}"], name=f"add{i}"))
        outputs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, None))
    if out_extra:
        outputs.append(helper.make_tensor_value_info("Wf", TensorProto.FLOAT, None))
    proto = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    return Model.from_proto(proto), feeds


def _unfused(model: Model, feeds: dict, monkeypatch) -> dict:
    with monkeypatch.context() as m:
        m.setattr(cpu, "COMPILE_REWRITES", [])
        exe = graphopt.compile(model, "cpu")
        assert exe.rewrites == {}
        return exe.run(feeds)


DQMM_CASES = {
    "int4_blocked_zp": dict(),
    "int4_blocked_no_zp": dict(zp=False),
    "int4_odd_n_remainder_block": dict(k=72, n=37),
    "uint4_blocked": dict(qtype="uint4"),
    "int4_blocked_axis1": dict(axis=1, block=16),
    "int8_per_column": dict(qtype="int8", axis=1, block=0),
    "uint8_per_row": dict(qtype="uint8", axis=0, block=0),
    "int8_per_tensor": dict(qtype="int8", axis=None, block=0),
    "int4_3d_x_two_matmuls": dict(consumers=("matmul", "matmul"), x_shape=(2, 3)),
    "int4_matmul_and_gather": dict(consumers=("matmul", "gather"), vocab_ids=(2, 3)),
    "uint4_gather_axis1_blocks": dict(qtype="uint4", axis=1, block=16, consumers=("gather",)),
    "int8_gather_per_row": dict(qtype="int8", axis=0, block=0, consumers=("gather",)),
    "int2_blocked": dict(qtype="int2"),
}


@pytest.mark.parametrize("path", ["tiles", "chunks"])
@pytest.mark.parametrize("case", list(DQMM_CASES))
def test_dequant_matmul_rewrite(case, path, monkeypatch):
    spec = dict(DQMM_CASES[case])
    k, n = spec.pop("k", 96), spec.pop("n", 80)
    model, feeds = _dq_model(np.random.default_rng(16), k, n, **spec)
    n_consumers = len(spec.get("consumers", ("matmul",)))
    if path == "tiles":  # X has 3 rows: the decode path, with tiny tiles so it walks several strips and
        monkeypatch.setattr(cpu_fused, "GEMV_TILE", 2048)  # tiles, on the pool's threads
    else:  # the prefill path, with small chunks so the kernel walks several column chunks
        monkeypatch.setattr(cpu_fused, "GEMV_ROWS", 0)
        monkeypatch.setattr(cpu_fused, "DEQUANT_CHUNK_BYTES", 4 * k * 24)
    exe = graphopt.compile(model, "cpu")
    assert exe.rewrites == {"fuse_dequant_matmul": n_consumers}
    assert {s.op for s in exe.steps} <= {"DequantMatMul", "DequantGather"}
    assert len(exe.steps) == n_consumers
    got = exe.run(feeds)
    want = _unfused(model, feeds, monkeypatch)
    ref = dict(zip([o.name for o in model.graph.outputs], ReferenceEvaluator(model.to_onnx()).run(None, feeds)))
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        # rtol: the tile path sums K in pieces, a float32 rounding (a few ulp) from one product
        np.testing.assert_allclose(got[name], want[name], atol=ATOL, rtol=1e-6)
        np.testing.assert_allclose(got[name], ref[name], atol=ATOL, rtol=1e-6)
    # the input model is unchanged; the 4-bit weight stays packed (one byte per two values)
    assert [nd.op for nd in model.graph.nodes][0] == "DequantizeLinear"
    if spec.get("qtype", "int4") in ("int4", "uint4"):
        (packed,) = [v for v in exe.constants.values() if v.dtype == np.uint8 and v.ndim == 2]
        assert packed.shape == (k, (n + 1) // 2)


@pytest.mark.parametrize("why", ["other_consumer", "graph_output"])
def test_dequant_matmul_rewrite_keeps_shared_weights(why, monkeypatch):
    kw = {"consumers": ("matmul", "add")} if why == "other_consumer" else {"out_extra": True}
    model, feeds = _dq_model(np.random.default_rng(17), 64, 32, **kw)
    exe = graphopt.compile(model, "cpu")
    assert exe.rewrites == {"fuse_dequant_matmul": 0}
    assert "DequantizeLinear" in {s.op for s in exe.steps}
    got, want = exe.run(feeds), _unfused(model, feeds, monkeypatch)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=ATOL)


def test_dequant_matmul_rewritten_graph_stays_valid():
    model, _ = _dq_model(np.random.default_rng(18), 64, 32, consumers=("matmul", "gather"))
    work = model.copy()
    assert cpu_fused.fuse_dequant_matmul(work) == 2
    ops = [nd.op for nd in work.graph.nodes]
    assert sorted(ops) == ["DequantGather", "DequantMatMul"]
    assert all(nd.domain == cpu.INTERNAL_DOMAIN for nd in work.graph.nodes)
    assert work.opset(cpu.INTERNAL_DOMAIN) == 1
    proto = work.to_onnx()  # exports: every tensor has a producer or is a constant/input
    produced = {o for nd in proto.graph.node for o in nd.output} | {i.name for i in proto.graph.input} | {
        t.name for t in proto.graph.initializer}
    assert all(i in produced for nd in proto.graph.node for i in nd.input if i)
    assert "W" not in {t.name for t in proto.graph.initializer}  # only the packed copy is kept


def test_dequant_matmul_peak_memory_stays_far_below_the_fp32_weight():
    """A 4096×8192 blocked int4 weight: fp32 would be 128 MiB; the kernel dequantizes
    ≤ 8 MiB of columns at a time and keeps the weight packed (16 MiB)."""
    k, n, block = 4096, 8192, 32
    rng = np.random.default_rng(19)
    wq = rng.integers(-8, 8, (k, n), dtype=np.int8)
    scale = (rng.random((k // block, n)) * 0.01 + 0.001).astype(np.float32)
    zp = rng.integers(-2, 2, (k // block, n), dtype=np.int8)
    x_in = gs.Variable("X", np.float32, (2, k))
    wf = gs.Variable("Wf", np.float32, (k, n))
    y = gs.Variable("Y", np.float32, (2, n))
    nodes = [gs.Node("DequantizeLinear", inputs=[gs.Constant("W", wq.astype(ml_dtypes.int4)), gs.Constant("s", scale),
                                                 gs.Constant("zp", zp.astype(ml_dtypes.int4))],
                     outputs=[wf], attrs={"axis": 0, "block_size": block}),
             gs.Node("MatMul", inputs=[x_in, wf], outputs=[y])]
    model = Model(graph=gs.Graph(nodes=nodes, inputs=[x_in], outputs=[y], opset=21), opset_imports={"": 21})
    exe = graphopt.compile(model, "cpu")
    assert exe.rewrites == {"fuse_dequant_matmul": 1}
    weight_bytes = sum(v.nbytes for v in exe.constants.values() if v.ndim == 2 and v.shape[0] == k)
    assert weight_bytes == k * n // 2  # packed int4
    x = rnd(rng, 2, k)
    exe.run({"X": x})  # warm up (lazy imports, BLAS buffers)
    tracemalloc.start()
    try:
        got = exe.run({"X": x})["Y"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    fp32_weight = k * n * 4
    assert peak < fp32_weight / 8, f"peak {peak / 2**20:.1f} MiB"
    cols = rng.choice(n, 64, replace=False)
    w_cols = (wq[:, cols].astype(np.float32) - np.repeat(zp[:, cols], block, 0)) * np.repeat(scale[:, cols], block, 0)
    np.testing.assert_allclose(got[:, cols], x @ w_cols, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_dequant_matmul_runs_in_a_child_forked_after_its_pool_started():
    """The decode path's thread pool does not survive fork: a forked child must get its own
    (with the parent's executor it would wait forever for threads that do not exist)."""
    model, feeds = _dq_model(np.random.default_rng(21), 256, 4096)
    exe = graphopt.compile(model, "cpu")
    want = exe.run(feeds)["Y0"]  # starts the pool in this process
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run the same executable, send the result back, exit at once
        try:
            os.write(write, exe.run(feeds)["Y0"].astype(np.float32).tobytes())
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([read], [], [], 1.0)
        if ready:
            chunk = os.read(read, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(read)
    done = 0
    while not done and time.monotonic() < deadline:  # the pipe closes a moment before the child is reapable
        done, _ = os.waitpid(pid, os.WNOHANG)
        if not done:
            time.sleep(0.01)
    if not done:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in DequantMatMul")
    got = np.frombuffer(b"".join(chunks), np.float32).reshape(want.shape)
    np.testing.assert_array_equal(got, want)
