"""The command line: every command's --help, the optimize flow, and user errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import make_mlp, run_cli, run_ort, split_reference
from graphopt._cli import main



def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=300)


@pytest.mark.parametrize("command", ["optimize", "passes", "backends", "inspect"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: graphopt {command}" in capsys.readouterr().out


def test_console_script_installed():
    exe = shutil.which("graphopt", path=str(Path(sys.executable).parent))
    assert exe, "the console script `graphopt` is not installed beside this python"
    res = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("graphopt ")


def test_optimize_fixture_matches_torch(fixture_model, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    res = _cli("optimize", str(fixture_model), "-o", str(out), "--target", "cpu", "--report", str(report),
               "--verify")
    assert res.returncode == 0, res.stderr
    for name in ("shape-inference", "constant-folding", "dead-code-elimination"):
        assert name in res.stdout  # the per-pass table
    data = json.loads(report.read_text())
    assert [p["name"] for p in data["passes"]][-1] == "dead-code-elimination"
    assert data["nodes_after"] <= data["nodes_before"]
    assert data["passes"][0]["nodes_before"] == data["nodes_before"]
    assert data["passes"][-1]["nodes_after"] == data["nodes_after"] == len(onnx.load(str(out)).graph.node)
    feeds, expected = split_reference(fixture_model)
    got = run_ort(out, feeds)
    for name, ref in expected.items():
        np.testing.assert_allclose(got[name], ref, atol=1e-4, rtol=0, err_msg=name)


def test_optimize_passes_and_disable(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(make_mlp(), str(src))
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--passes", "identity-elimination,dead-code-elimination",
                 "--disable-pass", "dead-code-elimination", "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["identity-elimination"]
    assert report["ops_before"]["Identity"] == 1 and "Identity" not in report["ops_after"]


def test_passes_lists_builtins_and_plugin(capsys):
    assert main(["passes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["constant-folding"]["plugin"] == "graphopt.passes"
    assert rows["cast-cleanup"]["plugin"] == "cast_cleanup"
    assert main(["passes"]) == 0
    text = capsys.readouterr().out
    assert "cast-cleanup" in text and "dead-code-elimination" in text


def test_backends_json_declares_ops(capsys):
    assert main(["backends", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    cpu_ops = {o["op_type"] for o in rows["cpu"]["ops"]}
    assert {"MatMul", "RMSNormalization", "Attention", "DequantizeLinear"} <= cpu_ops
    ort_ops = {(o["domain"], o["op_type"]) for o in rows["onnxruntime"]["ops"]}
    assert ("", "MatMul") in ort_ops and ("com.microsoft", "GroupQueryAttention") in ort_ops
    assert rows["onnxruntime"]["executes"] is True
    assert main(["backends"]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime" in text
    if rows["cuda"]["unavailable_reason"] and "[cuda]" in rows["cuda"]["unavailable_reason"]:
        assert "graphopt[c" in text  # a reason's square brackets are text, not rich markup


def test_inspect(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(make_mlp(hidden=32), str(src))
    assert main(["inspect", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["opsets"] == {"": 18}
    assert info["parameters"] == 3 * 32 * 32 + 2 and info["parameter_bytes"] == 4 * info["parameters"]
    assert info["ops"] == {"MatMul": 3, "Relu": 3, "Mul": 2, "Identity": 1}
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 32]}]
    assert main(["inspect", str(src)]) == 0
    assert "op histogram" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["optimize", "{missing}", "-o", "{out}"], "graphopt optimize: error: cannot load {missing}: no such file"),
    (["optimize", "{text}", "-o", "{out}"], "graphopt optimize: error: cannot load {text}: not an ONNX model"),
    (["optimize", "{model}", "-o", "{out}", "--target", "tpu"],
     "graphopt optimize: error: unknown target 'tpu'; known targets: cpu, cuda, onnxruntime"),
    (["optimize", "{model}", "-o", "{out}", "--passes", "magic"], "graphopt optimize: error: unknown pass 'magic'"),
    (["optimize", "{model}", "-o", "{tmp}/no/such/dir/o.onnx"],
     "graphopt optimize: error: cannot save to {tmp}/no/such/dir/o.onnx: directory {tmp}/no/such/dir does not exist"),
    (["inspect", "{missing}"], "graphopt inspect: error: cannot load {missing}: no such file"),
], ids=["missing", "not-onnx", "unknown-target", "unknown-pass", "bad-output-dir", "inspect-missing"])
def test_user_errors_are_one_line(tmp_path, args, message):
    model, text = tmp_path / "m.onnx", tmp_path / "notes.txt"
    onnx.save(make_mlp(), str(model))
    text.write_text("not a model")
    subst = {"missing": str(tmp_path / "missing.onnx"), "text": str(text), "model": str(model),
             "out": str(tmp_path / "out.onnx"), "tmp": str(tmp_path)}
    res = _cli(*[a.format(**subst) for a in args])
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(message.format(**subst)), lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_input_is_never_modified(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(make_mlp(), str(src))
    before = src.read_bytes()
    assert main(["optimize", str(src), "-o", str(tmp_path / "o.onnx")]) == 0
    assert src.read_bytes() == before


def test_optimize_quantized_with_quality_report(tmp_path):
    src = Path(__file__).parent / "fixtures" / "qwen2-torchscript-decode.onnx"
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    res = _cli("optimize", str(src), "-o", str(out), "--quant-bits", "4", "--quant-block", "32",
               "--lm-quant-bits", "8", "--report", str(report))
    assert res.returncode == 0, res.stderr
    assert "quantization: 9 weights" in res.stdout and "end to end" in res.stdout
    data = json.loads(report.read_text())
    quality = data["quality"]
    assert {w["role"] for w in quality["weights"]} == {"linear", "tied"}
    assert all(w["bits"] == (8 if w["role"] == "tied" else 4) for w in quality["weights"])
    logits = next(e for e in quality["end_to_end"] if e["name"] == "logits")
    assert 0.5 < logits["cosine"] < 1.0  # 4-bit, tiny random model, random inputs: a smoke check of the figure
    assert out.stat().st_size < 0.25 * src.stat().st_size
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_quant_options_need_bits(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(make_mlp(), str(src))
    res = _cli("optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--quant-block", "64")
    assert res.returncode != 0 and "quantization options need --quant-bits" in res.stderr
    res = _cli("optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--quant-bits", "4", "--quant-block", "48")
    assert res.returncode != 0 and "block size 48 is not a power of two" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o.onnx").exists()
    for flags, message in ((["--quant-gptq-order", "act"], "quant_gptq_order is a gptq option"),
                           (["--quant-sequential"], "quant_sequential is a gptq option")):
        res = _cli("optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--quant-bits", "4", *flags)
        assert res.returncode == 1 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not (tmp_path / "o.onnx").exists()
