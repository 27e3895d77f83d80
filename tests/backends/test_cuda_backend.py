"""The cuda backend's logic, on any machine: its runtime with numpy standing in for the device.

``CudaBackend(emulate=True)`` runs the same compile (rewrites, host/device classification,
per-shape static cache, in-place KV cache, repacked quantized weights) and the same device
op implementations with ``xp = numpy``; the hand-written CUDA kernels are replaced by their
array twins, which the GPU tests (``test_cuda_gpu.py``) compare the kernels against.
"""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from conftest import (ARCH_MODELS, CONTROL_MODELS, FIXTURE_MODELS, FIXTURES, SDPA_MODELS, UNFUSED_MODELS,
                      padded_rows_zeroed, run_ort, split_reference)
from graphopt._conformance import applicable, run_case
from graphopt._evaluate import generate, load_inputs
from graphopt.backends import cuda_kernels as ck
from graphopt.passes._blockquant import dequantize_blocks
from graphopt.backends import cuda_ops
from graphopt.backends.cuda import CudaBackend
from graphopt.backends.cuda_runtime import DYNAMIC, STATIC, STATIC_DATA, STATIC_PARAM

EMU = CudaBackend(emulate=True, fused_attention=False)  # Attention/RotaryEmbedding split back
FUSED = CudaBackend(emulate=True, fused_attention=True)  # with the device Attention and RotaryEmbedding
ALL_MODELS = FIXTURE_MODELS + ARCH_MODELS + SDPA_MODELS + UNFUSED_MODELS + CONTROL_MODELS


def _optimized(path, backend=FUSED, **options):
    return graphopt.optimize(graphopt.load(path), target=backend, **options)


@pytest.mark.parametrize("backend", [EMU, FUSED], ids=["split-attention", "fused-attention"])
@pytest.mark.parametrize("path", ALL_MODELS, ids=[p.stem for p in ALL_MODELS])
def test_fixture_optimized_for_cuda_matches_torch(path, backend):
    feeds, expected = split_reference(path)
    model = _optimized(path, backend)
    fused = {"Attention", "RotaryEmbedding"} & set(model.op_histogram())
    assert ("Attention" in fused) == (backend is FUSED and path not in UNFUSED_MODELS), fused
    exe = graphopt.compile(model, backend)
    first = exe.run(feeds)
    host_runs = exe.stats["host_steps_run"]
    second = exe.run(feeds)  # same shapes: the host's shape arithmetic is not run again
    assert exe.stats["host_steps_run"] == host_runs > 0
    assert exe.stats["downloads"] == 0  # no device value is ever read back mid-step
    expected = padded_rows_zeroed(path, feeds, expected)
    for got in (first, second):
        got = padded_rows_zeroed(path, feeds, got)
        for name, ref in expected.items():
            assert got[name].shape == ref.shape and got[name].dtype == ref.dtype, name
            np.testing.assert_allclose(got[name], ref, atol=1e-4, rtol=0, err_msg=name)


def test_only_shape_arithmetic_runs_on_the_host():
    exe = graphopt.compile(_optimized(FIXTURES / "llama-torchscript-decode.onnx"), FUSED)
    host = [s for s in exe.steps if s.host]
    device = [s for s in exe.steps if not s.host]
    assert {s.op for s in device} >= {"MatMul", "RMSNormalization", "Attention", "RotaryEmbedding"}
    assert {s.op for s in host} <= {"Shape", "Size", "Gather", "Concat", "Unsqueeze", "Squeeze", "Slice", "Cast",
                                    "Add", "Sub", "Mul", "Div", "Range", "Equal", "Where", "Reshape", "Expand",
                                    "ConstantOfShape", "Less", "LessOrEqual", "Greater", "And", "Or", "Not", "Trilu",
                                    "ReduceSum", "Neg", "Max", "Min", "Tile", "Transpose", "Identity", "CumSum"}
    for s in host:  # every host value is static: a function of constants and input shapes only
        assert all(exe.classes[o] == STATIC for o in s.outputs if o >= 0), s.name
    reads = {a for s in device for a in s.actions}
    assert STATIC_PARAM in reads and STATIC_DATA in reads  # shapes as parameters, masks uploaded
    assert all(exe.classes[o] in (DYNAMIC,) for s in device for o in s.outputs if o >= 0 and s.op == "MatMul")


@pytest.mark.parametrize("name", ["llama-dynamo-decode", "qwen2-torchscript-decode", "mistral-dynamo-decode"])
def test_greedy_tokens_match_torch_with_the_kv_cache_appended_in_place(name):
    ref = np.load(FIXTURES / f"{name.split('-')[0]}-greedy.npz")
    model = _optimized(FIXTURES / f"{name}.onnx")
    exe = graphopt.compile(model, FUSED)
    tokens = generate(model, ref["prompt_ids"].tolist(), 32, FUSED, executable=exe)
    assert tokens == ref["tokens"].tolist()
    n_kv = sum(1 for t in model.graph.outputs if t.name.startswith("present."))
    # attention-fuse made one Attention per layer; each appends its layer's keys and values
    assert [s.kv for s in exe.steps if s.kv] == ["attention"] * (n_kv // 2)
    # the prompt step allocates each layer's buffer; the 31 decode steps append in place
    assert exe.stats["kv_copied"] == n_kv and exe.stats["kv_in_place"] == 31 * n_kv


def test_in_place_append_never_writes_a_view_handed_out_before():
    path = FIXTURES / "llama-dynamo-decode.onnx"
    model = _optimized(path)
    exe = graphopt.compile(model, FUSED)
    feeds = load_inputs(FIXTURES / "llama-dynamo-decode.npz")
    feeds = {k: feeds[k] for k in exe.input_names}
    presents = {t.name for t in model.graph.outputs if t.name.startswith("present.")}
    a = exe.step(feeds, keep=presents)
    kept = {k: np.array(v) for k, v in a.items() if k in presents}

    def follow(out, token):
        nxt = dict(feeds)
        for k in exe.input_names:
            if k.startswith("past_key_values."):
                nxt[k] = out[k.replace("past_key_values.", "present.")]
        nxt["input_ids"] = np.full_like(feeds["input_ids"], token)
        total = nxt["past_key_values.0.key"].shape[2] + 1
        nxt["attention_mask"] = np.ones((feeds["input_ids"].shape[0], total), np.int64)
        nxt["position_ids"] = np.full_like(feeds["position_ids"], total - 1)
        return nxt

    b = exe.step(follow(a, 5), keep=presents)  # appends in place after a's views
    c = exe.step(follow(a, 9), keep=presents)  # a branch from a again: must not overwrite b's token
    assert exe.stats["kv_in_place"] == 4 and exe.stats["kv_copied"] == 8
    for k in presents:
        np.testing.assert_array_equal(a[k], kept[k])  # a's views unchanged
        ref_b = run_ort(model, {k2: np.asarray(v) for k2, v in follow(a, 5).items()})
        np.testing.assert_allclose(b[k], ref_b[k], atol=1e-5)
        ref_c = run_ort(model, {k2: np.asarray(v) for k2, v in follow(a, 9).items()})
        np.testing.assert_allclose(c[k], ref_c[k], atol=1e-5)


QUANT_SETTINGS = [dict(quant_bits=4, quant_block=32), dict(quant_bits=4, quant_block=128, quant_symmetric=False),
                  dict(quant_bits=8, quant_block=128, quant_embed_bits=4)]


@pytest.mark.parametrize("name", ["llama-dynamo-decode", "qwen2-dynamo-decode", "qwen2-torchscript-prefill"])
@pytest.mark.parametrize("options", QUANT_SETTINGS, ids=["int4-b32", "uint4-b128-asym", "int8-b128-embed4"])
def test_quantized_fixture_matches_the_cpu_backend(name, options):
    model = _optimized(FIXTURES / f"{name}.onnx", **options)
    feeds = load_inputs(FIXTURES / f"{name}.npz")
    exe = graphopt.compile(model, FUSED)
    feeds = {k: feeds[k] for k in exe.input_names}
    ref = graphopt.compile(model, "cpu").run(feeds)
    got = exe.run(feeds)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-4, rtol=0, err_msg=k)
    n_dq = model.op_histogram()["DequantizeLinear"]
    # every quantized weight runs as a dequant-matmul/gather on its packed codes (none dequantized whole)
    assert not any(s.op == "DequantizeLinear" for s in exe.steps)
    assert exe.rewrites["dequant_matmul"] + exe.rewrites["tied_dequant_matmul"] >= n_dq
    if name.startswith("qwen2"):  # the tied embedding/LM head is one quantized matrix read two ways
        assert exe.rewrites["tied_dequant_matmul"] == 2
    # per layer: the residual adds after o_proj and down_proj, and Qwen2's q/k/v bias, ride on the GEMV
    layers = 2  # the fixtures' depth
    assert exe.rewrites["dequant_epilogues"] == layers * (3 if name.startswith("qwen2") else 2)
    assert not any(s.op == "Add" for s in exe.steps if not s.host)
    # one device copy per quantized weight, in the packed layout (a tied matrix too)
    gemv = [v for v in exe._base if isinstance(v, ck.GemvWeight)]
    assert len(gemv) == n_dq
    # device memory for weights stays near the quantized file's size (zero points widen to float32)
    assert exe.weight_bytes <= 1.3 * model.to_onnx().ByteSize()


@pytest.mark.parametrize("bits,signed,zero", [(4, True, False), (4, False, True), (8, True, False), (8, False, True),
                                              (4, True, True)])
@pytest.mark.parametrize("k,block", [(64, 32), (100, 32), (37, 16), (96, 128)])
def test_gemv_layout_round_trips(bits, signed, zero, k, block):
    rng = np.random.default_rng(k * bits)
    n = 13
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    codes = rng.integers(lo, hi + 1, size=(k, n)).astype(np.int8 if signed else np.uint8)
    nblk = -(-k // block)
    scale = rng.uniform(0.01, 0.1, size=(nblk, n)).astype(np.float32)
    zp = rng.integers(lo, hi + 1, size=(nblk, n)).astype(np.float32) if zero else None
    w = ck.gemv_layout(codes, scale, zp, bits, signed, block)
    assert w.codes.dtype == np.uint32 and w.codes.shape == (n, -(-k // (32 // bits)))
    assert w.nbytes < codes.size * 4 / (32 / bits) + scale.nbytes * 2 + 64  # packed: bits per code, not 32
    want = dequantize_blocks(codes, scale, zp, block)
    np.testing.assert_allclose(ck.unpack_twin(w, np), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ck.unpack_twin(w, np, 3, 9), want[:, 3:9], rtol=1e-6, atol=1e-7)
    x = rng.standard_normal((3, k)).astype(np.float32)
    got = cuda_ops.dq_matmul(x, w, cuda_ops.Device(np))
    np.testing.assert_allclose(got, x @ want, rtol=1e-5, atol=1e-5)


def test_kernel_twins_match_the_onnx_definitions():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 7, 96)).astype(np.float32)
    w = rng.standard_normal(96).astype(np.float32)
    want = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(ck.rms_norm_twin(x, w, 1e-6, np), want, rtol=1e-5)
    x[0, 0, :5] = -np.inf  # masked positions
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(ck.softmax_twin(x, np), e / e.sum(-1, keepdims=True), rtol=1e-6)


CASES, APPLIES = applicable(FUSED)


def test_node_tests_cover_every_declared_op():
    declared = {s.op_type for s in FUSED.ops()}
    covered = {n.op_type for name in APPLIES for n in CASES[name].model.graph.node}
    # RMSNormalization's node tests use stash/axis variants too; DequantizeLinear's blocked cases need int4 etc.
    assert declared - covered <= {"DequantizeLinear"}, sorted(declared - covered)
    assert len(APPLIES) >= 500


@pytest.mark.parametrize("name", APPLIES)
def test_node_case(name):
    result = run_case(FUSED, CASES[name])
    assert result.status == "passed", result.detail


def test_table_is_built_from_the_device_implementations():
    implemented = {k for k in cuda_ops.DEVICE_OPS if not k[0]}
    assert {(s.domain, s.op_type) for s in FUSED.ops()} == implemented
    # fused_attention=False leaves exactly Attention and RotaryEmbedding out; the default declares them
    assert {(s.domain, s.op_type) for s in EMU.ops()} == implemented - {("", "Attention"), ("", "RotaryEmbedding")}
    assert {(s.domain, s.op_type) for s in CudaBackend(emulate=True).ops()} == implemented
    for op in ("Attention", "RotaryEmbedding", "RMSNormalization"):
        assert FUSED.supports_op(op, "", 23), op
    assert FUSED.supports_op("Attention", "", 24) and not EMU.supports_op("Attention", "", 23)
    for op in ("LayerNormalization", "Gelu"):  # no device implementation: split back
        assert not FUSED.supports_op(op, "", 23), op


def test_kernel_sources_name_every_launch():
    for module, src in ck.SOURCES.items():
        for name in ck.kernel_names(module):
            assert f'extern "C" __global__ void {name}(' in src or f"GEMV_F32({name[-1]})" in src, name


def test_bench_worker_runs_a_device_resident_decode_loop():
    from graphopt._bench import worker

    cfg = {"model": str(FIXTURES / "qwen2-dynamo-decode.onnx"), "engine": "cuda", "emulate": True, "phase": "decode",
           "prefill": 4, "past": 16, "runs": 5, "warmup": 2, "batch": 1, "threads": 1}
    res = worker(cfg)
    assert res["decode_loop"] == "growing KV cache" and res["median_s"] > 0
    n_kv = 4  # 2 layers x (key, value)
    # the first step copies the bench's 16-token past into buffers; the other 6 append in place
    assert res["stats"]["kv_copied"] == n_kv and res["stats"]["kv_in_place"] == 6 * n_kv
    prefill = worker({**cfg, "phase": "prefill"})
    assert "decode_loop" not in prefill and prefill["tokens_per_s"] > 0
    static = worker({**cfg, "graphs": True})  # fixed-size KV buffers: one shape signature for every step
    assert static["decode_loop"] == "static KV buffers" and static["median_s"] > 0
    assert static["stats"]["host_steps_run"] == 2 * res["stats"]["host_steps_run"] / 7  # 2 signatures only


@pytest.mark.parametrize("name", ["llama-dynamo-decode", "qwen2-torchscript-decode", "gemma-dynamo-decode",
                                  "phi3-dynamo-decode", "qwen3-dynamo-decode", "mistral-dynamo-decode"])
def test_static_kv_buffers_give_torch_greedy_tokens(name, caplog):
    ref = np.load(FIXTURES / f"{name.split('-')[0]}-greedy.npz")
    model = _optimized(FIXTURES / f"{name}.onnx")
    exe = graphopt.compile(model, FUSED)
    tokens = generate(model, ref["prompt_ids"].tolist(), 32, FUSED, executable=exe, static_kv=48)
    assert tokens == ref["tokens"].tolist()
    fell_back = "disagrees with a growing cache" in caplog.text
    # sliding-window masks depend on key positions: the first static step is caught and decoding goes on without
    assert fell_back == name.startswith("mistral")
    if not fell_back:  # prompt, check step, then 31 steps of one shape: 3 signatures in all
        assert len(exe._signatures) == 3


@pytest.mark.parametrize("name", ["llama-torchscript-decode", "gemma-dynamo-decode", "gpt2-dynamo-decode"])
def test_elementwise_trees_run_as_one_kernel_each(name):
    from graphopt.backends.cuda_fusion import c_expression

    model = _optimized(FIXTURES / f"{name}.onnx", EMU)
    feeds = load_inputs(FIXTURES / f"{name}.npz")
    fused = graphopt.compile(model, EMU)
    plain = CudaBackend(emulate=True, fuse_elementwise=False).compile(model)
    feeds = {k: feeds[k] for k in fused.input_names}
    want, got = plain.run(feeds), fused.run(feeds)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=2e-6, rtol=0, err_msg=k)
    groups = [s for s in fused.steps if s.op == "FusedElementwise"]
    absorbed = sum(len(s.knode.attrs["ops"].split(",")) for s in groups)
    assert groups and absorbed == fused.rewrites["elementwise_fused"]
    n_device = sum(not s.host for s in plain.steps)
    assert sum(not s.host for s in fused.steps) == n_device - absorbed + len(groups)
    for s in groups:  # every tree prints as one C expression over its inputs
        expr = c_expression(__import__("json").loads(s.knode.attrs["expr"]))
        assert expr.count("x") >= 1 and "{" not in expr


def test_fusion_keeps_shared_values_and_graph_outputs_unfused():
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["silu"]),
             helper.make_node("Mul", ["silu", "u"], ["g"]), helper.make_node("Add", ["g", "x"], ["y"]),
             helper.make_node("Exp", ["g"], ["e"])]  # g is read twice: a tree ends there
    graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, [2, 8]), vi("u", TensorProto.FLOAT, [8])],
                              [vi("y", TensorProto.FLOAT, [2, 8]), vi("e", TensorProto.FLOAT, [2, 8])],
                              value_info=[vi(n, TensorProto.FLOAT, [2, 8]) for n in ("s", "silu", "g")])
    model = graphopt.Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    exe = graphopt.compile(model, EMU)
    kinds = [(s.op, s.knode.attrs.get("ops")) for s in exe.steps]
    assert sorted(kinds, key=str) == sorted([("FusedElementwise", "Sigmoid,Mul,Mul"), ("Exp", None), ("Add", None)],
                                            key=str)
    rng = np.random.default_rng(0)
    x, u = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    out = exe.run({"x": x, "u": u})
    g = x / (1 + np.exp(-x)) * u
    np.testing.assert_allclose(out["y"], g + x, rtol=1e-6)
    np.testing.assert_allclose(out["e"], np.exp(g), rtol=1e-6)


def _attention_node(three_d, causal, softcap, hq=4, hkv=2, **extra):
    attrs = {"is_causal": int(causal), "softcap": softcap, **extra}
    if three_d:
        attrs.update(q_num_heads=hq, kv_num_heads=hkv)
    from graphopt.backends.cpu_kernels import KNode

    return KNode("Attention", "", 23, attrs, 6, 3)


@pytest.mark.parametrize("three_d", [True, False], ids=["3d", "4d"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("mask", [None, "bool", "float", "short", "row"])
@pytest.mark.parametrize("rows,past", [(1, 7), (3, 5), (4, 0)])
def test_decode_attention_path_matches_the_general_one(three_d, causal, mask, rows, past, monkeypatch):
    """The ``attn_decode`` path's preparation (head split, KV append, mask -> bias, causal offset),
    with the kernel's twin, against the cpu kernel's general code on the same inputs."""
    rng = np.random.default_rng(rows * 10 + past)
    b, hq, hkv, d = 2, 4, 2, 8
    t = past + rows
    dev = cuda_ops.Device(np)
    node = _attention_node(three_d, causal, softcap=0.0 if mask != "row" else 30.0, scale=0.3)
    fast, general = cuda_ops.attention_op(node, dev), __import__(
        "graphopt.backends.cpu_fused", fromlist=["attention_kernel"]).attention_kernel(node, np)
    f32 = np.float32
    if three_d:
        q = rng.standard_normal((b, rows, hq * d)).astype(f32)
        k, v = (rng.standard_normal((b, rows, hkv * d)).astype(f32) for _ in range(2))
    else:
        q = rng.standard_normal((b, hq, rows, d)).astype(f32)
        k, v = (rng.standard_normal((b, hkv, rows, d)).astype(f32) for _ in range(2))
    pk, pv = (rng.standard_normal((b, hkv, past, d)).astype(f32) for _ in range(2))
    m = {None: None, "bool": rng.random((b, 1, rows, t)) > 0.3, "float": rng.standard_normal((1, hq, rows, t)).astype(f32),
         "short": rng.random((b, 1, rows, t - 1)) > 0.2, "row": np.zeros((rows, t), f32)}[mask]
    if mask == "bool":
        m[0, 0, 0, :] = False  # a fully masked row: zeros
    calls = []
    twin = ck.attention_twin
    monkeypatch.setattr(ck, "attention_twin", lambda *a: calls.append(1) or twin(*a))
    want = general(q, k, v, m, pk, pv)
    got = fast(q, k, v, m, pk, pv)
    assert calls == [1] and got[3] is None  # the decode path ran, not the general code
    for w, g in zip(want[:3], got[:3]):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5)


def test_float16_model_with_quantized_weights_stays_float16():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    k, n, block = 64, 48, 16
    codes = rng.integers(-8, 8, (k, n)).astype(np.int8)
    scale = rng.uniform(0.01, 0.05, (k // block, n)).astype(np.float16)
    wq = helper.make_tensor("wq", TensorProto.INT4, [k, n], codes.reshape(-1).tolist())
    nodes = [helper.make_node("DequantizeLinear", ["wq", "scale"], ["w"], axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT16, [3, k])], [vi("y", TensorProto.FLOAT16, [3, n])],
                              [wq, numpy_helper.from_array(scale, "scale"),
                               numpy_helper.from_array(rng.standard_normal(n).astype(np.float16), "b")],
                              value_info=[vi("h", TensorProto.FLOAT16, [3, n]), vi("w", TensorProto.FLOAT16, [k, n])])
    model = graphopt.Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    x = rng.standard_normal((3, k)).astype(np.float16)
    exe = graphopt.compile(model, EMU)
    assert any(s.op == "DequantMatMul" for s in exe.steps)
    got = exe.run({"x": x})["y"]
    want = graphopt.compile(model, "cpu").run({"x": x})["y"]
    assert got.dtype == want.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2, rtol=1e-2)


def test_tied_int4_matrix_stays_4_bit_on_the_device():
    model = _optimized(FIXTURES / "qwen2-dynamo-decode.onnx", quant_bits=4, quant_block=32, quant_lm_bits=4)
    exe = graphopt.compile(model, FUSED)
    assert exe.rewrites["tied_dequant_matmul"] == 2
    gemv = [v for v in exe._base if isinstance(v, ck.GemvWeight)]
    assert gemv and all(w.bits == 4 for w in gemv)  # the tied LM head too: half the bytes of 8-bit codes
    feeds = load_inputs(FIXTURES / "qwen2-dynamo-decode.npz")
    feeds = {k: feeds[k] for k in exe.input_names}
    ref = graphopt.compile(model, "cpu").run(feeds)
    got = exe.run(feeds)
    np.testing.assert_allclose(got["logits"], ref["logits"], atol=1e-4, rtol=0)


def test_float_mod_follows_numpy_at_the_edges():
    """``Mod`` with ``fmod=0`` on floats: built on ``fmod`` as numpy is, so infinities, zeros
    and signs come out as ``np.mod`` has them (CuPy's own ``mod`` differs there; the GPU run
    of ONNX's ``test_mod_float_edge_cases`` caught it)."""
    v = np.array([5, -5, 0, -0.0, np.inf, -np.inf, np.nan, 3.5, -3.5, 1e-30, 7], np.float32)
    a, b = np.meshgrid(v, v)
    with np.errstate(all="ignore"):
        want, got = np.mod(a, b), cuda_ops.floor_mod(np, a, b)
    np.testing.assert_array_equal(got, want)
    real = ~np.isnan(want)
    assert np.array_equal(np.signbit(got[real]), np.signbit(want[real]))
    assert got[4, 1] == np.inf and got[4, 0] == 5  # -5 mod inf, 5 mod inf (a varies along rows of b)


@pytest.mark.parametrize("case", ["contiguous", "kv-slot", "kv-past", "heads", "transposed", "int8-odd"])
def test_copy_rows_describe_strided_copies(case):
    """``multi_copy``'s rows (what a decode step's KV inputs, outputs and slot moves become): the
    host twin, run on numpy memory, must equal plain assignment; layouts it cannot describe
    (a transpose) fall back to assignment."""
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((2, 3, 16, 8)).astype(np.float32)
    dst_kv = np.zeros_like(kv)
    pairs = {"contiguous": (np.zeros((4, 5), np.float32), rng.standard_normal((4, 5)).astype(np.float32)),
             "kv-slot": (dst_kv[:, :, 3], kv[:, :, 15]),
             "kv-past": (np.zeros((2, 3, 15, 8), np.float32), kv[:, :, :15]),
             "heads": (dst_kv[:1, 1:], kv[1:, :2]),
             "transposed": (np.zeros((8, 16), np.float32), kv[0, 0].T),
             "int8-odd": (np.zeros((3, 7), np.int8), rng.integers(-9, 9, (3, 9)).astype(np.int8)[:, 1:8])}
    dst, src = pairs[case]
    want = dst.copy()
    want[...] = src
    row = ck.copy_row(dst, src)
    if case == "transposed":
        assert row is None
        return
    assert row is not None and row[2] * row[3] == src.nbytes
    ck.multi_copy_twin(np.array([row], np.int64))
    np.testing.assert_array_equal(dst, want)


def test_static_kv_moves_slots_through_the_batched_copy():
    model = graphopt.optimize(graphopt.load(FIXTURES / "llama-dynamo-decode.onnx"), target=EMU)
    exe = graphopt.compile(model, EMU)
    calls = []
    copy_many = exe.copy_many
    exe.copy_many = lambda moves: (calls.append(len(moves)), copy_many(moves))
    ref = np.load(FIXTURES / "llama-greedy.npz")
    assert generate(model, ref["prompt_ids"].tolist(), 12, EMU, executable=exe, static_kv=32) == \
        ref["tokens"].tolist()[:12]
    assert calls and set(calls) == {2 * 2}  # one batch per step: keys and values of both layers


@pytest.mark.parametrize("refuse,eager", [(set(), 0), ({"RMSNormalization"}, 5), ({"FusedElementwise", "MatMul"}, None)],
                         ids=["whole", "pieces", "too-many"])
def test_cuda_graph_capture_logic_in_emulation(refuse, eager):
    """The capture path without a GPU (numpy's stand-in records the steps a "graph" would hold):
    a decode loop on static KV buffers captures once and replays; steps that break a capture run
    between pieces of it; too many such steps leave the shape op by op; tokens stay torch's."""
    backend = CudaBackend(emulate=True, graphs=True, fused_attention=False)
    model = graphopt.optimize(graphopt.load(FIXTURES / "llama-dynamo-decode.onnx"), target=backend)
    exe = graphopt.compile(model, backend)
    exe._graphs.refuse = refuse
    ref = np.load(FIXTURES / "llama-greedy.npz")
    assert generate(model, ref["prompt_ids"].tolist(), 32, backend, executable=exe, static_kv=64) == \
        ref["tokens"].tolist()
    if eager is None:
        assert exe.stats["graph_captures"] == 0 and exe.stats["graph_replays"] == 0
        assert len(exe.capture_problems) == 17 and "broke the capture" in exe.capture_problems[-1]
    else:
        assert exe.stats["graph_captures"] == 1 and exe.stats["graph_replays"] >= 29
        assert exe.stats["graph_eager_steps"] == eager == len(exe.capture_problems)


def test_float32_bias_and_residual_adds_ride_on_the_matmul():
    """q/k/v biases and residual Adds after float32 MatMuls on constant weights fold into
    ``MatMulEpilogue`` (the GEMV kernel's epilogue on a GPU); outputs unchanged."""
    model = graphopt.optimize(graphopt.load(FIXTURES / "qwen2-dynamo-decode.onnx"), target=EMU)
    exe = graphopt.compile(model, EMU)
    epilogues = [s.knode.attrs["epilogue"] for s in exe.steps if s.op == "MatMulEpilogue"]
    assert epilogues == ["bias", "resid", "resid"] * 2  # per layer: merged q/k/v bias, o_proj and down_proj
    assert exe.rewrites["dequant_epilogues"] == 6
    assert not [s for s in exe.steps if s.op == "Add" and not s.host]  # (integer shape arithmetic stays)
    feeds, want = split_reference(FIXTURES / "qwen2-dynamo-decode.onnx")
    got = exe.run({k: feeds[k] for k in exe.input_names})
    np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-4, rtol=0)


def test_a_bias_of_higher_rank_is_not_folded():
    """``Add(MatMul(x, W), b)`` with b of shape (1, 1, n) and x 2-D broadcasts to rank 3: folding b
    into the GEMV epilogue would drop that axis, so it stays an Add (found in review)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal((1, 1, 6)).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), helper.make_node("Add", ["y", "b"], ["z"], name="add")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 6])], initializer=[w, b])
    model = graphopt.Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    exe = graphopt.compile(model, EMU)
    assert exe.rewrites["dequant_epilogues"] == 0
    x = rng.standard_normal((3, 8)).astype(np.float32)
    got = exe.run({"x": x})["z"]
    assert got.shape == (1, 3, 6)
    np.testing.assert_allclose(got, run_ort(model, {"x": x})["z"], atol=1e-5, rtol=0)


def test_copy_many_falls_back_to_assignment_for_broadcasts_and_casts():
    exe = graphopt.compile(graphopt.optimize(graphopt.load(FIXTURES / "llama-dynamo-decode.onnx"), target=EMU), EMU)
    a, b = np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32)
    exe.copy_many([(a, np.ones((2, 3), np.float32))])  # plans the (2, 3) float32 layout
    exe.copy_many([(b, np.full((1, 3), 2.0, np.float32)), (a, np.arange(6).reshape(2, 3))])  # same strides
    np.testing.assert_array_equal(b, np.full((2, 3), 2.0))
    np.testing.assert_array_equal(a, np.arange(6, dtype=np.float32).reshape(2, 3))


def test_interleaved_sequences_on_one_captured_graph_keep_their_own_caches():
    """Two decode loops of the same shapes alternate on one executable with CUDA graphs (a server
    taking turns between requests): each keeps its own KV cache, because a replay's kept outputs
    are copied out of the graph's buffers, which the other sequence's replay overwrites. The
    emulated graph writes into its captured buffers as a GPU graph does, so sharing would show."""
    from graphopt._evaluate import StaticKV, _past_inputs

    backend = CudaBackend(emulate=True, graphs=True, fused_attention=False)
    model = graphopt.optimize(graphopt.load(FIXTURES / "llama-dynamo-decode.onnx"), target=backend)
    pairs = _past_inputs(model)
    presents = frozenset(p for _, p in pairs)
    names = set(graphopt.compile(model, EMU).input_names)

    def start(exe, prompt):
        feeds = {"input_ids": np.array([prompt], np.int64), "attention_mask": np.ones((1, len(prompt)), np.int64)}
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(len(prompt), dtype=np.int64)[None]
        for past, _ in pairs:
            feeds[past] = np.zeros((1,) + tuple(model.graph.tensors()[past].shape[1:2]) + (0, 16), np.float32)
        out = exe.step({k: v for k, v in feeds.items() if k in names}, keep=presents)
        kv = StaticKV(pairs, 32, getattr(exe, "copy_many", None))
        kv.start(out)
        return kv, int(np.argmax(out["logits"][0, -1]))

    def advance(exe, kv, token):
        out = exe.step({k: v for k, v in kv.feeds(token, names).items() if k in names}, keep=presents)
        kv.advance(out)
        return int(np.argmax(out["logits"][0, -1]))

    prompts = [[1, 5, 9, 2], [7, 3, 3, 8]]
    alone = []
    for prompt in prompts:  # each sequence by itself, op by op
        exe = graphopt.compile(model, EMU)
        kv, token = start(exe, prompt)
        tokens = [token]
        for _ in range(8):
            tokens.append(advance(exe, kv, tokens[-1]))
        alone.append(tokens)
    exe = graphopt.compile(model, backend)
    state = [start(exe, p) for p in prompts]
    together = [[t] for _, t in state]
    for _ in range(8):
        for i, (kv, _) in enumerate(state):
            together[i].append(advance(exe, kv, together[i][-1]))
    assert exe.stats["graph_replays"] > 8
    assert together == alone
