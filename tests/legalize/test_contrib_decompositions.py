"""The com.microsoft fused ops other optimizers emit, split back into standard ops.

Each case is one contrib node on random inputs. It is legalized for two targets:
``primitive`` (the cpu table without Attention, RotaryEmbedding, RMSNormalization,
LayerNormalization and Gelu, so the decomposition recurses down to primitives)
and ``cpu`` (which keeps the standard fused ops the decomposition emits). Both
results must match onnxruntime's own kernel for the contrib op within 1e-5, run
in onnxruntime and on the cpu backend.
"""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from legalize_helpers import PRIMITIVE, cpu_run, feeds_of, max_err, one_node, ort_run

MS = "com.microsoft"
RNG = np.random.default_rng(2024)


def r(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _case(op, inputs, outputs, domain=MS, opset=23, inits=(), valid=None, **attrs):
    return dict(op=op, inputs=inputs, outputs=outputs, domain=domain, opset=opset, inits=inits, valid=valid,
                attrs=attrs)


# ------------------------------------------------------------------ norms & gelus
X, W = r(2, 3, 64), r(64)
NORMS = {
    "sln": _case("SimplifiedLayerNormalization", {"x": X, "w": W}, ["y"], domain="", epsilon=1e-6),
    "sln_inv_std_var": _case("SimplifiedLayerNormalization", {"x": X, "w": W}, ["y", "inv"], domain="",
                             epsilon=1e-6),
    "sln_opset17": _case("SimplifiedLayerNormalization", {"x": X, "w": W}, ["y"], domain="", opset=17),
    "skip_sln": _case("SkipSimplifiedLayerNormalization", {"x": X, "s": r(2, 3, 64), "g": W}, ["y"],
                      epsilon=1e-6),
    "skip_sln_bias_sum": _case("SkipSimplifiedLayerNormalization",
                               {"x": X, "s": r(2, 3, 64), "g": W, "b": r(64)}, ["y", "", "", "sum"]),
    "skip_sln_opset17_inv": _case("SkipSimplifiedLayerNormalization",
                                  {"x": X, "s": r(2, 3, 64), "g": W, "b": r(64)}, ["y", "", "inv", "sum"],
                                  opset=17, epsilon=1e-6),
    "skip_ln_all_outputs": _case("SkipLayerNormalization",
                                 {"x": X, "s": r(2, 3, 64), "g": W, "beta": r(64), "b": r(64)},
                                 ["y", "mean", "inv", "sum"], epsilon=1e-5),
    "skip_ln_opset14": _case("SkipLayerNormalization", {"x": X, "s": r(1, 3, 64), "g": W}, ["y"], opset=14),
    "fast_gelu_bias": _case("FastGelu", {"x": X, "b": r(64)}, ["y"]),
    "fast_gelu_opset14": _case("FastGelu", {"x": X}, ["y"], opset=14),
    "bias_gelu": _case("BiasGelu", {"x": X, "b": r(64)}, ["y"]),
    "bias_gelu_opset17": _case("BiasGelu", {"x": X, "b": r(64)}, ["y"], opset=17),
    "quick_gelu": _case("QuickGelu", {"x": X}, ["y"]),
    "quick_gelu_alpha1": _case("QuickGelu", {"x": X}, ["y"], alpha=1.0),
}

# ------------------------------------------------------------------------- rotary
Q3, COS, SIN = r(2, 5, 64), r(32, 8), r(32, 8)
POS = np.array([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]], np.int64)
ROTARY = {
    "rotary_3d": _case("RotaryEmbedding", {"x": Q3, "pos": POS, "cos": COS, "sin": SIN}, ["y"], num_heads=4),
    "rotary_3d_no_num_heads": _case("RotaryEmbedding", {"x": Q3, "pos": POS, "cos": COS, "sin": SIN}, ["y"]),
    "rotary_4d": _case("RotaryEmbedding", {"x": r(2, 4, 5, 16), "pos": POS, "cos": COS, "sin": SIN}, ["y"]),
    "rotary_interleaved": _case("RotaryEmbedding", {"x": Q3, "pos": POS, "cos": COS, "sin": SIN}, ["y"],
                                num_heads=4, interleaved=1),
    "rotary_offset": _case("RotaryEmbedding", {"x": Q3, "pos": np.array([3], np.int64), "cos": COS, "sin": SIN},
                           ["y"], num_heads=4),
    "rotary_partial": _case("RotaryEmbedding", {"x": Q3, "pos": POS, "cos": r(32, 4), "sin": r(32, 4)}, ["y"],
                            num_heads=4, rotary_embedding_dim=8),
    "rotary_opset17": _case("RotaryEmbedding", {"x": Q3, "pos": POS, "cos": COS, "sin": SIN}, ["y"],
                            num_heads=4, opset=17),
}


# ------------------------------------------------------------- group query attention
def gqa(b=2, s=5, n=4, kvn=2, h=16, past=0, seqlens=None, total=None, rotary=False, interleaved=0,
        positions=False, packed=False, bias=False, opset=23, **attrs):
    q, k, v = r(b, s, n * h), r(b, s, kvn * h), r(b, s, kvn * h)
    if packed:
        q, k, v = np.concatenate([q, k, v], -1), None, None
    seqlens = np.array(seqlens if seqlens is not None else [(past or 0) + s - 1] * b, np.int32)
    total = np.array(total if total is not None else (past or 0) + s, np.int32)
    inputs = {"q": q, "k": k, "v": v, "pk": None if past is None else r(b, kvn, past, h),
              "pv": None if past is None else r(b, kvn, past, h), "seqlens_k": seqlens, "total": total,
              "cos": None, "sin": None, "pos": None, "bias": None}
    if rotary:
        inputs.update(cos=r(64, h // 2), sin=r(64, h // 2))
        attrs.update(do_rotary=1, rotary_interleaved=interleaved)
        if positions:
            inputs["pos"] = np.stack([np.arange(s) + int(seqlens[i]) + 1 - s for i in range(b)]).astype(np.int64)
    if bias:
        inputs["bias"] = r(b, 1, s, int(total))
    return _case("GroupQueryAttention", inputs, ["y", "present_k", "present_v"], opset=opset, num_heads=n,
                 kv_num_heads=kvn, **attrs)


def _ragged(ref, got):
    """Entry 1 holds 5 of the 7 cache rows: rows past its length are unspecified."""
    return [max_err(ref[0], got[0]), max_err(ref[1][0], got[1][0]), max_err(ref[1][1, :, :5], got[1][1, :, :5]),
            max_err(ref[2][1, :, :5], got[2][1, :, :5])]


GQA = {
    "gqa_prefill": gqa(past=None),
    "gqa_prefill_empty_past": gqa(past=0),
    "gqa_decode": gqa(s=1, past=6),
    "gqa_chunk": gqa(b=1, s=3, past=6),
    "gqa_rotary_prefill": gqa(past=0, rotary=True),
    "gqa_rotary_decode": gqa(s=1, past=6, rotary=True),
    "gqa_rotary_interleaved": gqa(s=1, past=6, rotary=True, interleaved=1),
    "gqa_rotary_position_ids": gqa(s=1, past=6, rotary=True, positions=True),
    "gqa_local_window": gqa(b=1, s=4, past=6, local_window_size=3),
    "gqa_packed_qkv": gqa(s=1, past=6, packed=True),
    "gqa_softcap": gqa(b=1, s=3, past=6, softcap=2.0),
    "gqa_scale": gqa(b=1, s=3, past=6, scale=0.3),
    "gqa_mqa": gqa(b=1, s=3, past=6, kvn=1),
    "gqa_attention_bias": gqa(b=1, s=3, past=6, bias=True),
    "gqa_ragged_batch": dict(gqa(s=1, past=6, seqlens=[6, 4], total=7), valid=_ragged),
    "gqa_opset17": gqa(s=1, past=6, rotary=True, opset=17),
}


# ------------------------------------------------------------- multi-head attention
def mha(b=2, s=4, n=4, h=8, past=0, bias=False, mask=None, attention_bias=False, kv4=False, kv_len=None,
        opset=23, **attrs):
    kv_len = kv_len or s
    total = past + kv_len
    k, v = (r(b, n, kv_len, h), r(b, n, kv_len, h)) if kv4 else (r(b, kv_len, n * h), r(b, kv_len, n * h))
    masks = {None: None,
             "2d": np.stack([np.r_[np.ones(total - 2), np.zeros(2)], np.ones(total)]).astype(np.int32),
             "3d": (RNG.random((b, s, total)) > 0.3).astype(np.int32)}
    inputs = {"q": r(b, s, n * h), "k": k, "v": v, "bias": r(3 * n * h) if bias else None, "mask": masks[mask],
              "attention_bias": r(b, 1, s, total) if attention_bias else None,
              "pk": r(b, n, past, h) if past else None, "pv": r(b, n, past, h) if past else None}
    outputs = ["y", "present_k", "present_v"] if past else ["y"]
    return _case("MultiHeadAttention", inputs, outputs, opset=opset, num_heads=n, **attrs)


MHA = {
    "mha_self": mha(),
    "mha_bias": mha(bias=True),
    "mha_padding_mask_2d": mha(mask="2d"),
    "mha_mask_3d": mha(mask="3d"),
    "mha_attention_bias": mha(attention_bias=True),
    "mha_past": mha(past=5),
    "mha_causal": mha(unidirectional=1),
    "mha_past_causal_mask_biases": mha(past=5, unidirectional=1, mask="2d", bias=True, attention_bias=True),
    "mha_cross_4d_kv": mha(kv4=True, kv_len=6),
    "mha_cross_3d_kv": mha(kv_len=7),
    "mha_scale_and_filter": mha(mask="2d", scale=0.2, mask_filter_value=-1e9),
}


# ------------------------------------------------------------------- MatMulNBits
def nbits(k=64, n=24, block=16, bits=4, zero_points=None, bias=False, opset=23):
    blocks = -(-k // block)
    inputs = {"a": r(2, 3, k), "b": RNG.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8),
              "scales": (RNG.random(n * blocks) * 0.1 + 0.01).astype(np.float32), "zp": None, "g_idx": None,
              "bias": r(n) if bias else None}
    if zero_points == "packed":
        inputs["zp"] = RNG.integers(0, 256, (n, -(-blocks * bits // 8)), dtype=np.uint8)
    elif zero_points == "float":
        inputs["zp"] = (RNG.random((n, blocks)) * 2**bits).astype(np.float32)
    inits = ("b", "scales", "zp", "bias")
    return _case("MatMulNBits", inputs, ["y"], opset=opset, inits=inits, K=k, N=n, bits=bits, block_size=block)


NBITS = {
    "nbits_4": nbits(),
    "nbits_4_zero_points": nbits(zero_points="packed"),
    "nbits_4_bias": nbits(bias=True),
    "nbits_8_zero_points": nbits(bits=8, zero_points="packed"),
    "nbits_4_partial_block": nbits(k=100, block=32, zero_points="packed"),
    "nbits_4_opset17": nbits(opset=17, zero_points="packed"),
    "nbits_float_zero_points": nbits(zero_points="float"),
    "nbits_2": nbits(bits=2),
}

CASES = {**NORMS, **ROTARY, **GQA, **MHA, **NBITS}


@pytest.mark.parametrize("target", [PRIMITIVE, "cpu"], ids=["primitive", "cpu"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_onnxruntime_kernel(name, target):
    c = CASES[name]
    proto = one_node(c["op"], c["inputs"], c["outputs"], opset=c["opset"], domain=c["domain"],
                     initializers=c["inits"], **c["attrs"])
    feeds = feeds_of(c["inputs"], c["inits"])
    expected = ort_run(proto, feeds)
    model = graphopt.legalize(graphopt.Model.from_proto(proto), target)

    label = f"{c['domain']}::{c['op']}" if c["domain"] else c["op"]
    assert not [n.op for n in model.graph.nodes if n.domain == MS or (n.op, n.domain) == (c["op"], c["domain"])]
    assert graphopt.legalize(model, target).node_count() == model.node_count()  # already legal
    (split,) = [s for s in model.history[-1].split_back if s.op == label]
    assert split.source == "graphopt.passes" and split.count == 1
    for engine, got in (("onnxruntime", ort_run(model.to_onnx(), feeds)), ("cpu", cpu_run(model, feeds))):
        assert len(got) == len(expected)
        errors = c["valid"](expected, got) if c["valid"] else [max_err(e, g) for e, g in zip(expected, got)]
        scale = max(1.0, *(float(np.abs(e).max()) for e in expected))
        assert max(errors) <= 1e-5 * scale, (engine, errors)


def test_fused_forms_are_kept_where_the_target_runs_them():
    """On cpu the contrib ops become graphopt's standard fused ops, not primitives."""
    expected = {"sln": "RMSNormalization", "skip_sln": "RMSNormalization", "skip_ln_all_outputs": "LayerNormalization",
                "rotary_3d": "RotaryEmbedding", "gqa_decode": "Attention", "mha_past": "Attention",
                "fast_gelu_bias": "Gelu", "nbits_4_zero_points": "DequantizeLinear"}
    for name, op in expected.items():
        c = CASES[name]
        proto = one_node(c["op"], c["inputs"], c["outputs"], opset=c["opset"], domain=c["domain"],
                         initializers=c["inits"], **c["attrs"])
        ops = graphopt.legalize(graphopt.Model.from_proto(proto), "cpu").op_histogram()
        assert ops[op] == 1, (name, dict(ops))


def test_opset17_model_gets_primitives_valid_at_its_opset():
    """Below opset 23 the standard fused ops cannot appear: the decomposition goes all the way down."""
    import onnx

    c = CASES["gqa_opset17"]
    proto = one_node(c["op"], c["inputs"], c["outputs"], opset=17, domain=MS, **c["attrs"])
    model = graphopt.legalize(graphopt.Model.from_proto(proto), "cpu")
    assert model.opset("") == 17
    assert not {"Attention", "RotaryEmbedding"} & set(model.op_histogram())
    onnx.checker.check_model(model.to_onnx())


@pytest.mark.parametrize("attrs, inputs, message", [
    ({"k_quant_type": "PER_TENSOR"}, {}, "k_quant_type=PER_TENSOR (a quantized KV cache) is not supported"),
    ({"smooth_softmax": 1}, {}, "smooth_softmax=1 is not supported"),
    ({}, {"head_sink": r(4)}, "the head_sink input is not supported"),
])
def test_unsupported_gqa_configurations_are_named(attrs, inputs, message):
    c = gqa(s=1, past=6, **attrs)
    c["inputs"].update(inputs)
    proto = one_node(c["op"], c["inputs"], c["outputs"], domain=MS, **c["attrs"])
    with pytest.raises(graphopt.LegalizeError) as info:
        graphopt.legalize(graphopt.Model.from_proto(proto), "cpu")
    assert str(info.value) == ("cpu cannot run 1 node(s): GroupQueryAttention_0 (com.microsoft::GroupQueryAttention): "
                               "cpu does not support com.microsoft::GroupQueryAttention (its decomposition does "
                               f"not apply: {message})")
