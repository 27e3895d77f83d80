"""attention-fuse on every fixture (both exporters, prefill and decode, left-padded batches),
hand-built variants, and the reasons candidates are refused."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from conftest import (CONTROL_MODELS, FIXTURES, SDPA_MODELS, UNFUSED_MODELS, padded_rows_zeroed, run_cli,
                      run_ort, split_reference)
from graphopt._evaluate import generate
from graphopt.rewrite import fused_by


def _layers(model: graphopt.Model) -> int:
    return sum(1 for n in model.graph.nodes if n.op == "Softmax")


@pytest.fixture(scope="module")
def optimized():
    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = graphopt.optimize(graphopt.load(path), target="onnxruntime", verify=True)
        return cache[path]
    return get


def test_fixture_fully_fused_and_equal_to_unfused(fixture_model, optimized):
    model = graphopt.load(fixture_model)
    out = optimized(fixture_model)
    layers = _layers(model)
    ops = out.op_histogram()
    assert ops["Attention"] == layers and ops["RotaryEmbedding"] == 2 * layers
    assert ops["RMSNormalization"] == 2 * layers + 1
    assert "Softmax" not in ops
    assert out.node_count() <= 0.5 * model.node_count(), (model.node_count(), out.node_count())
    rules = {fused_by(n) for n in out.graph.nodes if n.op == "Attention"}
    assert rules == {"attention-rotary-gqa-kvcache" if "decode" in fixture_model.name else "attention-rotary-gqa"}
    feeds, expected = split_reference(fixture_model)
    assert feeds["attention_mask"][1, 0] == 0  # the reference batch is left-padded
    unfused, fused = run_ort(model, feeds), run_ort(out, feeds)
    for name in unfused:
        np.testing.assert_allclose(fused[name], unfused[name], atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(fused[name], expected[name], atol=1e-4, rtol=0, err_msg=name)


def test_fixture_on_cpu_backend_equals_unfused(fixture_model, optimized):
    cpu = graphopt.get_backend("cpu")
    if not cpu.supports_op("Attention", "", 23):
        pytest.skip("the cpu backend does not declare Attention yet")
    model, out = graphopt.load(fixture_model), optimized(fixture_model)
    feeds, _ = split_reference(fixture_model)
    unfused = graphopt.compile(model, "cpu").run(feeds)
    fused = graphopt.compile(out, "cpu").run(feeds)
    for name in unfused:
        np.testing.assert_allclose(fused[name], unfused[name], atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize("name", ["qwen2-dynamo-decode", "llama-torchscript-decode"])
def test_greedy_tokens_identical_after_fusion(name, optimized, tmp_path):
    out = optimized(FIXTURES / f"{name}.onnx")
    ref = np.load(FIXTURES / f"{name.split('-')[0]}-greedy.npz")
    target = "cpu" if graphopt.get_backend("cpu").supports_op("Attention", "", 23) else "onnxruntime"
    assert generate(out, ref["prompt_ids"].tolist(), 32, target) == ref["tokens"].tolist()


def test_target_without_attention_is_respected():
    from graphopt.backends.cpu import CpuBackend

    class NoAttention(CpuBackend):  # the cpu backend without fused attention
        name = "no-attention"

        def ops(self):
            return [s for s in super().ops() if s.op_type not in ("Attention", "RotaryEmbedding")]

    out = graphopt.optimize(graphopt.load(FIXTURES / "qwen2-dynamo-decode.onnx"), target=NoAttention(),
                            explain=True)
    ops = out.op_histogram()
    assert "Attention" not in ops and ops["Softmax"] == 2 and ops["RMSNormalization"] == 5
    stats = {s.name: s for s in out.history}
    assert stats["attention-fuse"].counters == {"skipped_target": 1}
    assert any("does not support Attention, RotaryEmbedding" in n for n in out.notes)


# ----------------------------------------------------------- hand-built graphs
B, S, H, HKV, D = 2, 3, 4, 2, 8


def _mha(scale_op="Mul", rotary_halves=(D // 2, D), escape=False, mask=True, partial=False, qk_norm=False,
         sdpa=None):
    """A small attention block with the dynamo exporter's structure (no cache, GQA).

    ``sdpa``: torch's SDPA decomposition instead of eager attention: √scale on Q and on Kᵀ, the
    NaN guard after the softmax; ``"3d"`` also transposes K through 3-D reshapes whose targets
    come from ``Shape(K)`` (the dynamo export), ``"3d-wrong"`` with a first target that is not
    ``[-1, T, D]`` (so the product is not Kᵀ)."""
    rng = np.random.default_rng(0)
    inits = {
        "wq": rng.standard_normal((16, H * D)).astype(np.float32) * 0.3,
        "wk": rng.standard_normal((16, HKV * D)).astype(np.float32) * 0.3,
        "wv": rng.standard_normal((16, HKV * D)).astype(np.float32) * 0.3,
        "shape_q": np.array([B, S, H, D], np.int64), "shape_kv": np.array([B, S, HKV, D], np.int64),
        "rep_shape": np.array([B, HKV, H // HKV, S, D], np.int64), "kv_heads": np.array([B, H, S, D], np.int64),
        "out_shape": np.array([B, S, H * D], np.int64), "scale": np.array(D ** -0.5, np.float32),
        "ax1": np.array([1], np.int64), "ax2": np.array([2], np.int64), "ax_last": np.array([-1], np.int64),
        "zero": np.array([0], np.int64), "half": np.array([rotary_halves[0]], np.int64),
        "end": np.array([rotary_halves[1]], np.int64), "one": np.array([1], np.int64),
        "inv_freq": (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32),
        "norm_scale": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
        "rdim": np.array([D // 2], np.int64), "dim": np.array([D], np.int64),
    }
    if partial:  # rotate only the first D/2 channels: tables of D/2, halves of D/4
        r = D // 2
        inits["inv_freq"] = (1.0 / 10000 ** (np.arange(0, r, 2) / r)).astype(np.float32)
        inits["half"], inits["end"] = np.array([r // 2], np.int64), np.array([r], np.int64)
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "wq"], ["q3"]), n("MatMul", ["x", "wk"], ["k3"]), n("MatMul", ["x", "wv"], ["v3"]),
        n("Reshape", ["q3", "shape_q"], ["q_r"]), n("Transpose", ["q_r"], ["q4"], perm=[0, 2, 1, 3]),
        n("Reshape", ["k3", "shape_kv"], ["k_r"]), n("Transpose", ["k_r"], ["k4"], perm=[0, 2, 1, 3]),
        n("Reshape", ["v3", "shape_kv"], ["v_r"]), n("Transpose", ["v_r"], ["v4"], perm=[0, 2, 1, 3]),
        # rotary tables from position ids: [B, S, D] with equal halves, unsqueezed on the head axis
        n("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT), n("Unsqueeze", ["posf", "ax_last"], ["pos3"]),
        n("Mul", ["pos3", "inv_freq"], ["freqs"]), n("Concat", ["freqs", "freqs"], ["emb"], axis=-1),
        n("Cos", ["emb"], ["cos3"]), n("Sin", ["emb"], ["sin3"]),
        n("Unsqueeze", ["cos3", "ax1"], ["cos"]), n("Unsqueeze", ["sin3", "ax1"], ["sin"]),
    ]
    if qk_norm:  # Qwen3: RMS-normalise each head before the transpose
        for t in ("q", "k"):
            i = nodes.index(next(x for x in nodes if x.output[0] == f"{t}4"))
            nodes[i] = n("RMSNormalization", [f"{t}_r", "norm_scale"], [f"{t}_n"], epsilon=1e-6)
            nodes.insert(i + 1, n("Transpose", [f"{t}_n"], [f"{t}4"], perm=[0, 2, 1, 3]))
    for t in ("q", "k"):
        src = f"{t}4"
        if partial:
            nodes += [n("Slice", [f"{t}4", "zero", "rdim", "ax_last", "one"], [f"{t}_part"]),
                      n("Slice", [f"{t}4", "rdim", "dim", "ax_last", "one"], [f"{t}_pass"])]
            src = f"{t}_part"
        nodes += [
            n("Slice", [src, "zero", "half", "ax_last", "one"], [f"{t}_lo"]),
            n("Slice", [src, "half", "end", "ax_last", "one"], [f"{t}_hi"]),
            n("Neg", [f"{t}_hi"], [f"{t}_nhi"]), n("Concat", [f"{t}_nhi", f"{t}_lo"], [f"{t}_rot"], axis=-1),
            n("Mul", [src, "cos"], [f"{t}_c"]), n("Mul", [f"{t}_rot", "sin"], [f"{t}_s"]),
            n("Add", [f"{t}_c", f"{t}_s"], [f"{t}_emb_part" if partial else f"{t}_emb"]),
        ]
        if partial:
            nodes.append(n("Concat", [f"{t}_emb_part", f"{t}_pass"], [f"{t}_emb"], axis=-1))
    for t in ("k", "v"):
        src = "k_emb" if t == "k" else "v4"
        nodes += [n("Unsqueeze", [src, "ax2"], [f"{t}_u"]), n("Expand", [f"{t}_u", "rep_shape"], [f"{t}_x"]),
                  n("Reshape", [f"{t}_x", "kv_heads"], [f"{t}_rep"])]
    if sdpa:
        inits["root_scale"] = np.array(D ** -0.25, np.float32)
        inits["nan_fill"] = np.array(0.0, np.float32)
        nodes.append(n("Mul", ["q_emb", "root_scale"], ["q_scaled"]))
        if sdpa == "split":
            nodes.append(n("Transpose", ["k_rep"], ["kT_raw"], perm=[0, 1, 3, 2]))
        else:
            inits.update(minus_one=np.array([-1], np.int64), lo2=np.array([-2], np.int64),
                         start=np.array([0], np.int64), big=np.array([2**62], np.int64))
            nodes += [n("Shape", ["k_rep"], ["k_shape"]),
                      n("Slice", ["k_shape", "start", "lo2"], ["k_bh"]),
                      n("Slice", ["k_shape", "lo2", "minus_one"], ["k_t"]),
                      n("Slice", ["k_shape", "minus_one", "big"], ["k_d"]),
                      n("Concat", ["minus_one", "k_t", "k_d"] if sdpa == "3d" else ["minus_one", "k_d", "k_t"],
                        ["flat_shape"], axis=0),
                      n("Concat", ["k_bh", "k_d", "k_t"], ["back_shape"], axis=0),
                      n("Reshape", ["k_rep", "flat_shape"], ["k_flat"]),
                      n("Transpose", ["k_flat"], ["k_flat_t"], perm=[0, 2, 1]),
                      n("Reshape", ["k_flat_t", "back_shape"], ["kT_raw"])]
        nodes += [n("Mul", ["kT_raw", "root_scale"], ["kT"]), n("MatMul", ["q_scaled", "kT"], ["scaled"])]
    else:
        nodes += [n("Transpose", ["k_rep"], ["kT"], perm=[0, 1, 3, 2]), n("MatMul", ["q_emb", "kT"], ["qk"])]
        if scale_op == "Mul":
            nodes.append(n("Mul", ["qk", "scale"], ["scaled"]))
        else:
            inits["scale"] = np.array(D ** 0.5, np.float32)
            nodes.append(n("Div", ["qk", "scale"], ["scaled"]))
    if mask:
        nodes.append(n("Add", ["scaled", "mask"], ["scores"]))
    nodes.append(n("Softmax", ["scores" if mask else "scaled"], ["probs"], axis=-1))
    if sdpa:
        nodes += [n("IsNaN", ["probs"], ["probs_nan"]), n("Where", ["probs_nan", "nan_fill", "probs"], ["probs_ok"])]
    nodes += [n("MatMul", ["probs_ok" if sdpa else "probs", "v_rep"], ["ctx4"]),
              n("Transpose", ["ctx4"], ["ctx_t"], perm=[0, 2, 1, 3]), n("Reshape", ["ctx_t", "out_shape"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, H * D])]
    if escape:
        outputs.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, [B, H, S, S]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, 16]),
              helper.make_tensor_value_info("pos", TensorProto.INT64, [B, S])]
    if mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [B, 1, S, S]))
    g = helper.make_graph(nodes, "attn", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23 if qk_norm else 18)])
    onnx.checker.check_model(proto)
    return graphopt.Model.from_proto(proto)


def _feeds(mask=True, fill=np.finfo(np.float32).min):
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((B, S, 16)).astype(np.float32),
             "pos": np.array([[0, 1, 2], [0, 0, 1]], np.int64)}
    if mask:
        m = np.triu(np.full((S, S), fill, np.float32), 1)[None, None].repeat(B, 0)
        m[1, :, :, 0] = fill  # left padding: the first query of row 1 sees nothing
        feeds["mask"] = m
    return feeds


@pytest.mark.parametrize("variant", [dict(), dict(scale_op="Div"), dict(mask=False), dict(partial=True),
                                     dict(qk_norm=True), dict(partial=True, qk_norm=True), dict(sdpa="split"),
                                     dict(sdpa="3d"), dict(sdpa="3d", qk_norm=True)],
                         ids=["mul-scale", "div-scale", "no-mask", "partial-rotary", "qk-norm", "partial-qk-norm",
                              "sdpa-split-scale", "sdpa-3d-transpose", "sdpa-qk-norm"])
def test_hand_built_variants(variant):
    model = _mha(**variant)
    out = graphopt.optimize(model, target="onnxruntime", passes=["shape-inference", "attention-fuse",
                                                                 "dead-code-elimination"], verify=True)
    ops = out.op_histogram()
    assert ops["Attention"] == 1 and ops["RotaryEmbedding"] == 2, dict(ops)
    att = next(n for n in out.graph.nodes if n.op == "Attention")
    assert (att.attrs["q_num_heads"], att.attrs["kv_num_heads"]) == (H, HKV)
    rot = next(n for n in out.graph.nodes if n.op == "RotaryEmbedding")
    assert rot.attrs.get("rotary_embedding_dim", 0) == (D // 2 if variant.get("partial") else 0)
    assert ops.get("RMSNormalization", 0) == (2 if variant.get("qk_norm") else 0)
    assert att.attrs["scale"] == pytest.approx(D ** -0.5)
    feeds = _feeds(mask=variant.get("mask", True))
    np.testing.assert_allclose(run_ort(out, feeds)["y"], run_ort(model, feeds)["y"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("fill", [-np.inf, np.finfo(np.float32).min], ids=["minus-inf", "lowest-float"])
def test_sdpa_nan_guard_keeps_fully_masked_rows(fill):
    """TorchScript's SDPA masks with -inf and its NaN guard zeroes a row with every key masked;
    dynamo's masks with the lowest float (no NaN, uniform weights). The fused op must give the
    same for both, in onnxruntime and on the cpu backend."""
    model = _mha(sdpa="3d")
    out = graphopt.optimize(model, target="cpu", passes=["shape-inference", "attention-fuse",
                                                         "dead-code-elimination"], verify=True)
    assert out.op_histogram()["Attention"] == 1
    feeds = _feeds(fill=fill)
    want = run_ort(model, feeds)["y"]
    assert np.isfinite(want).all()
    assert (np.abs(want[1, 0]).max() == 0) == np.isneginf(fill)  # the padded query row
    np.testing.assert_allclose(run_ort(out, feeds)["y"], want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(graphopt.compile(out, "cpu").run(feeds)["y"], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant, reason", [
    (dict(rotary_halves=(2, D)), "are not rotate-half over the full head"),
    (dict(escape=True), "'probs' is a graph output"),
    (dict(sdpa="3d-wrong"), "K is flattened to 3-D with a shape that is not [-1, T, D]"),
], ids=["partial-rotary", "escaping-probs", "sdpa-3d-not-a-transpose"])
def test_refused_with_reason(variant, reason):
    model = _mha(**variant)
    out = graphopt.optimize(model, target="onnxruntime", passes=["shape-inference", "attention-fuse"], explain=True)
    assert "Attention" not in out.op_histogram()
    assert any(reason in n for n in out.notes), out.notes


# ----------------------------------------------------- other architectures
EXPECTED_NORMS = {"qwen3": 9}  # 2 layers x (2 + q/k per-head norms) + final


def _compare(a: dict, b: dict, atol: float) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in b)


def test_other_architectures_fuse_fully(arch_model):
    from conftest import ARCH_MODELS  # noqa: F401  (the fixture's source)

    model = graphopt.load(arch_model)
    out = graphopt.optimize(model, target="cpu", verify=True, explain=True)
    family = arch_model.name.split("-")[0]
    ops = out.op_histogram()
    layers = sum(1 for n in model.graph.nodes if n.op == "Softmax")
    assert ops["Attention"] == layers, out.notes
    assert ops["RMSNormalization"] == EXPECTED_NORMS.get(family, 2 * layers + 1)
    assert ops["RotaryEmbedding"] == 2 * layers
    if family == "phi3":
        assert {n.attrs.get("rotary_embedding_dim") for n in out.graph.nodes if n.op == "RotaryEmbedding"} == {8}
    assert out.node_count() <= 0.65 * model.node_count()
    feeds, expected = split_reference(arch_model)
    unfused = graphopt.compile(model, "cpu").run(feeds)
    fused = graphopt.compile(out, "cpu").run(feeds)
    assert _compare(fused, unfused, 1e-5) <= 1e-5
    assert _compare(fused, expected, 1e-4) <= 1e-4
    try:
        ort_unfused = run_ort(model, feeds)
    except Exception:  # onnxruntime refuses some exporter-emitted opset-23 RotaryEmbedding nodes
        ort_unfused = None
    ort_fused = graphopt.compile(out, "onnxruntime").run(feeds)
    assert _compare(ort_fused, expected, 1e-4) <= 1e-4
    if ort_unfused is not None:
        assert _compare(ort_fused, ort_unfused, 1e-5) <= 1e-5


@pytest.mark.parametrize("family", ["gemma", "qwen3", "mistral", "phi3"])
def test_other_architectures_greedy_tokens(family):
    ref = np.load(FIXTURES / f"{family}-greedy.npz")
    out = graphopt.optimize(graphopt.load(FIXTURES / f"{family}-dynamo-decode.onnx"), target="cpu")
    assert generate(out, ref["prompt_ids"].tolist(), 32, "cpu") == ref["tokens"].tolist()


@pytest.mark.parametrize("path", CONTROL_MODELS, ids=[p.stem for p in CONTROL_MODELS])
def test_gpt2_negative_control(path):
    model = graphopt.load(path)
    out = graphopt.optimize(model, target="cpu", verify=True)
    ops = out.op_histogram()
    # LayerNorm is not an RMS norm and GPT-2 has no rotary: neither may be "fused" into one.
    assert "RMSNormalization" not in ops and "RotaryEmbedding" not in ops
    # Its plain multi-head attention may fuse, into Attention without rotary, and must stay exact.
    assert all(fused_by(n) in ("attention", "attention-kvcache") for n in out.graph.nodes if n.op == "Attention")
    feeds, expected = split_reference(path)
    got = graphopt.compile(out, "cpu").run(feeds)
    assert _compare(got, expected, 1e-4) <= 1e-4
    assert _compare(run_ort(out, feeds), run_ort(model, feeds), 1e-5) <= 1e-5


# ------------------------------------------- the library default: sdpa exports
def _families(path) -> tuple[str, str, str]:
    family, exporter, _, graph = path.stem.split("-")
    return family, exporter, graph


@pytest.mark.parametrize("path", SDPA_MODELS, ids=[p.stem for p in SDPA_MODELS])
def test_sdpa_exports_fully_fused_and_exact(path):
    """transformers' default attention, both exporters, prefill (with its KV cache outputs) and
    decode, left-padded batch: every block and norm fuses, nothing is reported unfused, and the
    outputs equal the unfused export's in onnxruntime and on the cpu backend."""
    family, exporter, graph = _families(path)
    model = graphopt.load(path)
    out = graphopt.optimize(model, target="cpu", verify=True)
    layers = _layers(model)
    ops = out.op_histogram()
    assert ops["Attention"] == layers and "Softmax" not in ops, out.notes
    assert ops["RotaryEmbedding"] == 2 * layers
    assert ops["RMSNormalization"] == EXPECTED_NORMS.get(family, 2 * layers + 1)
    stats = {s.name: s for s in out.history}
    assert "unfused" not in stats["attention-fuse"].counters
    assert out.node_count() <= (0.45 if exporter == "dynamo" else 0.2) * model.node_count()
    parts = {p for n in out.graph.nodes if n.op == "Attention" for p in fused_by(n).split("-")}
    assert ("kvcache" in parts) == (graph == "decode") and ("present" in parts) == (graph == "prefill")
    feeds, expected = split_reference(path)
    assert feeds["attention_mask"][1, 0] == 0  # left-padded
    unfused, fused = run_ort(model, feeds), run_ort(out, feeds)
    cpu_unfused = graphopt.compile(model, "cpu").run(feeds)
    cpu_fused = graphopt.compile(out, "cpu").run(feeds)
    assert set(fused) == set(expected)
    for name in unfused:
        np.testing.assert_allclose(fused[name], unfused[name], atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(cpu_fused[name], cpu_unfused[name], atol=1e-5, rtol=0, err_msg=name)
    got, want = padded_rows_zeroed(path, feeds, fused), padded_rows_zeroed(path, feeds, expected)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=0, err_msg=name)


SDPA_DECODE = [p for p in SDPA_MODELS if p.stem.endswith("decode")]


@pytest.mark.parametrize("path", SDPA_DECODE, ids=[p.stem for p in SDPA_DECODE])
def test_sdpa_greedy_tokens(path):
    family = path.name.split("-")[0]
    ref = np.load(FIXTURES / f"{family}-greedy.npz")
    out = graphopt.optimize(graphopt.load(path), target="cpu")
    assert generate(out, ref["prompt_ids"].tolist(), 32, "cpu") == ref["tokens"].tolist()


def test_unfused_attention_is_reported(tmp_path):
    """Qwen3's per-head norms are matched fused: without rmsnorm-fuse its attention cannot fuse,
    and optimize says so on stderr (one line) and in the report, not only under --explain."""
    report = tmp_path / "r.json"
    res = run_cli("optimize", FIXTURES / "qwen3-dynamo-sdpa-decode.onnx", "-o", tmp_path / "o.onnx", "--target",
                  "cpu", "--disable-pass", "rmsnorm-fuse", "--report", report)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("warning: attention-fuse")]
    assert len(lines) == 1, res.stderr
    assert "left 2 of 2 candidates unfused" in lines[0] and "is not a [B,S,H·D] projection" in lines[0]
    stats = {p["name"]: p for p in json.loads(report.read_text())["passes"]}["attention-fuse"]
    assert stats["counters"]["unfused"] == 2 and len(stats["details"]["unfused"]) == 2
    ok = run_cli("optimize", FIXTURES / "qwen3-dynamo-sdpa-decode.onnx", "-o", tmp_path / "p.onnx", "--target", "cpu")
    assert ok.returncode == 0 and "warning" not in ok.stderr


def test_router_softmax_is_not_an_attention_candidate():
    """A Softmax over x·W (an MoE router, a classifier head) is not attention-shaped."""
    n = helper.make_node
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    g = helper.make_graph([n("MatMul", ["x", "w"], ["s"]), n("Softmax", ["s"], ["y"], axis=-1)], "router",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    model = graphopt.Model.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    out = graphopt.optimize(model, target="cpu", passes=["attention-fuse"])
    assert "unfused" not in out.history[-1].counters


@pytest.mark.parametrize("path", UNFUSED_MODELS, ids=[p.stem for p in UNFUSED_MODELS])
def test_families_not_fused_yet_are_reported_and_exact(path):
    """Gemma-2 (attention softcapping, eager: transformers' sdpa refuses softcap) and Gemma-3 (q/k
    norms x·(1+w), local/global rotary) do not fuse yet. Each block must be reported with its
    reason, and the optimized model must still compute the export's outputs."""
    model = graphopt.load(path)
    out = graphopt.optimize(model, target="cpu", verify=True)
    stats = {s.name: s for s in out.history}["attention-fuse"]
    assert stats.counters.get("unfused") == _layers(model) and stats.details["unfused"]
    feeds, expected = split_reference(path)
    got = graphopt.compile(out, "cpu").run(feeds)
    want = run_ort(model, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0, err_msg=name)
    got, expected = padded_rows_zeroed(path, feeds, got), padded_rows_zeroed(path, feeds, expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-4, rtol=0, err_msg=name)
