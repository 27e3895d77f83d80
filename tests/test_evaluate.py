"""verify, generate, run and bench from the command line and the library."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import graphopt
from conftest import FIXTURES, run_cli
from graphopt._evaluate import verify
from graphopt._inputs import InputSpec, build_inputs, vocab_size

DECODE = FIXTURES / "qwen2-torchscript-decode.onnx"


_cli = run_cli


def test_built_inputs_are_valid_for_a_decoder():
    model = graphopt.load(DECODE)
    feeds = build_inputs(model, InputSpec(batch=2, seq=3, past=5, left_pad=2))
    assert vocab_size(model) == 512
    assert feeds["input_ids"].shape == (2, 3) and feeds["input_ids"].max() < 512
    assert feeds["attention_mask"].shape == (2, 8) and feeds["attention_mask"][1, :7].sum() == 0
    assert feeds["position_ids"].tolist() == [[5, 6, 7], [0, 0, 0]]
    assert feeds["past_key_values.1.value"].shape == (2, 2, 5, 16)


def test_verify_optimized_against_original(tmp_path):
    out = tmp_path / "opt.onnx"
    graphopt.optimize(graphopt.load(DECODE)).save(out)
    report = verify(DECODE, out, "cpu")
    assert report.ok
    logits = next(o for o in report.outputs if o.name == "logits")
    assert logits.max_abs < 1e-4 and logits.cosine > 0.999999 and logits.top1 == 1.0
    res = _cli("verify", str(DECODE), str(out), "--target", "cpu", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["ok"] is True


def test_verify_catches_a_planted_error(tmp_path):
    proto = onnx.load(str(DECODE))
    weights = {t.name: t for t in proto.graph.initializer}
    first_matmul = next(n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights)
    big = weights[first_matmul.input[1]]  # layer 0's first projection: used by every token
    arr = onnx.numpy_helper.to_array(big).copy()
    arr[0, 0] += 0.5  # one weight, planted
    big.CopyFrom(onnx.numpy_helper.from_array(arr, big.name))
    bad = tmp_path / "corrupt.onnx"
    onnx.save(proto, str(bad))
    res = _cli("verify", str(DECODE), str(bad), "--target", "cpu")
    assert res.returncode == 1
    assert res.stderr.startswith("graphopt verify: error: ") and "beyond atol=0.0001" in res.stderr
    assert "logits (max abs" in res.stderr
    report = verify(DECODE, bad, "cpu")
    assert not report.ok and next(o for o in report.outputs if o.name == "logits").max_abs > 1e-3


def test_generate_cli_matches_torch():
    ref = np.load(FIXTURES / "llama-greedy.npz")
    prompt = ",".join(str(t) for t in ref["prompt_ids"])
    res = _cli("generate", str(FIXTURES / "llama-dynamo-decode.onnx"), "--target", "cpu", "--prompt-ids", prompt,
               "--max-new-tokens", "32")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ",".join(str(t) for t in ref["tokens"])


def test_generate_cli_with_static_kv_buffers_matches_torch():
    ref = np.load(FIXTURES / "llama-greedy.npz")
    prompt = ",".join(str(t) for t in ref["prompt_ids"])
    res = _cli("generate", str(FIXTURES / "llama-dynamo-decode.onnx"), "--target", "cpu", "--prompt-ids", prompt,
               "--max-new-tokens", "32", "--static-kv", "64")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ",".join(str(t) for t in ref["tokens"])


@pytest.mark.parametrize("args, message", [
    (["--prompt-ids", "1,x"], "--prompt-ids expects comma-separated integers"),
    (["--prompt-ids", ","], "--prompt-ids is empty"),
    (["--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--static-kv", "6"], "static KV cache full (6 slots)"),
    (["--prompt-ids", "1,2", "--cuda-graphs"], "--cuda-graphs needs --target cuda"),
])
def test_generate_bad_prompt(args, message):
    res = _cli("generate", str(DECODE), *args)
    assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr


def test_run_cli_with_inputs(tmp_path):
    ref = dict(np.load(DECODE.with_suffix(".npz")))
    model = onnx.load(str(DECODE), load_external_data=False)
    inputs = tmp_path / "in.npz"
    np.savez(inputs, **{i.name: ref[i.name] for i in model.graph.input})
    out = tmp_path / "out.npz"
    res = _cli("run", str(DECODE), "--target", "cpu", "--inputs", str(inputs), "-o", str(out))
    assert res.returncode == 0, res.stderr
    got = np.load(out)
    np.testing.assert_allclose(got["logits"], ref["logits"], atol=1e-4)
    res = _cli("run", str(DECODE), "--inputs", str(tmp_path / "nope.npz"))
    assert res.returncode != 0 and "cannot read inputs from" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_bench_reports_both_engines(tmp_path):
    out = tmp_path / "bench.json"
    res = _cli("bench", str(DECODE), "--target", "cpu", "--prefill", "4", "--past", "8", "--runs", "2",
               "--warmup", "1", "--json", str(out))
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    phases = {(r["engine"], r["phase"]) for r in data["results"]}
    assert phases == {("cpu", "prefill"), ("cpu", "decode"), ("onnxruntime", "prefill"), ("onnxruntime", "decode")}
    assert data["ratios"]["decode"]["latency_vs_onnxruntime"] > 0
    assert all(r["peak_rss"] > 0 and r["median_s"] > 0 for r in data["results"])
    assert data["bandwidth_bytes_per_s"] > 1e9
    assert "vs ort" in res.stdout


def test_bench_on_an_unavailable_target_says_why_in_one_line():
    from graphopt.backends.cuda import _gpu_problem

    reason = _gpu_problem()
    if reason is None:
        pytest.skip("a GPU is present")
    res = _cli("bench", str(DECODE), "--target", "cuda", "--runs", "1", "--warmup", "0")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"graphopt bench: error: target 'cuda' is unavailable here: {reason}"
