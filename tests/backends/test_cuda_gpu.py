"""The cuda backend on a real GPU (skipped without CuPy and an NVIDIA GPU, as on CI).

What the emulated tests (``test_cuda_backend.py``) cannot show: the CUDA kernels against
their array twins, the ONNX node tests on CuPy, every fixture (fp32 and quantized) against
onnxruntime CPU, greedy tokens against torch, and CUDA-graph replay against op-by-op runs.
Also: every kernel source compiles with NVRTC, which needs CuPy but no GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from conftest import ARCH_MODELS, CONTROL_MODELS, FIXTURE_MODELS, FIXTURES, run_cli, run_ort, split_reference
from graphopt._conformance import applicable, run_case
from graphopt._evaluate import generate, load_inputs
from graphopt.backends import cuda_kernels as ck
from graphopt.backends import cuda_ops
from graphopt.backends.cuda import CudaBackend, _gpu_problem

GPU_PROBLEM = _gpu_problem()
gpu = pytest.mark.skipif(GPU_PROBLEM is not None, reason=f"no GPU: {GPU_PROBLEM}")
pytestmark = pytest.mark.cuda
ALL_MODELS = FIXTURE_MODELS + ARCH_MODELS + CONTROL_MODELS


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return nvrtc
    except Exception:  # CuPy or its NVRTC library missing
        return None


@pytest.mark.skipif(_nvrtc() is None, reason="CuPy's NVRTC is not available")
@pytest.mark.parametrize("name", sorted(ck.SOURCES))
def test_kernel_source_compiles_for_hopper(name):
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(ck.SOURCES[name], f"{name}.cu", (), ())
    try:
        nvrtc.compileProgram(prog, ("--gpu-architecture=compute_90", "-std=c++17"))
    except Exception:
        pytest.fail(nvrtc.getProgramLog(prog))
    ptx = nvrtc.getPTX(prog)
    text = ptx.decode() if isinstance(ptx, bytes) else ptx
    for kernel in ck.kernel_names(name):
        assert f".entry {kernel}(" in text


@pytest.mark.skipif(_nvrtc() is None, reason="CuPy's NVRTC is not available")
def test_fused_elementwise_expressions_compile():
    import json

    from graphopt.backends.cuda_fusion import cuda_source

    sources = []
    for path in ALL_MODELS:
        for backend in (CudaBackend(emulate=True), CudaBackend(emulate=True, fused_attention=True)):
            exe = backend.compile(graphopt.optimize(graphopt.load(path), target=backend))
            sources += [cuda_source(json.loads(s.knode.attrs["expr"]), f"k{len(sources)}_{i}")
                        for i, s in enumerate(exe.steps) if s.op == "FusedElementwise"]
    assert len(sources) > 50
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram("\n".join(sources), "fused.cu", (), ())
    try:
        nvrtc.compileProgram(prog, ("--gpu-architecture=compute_90",))
    except Exception:
        pytest.fail(nvrtc.getProgramLog(prog))


@pytest.fixture(scope="module")
def cp():
    if GPU_PROBLEM is not None:
        pytest.skip(f"no GPU: {GPU_PROBLEM}")
    import cupy

    return cupy


@pytest.fixture(scope="module")
def kernels(cp):
    k = ck.Kernels(cp)
    k.warm()
    return k


@gpu
def test_rms_norm_and_softmax_kernels_match_their_twins(cp, kernels):
    rng = np.random.default_rng(0)
    for n in (64, 896, 1000, 4096):
        x = cp.asarray(rng.standard_normal((5, 3, n)).astype(np.float32))
        w = cp.asarray(rng.standard_normal(n).astype(np.float32))
        np.testing.assert_allclose(cp.asnumpy(kernels.rms_norm(x, w, 1e-6)),
                                   cp.asnumpy(ck.rms_norm_twin(x, w, 1e-6, cp)), rtol=1e-5, atol=1e-5)
        x[0, 0, : n // 2] = -cp.inf
        np.testing.assert_allclose(cp.asnumpy(kernels.softmax_rows(x)), cp.asnumpy(ck.softmax_twin(x, cp)),
                                   rtol=1e-5, atol=1e-6)


@gpu
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("k,n", [(896, 1152), (4864, 896), (100, 37), (896, 151)])
def test_float32_gemv_matches_cublas(cp, kernels, m, k, n):
    rng = np.random.default_rng(k + n + m)
    x = cp.asarray(rng.standard_normal((m, k)).astype(np.float32))
    w = rng.standard_normal((k, n)).astype(np.float32)
    wt = cp.asarray(np.ascontiguousarray(w.T))  # how the runtime stores a constant MatMul weight
    bias = cp.asarray(rng.standard_normal(n).astype(np.float32))
    resid = cp.asarray(rng.standard_normal((m, n)).astype(np.float32))
    want = cp.asnumpy(x @ cp.asarray(w))
    np.testing.assert_allclose(cp.asnumpy(kernels.gemv_f32(x, wt, k, n)), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cp.asnumpy(kernels.gemv_f32(x, wt, k, n, bias, resid)),
                               want + cp.asnumpy(bias) + cp.asnumpy(resid), rtol=1e-4, atol=1e-4)
    # the MatMul op routes a k-contiguous weight view there, and anything else to cuBLAS / mm_small
    from graphopt.backends.cpu_kernels import KNode

    op = cuda_ops._matmul(KNode("MatMul", "", 13, {}, 2, 1), cuda_ops.Device(cp, kernels))
    np.testing.assert_allclose(cp.asnumpy(op(x[None], wt.T)), want[None], rtol=1e-4, atol=1e-4)


@gpu
def test_multi_copy_kernel_matches_assignment(cp, kernels):
    rng = np.random.default_rng(1)
    kv = cp.asarray(rng.standard_normal((2, 3, 16, 8)).astype(np.float32))
    odd = cp.asarray(rng.integers(-9, 9, (3, 9)).astype(np.int8))
    pairs = [(cp.zeros((2, 3, 8), cp.float32), kv[:, :, 15]), (cp.zeros((2, 3, 15, 8), cp.float32), kv[:, :, :15]),
             (cp.zeros((1, 2, 16, 8), cp.float32), kv[1:, :2]), (cp.zeros((3, 7), cp.int8), odd[:, 1:8]),
             (cp.zeros((5, 1000), cp.float32), cp.asarray(rng.standard_normal((5, 1000)).astype(np.float32)))]
    kernels.multi_copy(np.array([ck.copy_row(d, s) for d, s in pairs], np.int64))
    for dst, src in pairs:
        np.testing.assert_array_equal(cp.asnumpy(dst), cp.asnumpy(src))


@gpu
@pytest.mark.parametrize("sa,sb", [((1, 14, 1, 64), (1, 14, 64, 192)), ((1, 32, 1), (1, 1, 1)),
                                   ((2, 3, 4, 5, 6), (3, 1, 6, 7)), ((5, 7), (7, 3)), ((1, 14, 3, 0), (14, 0, 4))])
def test_small_matmul_kernel_matches_cublas(cp, kernels, sa, sb):
    rng = np.random.default_rng(len(sa) + len(sb))
    a = cp.asarray(rng.standard_normal(sa).astype(np.float32))
    b = cp.asarray(rng.standard_normal(sb).astype(np.float32))
    want = np.matmul(cp.asnumpy(a), cp.asnumpy(b))
    np.testing.assert_allclose(cp.asnumpy(kernels.mm_small(a, b)), want, rtol=1e-5, atol=1e-5)
    bt = cp.swapaxes(cp.ascontiguousarray(cp.swapaxes(b, -1, -2)), -1, -2)  # strided operand
    np.testing.assert_allclose(cp.asnumpy(kernels.mm_small(a, bt)), want, rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.parametrize("bits,signed,zero", [(4, True, False), (4, False, True), (8, True, False),
                                              (8, False, True), (4, True, True), (8, True, True)])
@pytest.mark.parametrize("k,n,block", [(896, 4864, 32), (4864, 896, 128), (100, 37, 16), (1024, 151, 64)])
def test_dequant_kernels_match_their_twins(cp, kernels, bits, signed, zero, k, n, block):
    rng = np.random.default_rng(k + n + bits)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    codes = rng.integers(lo, hi + 1, size=(k, n)).astype(np.int8 if signed else np.uint8)
    nblk = -(-k // block)
    scale = rng.uniform(0.01, 0.1, size=(nblk, n)).astype(np.float32)
    zp = rng.integers(lo, hi + 1, size=(nblk, n)).astype(np.float32) if zero else None
    w = ck.gemv_layout(codes, scale, zp, bits, signed, block, cp)
    want = ck.unpack_twin(w, cp)
    np.testing.assert_array_equal(cp.asnumpy(kernels.dq_unpack(w, 0, n)), cp.asnumpy(want))
    np.testing.assert_array_equal(cp.asnumpy(kernels.dq_unpack(w, 5, min(n, 29))), cp.asnumpy(want[:, 5:29]))
    bias = cp.asarray(rng.standard_normal(n).astype(np.float32))
    for m in (1, 3, ck.GEMV_MAX_ROWS):
        x = cp.asarray(rng.standard_normal((m, k)).astype(np.float32))
        resid = cp.asarray(rng.standard_normal((m, n)).astype(np.float32))
        np.testing.assert_allclose(cp.asnumpy(kernels.dq_gemv(x, w)), cp.asnumpy(x @ want), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(cp.asnumpy(kernels.dq_gemv(x, w, bias, resid)),
                                   cp.asnumpy(x @ want + bias + resid), rtol=1e-4, atol=1e-3)
    x = cp.asarray(rng.standard_normal((40, k)).astype(np.float32))  # prefill: tiles + cuBLAS
    got = cuda_ops.dq_matmul(x, w, cuda_ops.Device(cp, kernels))
    np.testing.assert_allclose(cp.asnumpy(got), cp.asnumpy(x @ want), rtol=1e-4, atol=1e-3)


@gpu
@pytest.mark.parametrize("b,hq,hkv,rows,t,dim", [(1, 14, 2, 1, 129, 64), (2, 16, 4, 3, 300, 64), (1, 8, 8, 16, 8192, 128),
                                                (3, 4, 1, 1, 1, 32)])
@pytest.mark.parametrize("masked,causal,softcap", [(False, -1, 0.0), (True, -1, 0.0), (True, 5, 0.0), (False, 0, 20.0)])
def test_decode_attention_kernel_matches_its_twin(cp, kernels, b, hq, hkv, rows, t, dim, masked, causal, softcap):
    rng = np.random.default_rng(t + rows)
    cap = t + 64  # KV buffers with spare capacity: strided views, as the runtime passes them
    kbuf = cp.asarray(rng.standard_normal((b, hkv, cap, dim)).astype(np.float32))
    vbuf = cp.asarray(rng.standard_normal((b, hkv, cap, dim)).astype(np.float32))
    k, v = kbuf[:, :, :t], vbuf[:, :, :t]
    q = cp.asarray(rng.standard_normal((b, rows, hq, dim)).astype(np.float32)).transpose(0, 2, 1, 3)
    bias = None
    if masked:
        m = rng.random((b, 1, rows, t)) > 0.25
        m[0, 0, 0] = False  # one fully masked row
        bias = cp.broadcast_to(cp.asarray(np.where(m, 0, -np.inf).astype(np.float32)), (b, hq, rows, t))
    y = cp.empty((b, rows, hq, dim), cp.float32).transpose(0, 2, 1, 3)
    kernels.attention(q, k, v, bias, y, 0.125, softcap, causal)
    want = ck.attention_twin(q, k, v, bias, 0.125, softcap, causal, cp)
    np.testing.assert_allclose(cp.asnumpy(y), cp.asnumpy(want), rtol=1e-4, atol=1e-5)


@gpu
@pytest.mark.parametrize("layout", ["3d", "4d"])
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("rot", [0, 8])
@pytest.mark.parametrize("with_pid", [True, False])
def test_rotary_kernel_matches_the_array_code(cp, kernels, layout, interleaved, rot, with_pid):
    from graphopt.backends.cpu_fused import rotary_kernel
    from graphopt.backends.cpu_kernels import KNode

    rng = np.random.default_rng(rot + interleaved)
    b, s, h, dim = 2, 5, 3, 16
    half = (rot or dim) // 2
    node = KNode("RotaryEmbedding", "", 23, {"interleaved": interleaved, "rotary_embedding_dim": rot,
                                             "num_heads": h if layout == "3d" else 0}, 4, 1)
    shape = (b, s, h * dim) if layout == "3d" else (b, h, s, dim)
    x = cp.asarray(rng.standard_normal(shape).astype(np.float32))
    if with_pid:
        cos = cp.asarray(rng.standard_normal((32, half)).astype(np.float32))
        sin = cp.asarray(rng.standard_normal((32, half)).astype(np.float32))
        pid = cp.asarray(rng.integers(0, 32, (b, s)))
        args = (x, cos, sin, pid)
    else:
        cos = cp.asarray(rng.standard_normal((1, s, half)).astype(np.float32))
        sin = cp.asarray(rng.standard_normal((1, s, half)).astype(np.float32))
        args = (x, cos, sin)
    want = rotary_kernel(node, cp)(*args)
    got = cuda_ops.rotary_op(node, cuda_ops.Device(cp, kernels))(*args)
    np.testing.assert_allclose(cp.asnumpy(got), cp.asnumpy(want), rtol=1e-5, atol=1e-6)


CUDA = CudaBackend(fused_attention=True)  # every op with device code, Attention and RotaryEmbedding too
CASES, APPLIES = applicable(CUDA)


@gpu
@pytest.mark.parametrize("name", APPLIES)
def test_node_case_on_the_gpu(name):
    result = run_case(CUDA, CASES[name])
    assert result.status == "passed", result.detail


@gpu
@pytest.mark.parametrize("fused", [False, True], ids=["split-attention", "fused-attention"])
@pytest.mark.parametrize("path", ALL_MODELS, ids=[p.stem for p in ALL_MODELS])
def test_fixture_on_the_gpu_matches_torch(path, fused):
    feeds, expected = split_reference(path)
    backend = CudaBackend(fused_attention=fused)
    model = graphopt.optimize(graphopt.load(path), target=backend)
    got = graphopt.compile(model, backend).run(feeds)
    for name, ref in expected.items():
        np.testing.assert_allclose(got[name], ref, atol=1e-4, rtol=0, err_msg=name)


@gpu
@pytest.mark.parametrize("name", ["llama-dynamo-decode", "qwen2-dynamo-decode", "qwen2-torchscript-prefill"])
@pytest.mark.parametrize("options", [dict(quant_bits=4, quant_block=32),
                                     dict(quant_bits=4, quant_block=128, quant_symmetric=False),
                                     dict(quant_bits=8, quant_block=128)], ids=["int4-b32", "uint4-b128", "int8-b128"])
def test_quantized_fixture_on_the_gpu_matches_onnxruntime(name, options):
    model = graphopt.optimize(graphopt.load(FIXTURES / f"{name}.onnx"), target="cuda", **options)
    feeds = load_inputs(FIXTURES / f"{name}.npz")
    exe = graphopt.compile(model, "cuda")
    feeds = {k: feeds[k] for k in exe.input_names}
    ref = run_ort(model, feeds)
    got = exe.run(feeds)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-4, rtol=0, err_msg=k)


@gpu
@pytest.mark.parametrize("name", ["llama-dynamo-decode", "llama-torchscript-decode", "qwen2-dynamo-decode",
                                  "qwen2-torchscript-decode", "mistral-dynamo-decode"])
@pytest.mark.parametrize("fused", [False, True], ids=["split-attention", "fused-attention"])
def test_greedy_tokens_on_the_gpu_match_torch(name, fused):
    ref = np.load(FIXTURES / f"{name.split('-')[0]}-greedy.npz")
    backend = CudaBackend(fused_attention=fused)
    model = graphopt.optimize(graphopt.load(FIXTURES / f"{name}.onnx"), target=backend)
    exe = graphopt.compile(model, backend)
    assert generate(model, ref["prompt_ids"].tolist(), 32, backend, executable=exe) == ref["tokens"].tolist()
    assert exe.stats["kv_in_place"] > 0


@gpu
def test_cuda_graph_replay_matches_op_by_op():
    path = FIXTURES / "qwen2-dynamo-decode.onnx"
    model = graphopt.optimize(graphopt.load(path), target="cuda")
    feeds = load_inputs(FIXTURES / "qwen2-dynamo-decode.npz")
    plain = graphopt.compile(model, "cuda")
    feeds = {k: feeds[k] for k in plain.input_names}
    want = plain.run(feeds)
    exe = CudaBackend(graphs=True).compile(model)
    outs = [exe.run(feeds) for _ in range(4)]
    assert exe.stats["graph_captures"] == 1 and exe.stats["graph_replays"] >= 2, exe.capture_problems
    assert exe.stats["graph_eager_steps"] == 0, exe.capture_problems
    for got in outs:
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=0, err_msg=k)
    other = dict(feeds)
    other["input_ids"] = (feeds["input_ids"] + 7) % 100  # new values, same shapes: the replay reads them
    np.testing.assert_allclose(exe.run(other)["logits"], plain.run(other)["logits"], atol=1e-5, rtol=0)


@gpu
@pytest.mark.parametrize("name", ["llama-dynamo-decode", "qwen2-torchscript-decode"])
def test_decode_with_static_kv_replays_a_cuda_graph_and_matches_torch(name):
    ref = np.load(FIXTURES / f"{name.split('-')[0]}-greedy.npz")
    model = graphopt.optimize(graphopt.load(FIXTURES / f"{name}.onnx"), target="cuda")
    exe = CudaBackend(graphs=True).compile(model)
    tokens = generate(model, ref["prompt_ids"].tolist(), 32, "cuda", executable=exe, static_kv=64)
    assert tokens == ref["tokens"].tolist()
    # prompt and check step run op by op; the 31 fixed-shape steps: one capture, then replays
    assert exe.stats["graph_captures"] == 1 and exe.stats["graph_replays"] >= 29, exe.capture_problems
    assert exe.stats["graph_eager_steps"] == 0, exe.capture_problems


@gpu
@pytest.mark.parametrize("extra", [[], ["--cuda-graphs"]], ids=["growing-kv", "static-kv-graphs"])
def test_generate_cli_on_the_gpu_reproduces_torch(tmp_path, extra):
    ref = np.load(FIXTURES / "qwen2-greedy.npz")
    out = tmp_path / "q.onnx"
    src = FIXTURES / "qwen2-dynamo-decode.onnx"
    assert run_cli("optimize", src, "-o", out, "--target", "cuda").returncode == 0
    res = run_cli("generate", out, "--target", "cuda", "--max-new-tokens", "32", "--prompt-ids",
                  ",".join(str(t) for t in ref["prompt_ids"]), *extra)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ",".join(str(t) for t in ref["tokens"])
