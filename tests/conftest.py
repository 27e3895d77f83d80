from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from fixtures.padding import zero_padded_rows

FIXTURES = Path(__file__).parent / "fixtures"
#: The core set: Llama (untied) and Qwen2 (tied) × dynamo/TorchScript × prefill/decode.
FIXTURE_MODELS = sorted(FIXTURES / f"{m}-{e}-{g}.onnx" for m in ("llama", "qwen2")
                        for e in ("dynamo", "torchscript") for g in ("prefill", "decode"))
#: Other architectures and exporter settings, for generalisation (see tests/fixtures/README.md).
#: Families whose attention graphopt does not fuse yet (Gemma-2's softcapping, Gemma-3's (1+w) q/k
#: norms): tested for being reported and staying exact, not for fusing.
NOT_YET_FUSED = ("gemma2", "gemma3")
ARCH_MODELS = sorted(p for p in FIXTURES.glob("*-dynamo*-*.onnx")
                     if p not in FIXTURE_MODELS and "-sdpa-" not in p.name
                     and not p.name.startswith(("gpt2", "ort-", *NOT_YET_FUSED)))
#: transformers' default attention (sdpa), both exporters, prefill graphs with their KV cache outputs.
SDPA_MODELS = sorted(p for p in FIXTURES.glob("*-sdpa-*.onnx") if not p.name.startswith(("gpt2", *NOT_YET_FUSED)))
UNFUSED_MODELS = sorted(p for p in FIXTURES.glob("*.onnx") if p.name.startswith(NOT_YET_FUSED))
CONTROL_MODELS = sorted(FIXTURES.glob("gpt2-*.onnx"))


def fixture_ids() -> list[str]:
    return [p.stem for p in FIXTURE_MODELS]


@pytest.fixture(params=FIXTURE_MODELS, ids=fixture_ids())
def fixture_model(request) -> Path:
    """Each exported decoder fixture (llama/qwen2 × dynamo/torchscript × prefill/decode)."""
    return request.param


@pytest.fixture(params=ARCH_MODELS, ids=[p.stem for p in ARCH_MODELS])
def arch_model(request) -> Path:
    """Gemma, Qwen3, Mistral, Phi-3 and an opset-23 Llama export (dynamo exporter)."""
    return request.param


def run_cli(*args, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``graphopt ARGS`` in a fresh interpreter (output captured as text)."""
    return subprocess.run([sys.executable, "-m", "graphopt._cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def reference(path: Path) -> dict[str, np.ndarray]:
    """Inputs and torch outputs stored beside a fixture."""
    with np.load(path.with_suffix(".npz")) as z:
        return {k: z[k] for k in z.files}


def split_reference(model_path: Path) -> tuple[dict, dict]:
    ref = reference(model_path)
    proto = onnx.load(str(model_path), load_external_data=False)
    inputs = {i.name for i in proto.graph.input}
    return {k: v for k, v in ref.items() if k in inputs}, {k: v for k, v in ref.items() if k not in inputs}


@functools.cache
def _padded_rows_differ() -> frozenset[str]:
    """The fixtures whose manifest entry says torch and the export disagree on padded query rows."""
    return frozenset(f["file"] for f in manifest().get("files", []) if "padded_query_rows" in f)


def padded_rows_zeroed(path: Path, feeds: dict, outs: dict) -> dict:
    """``outs`` with the padded query positions zeroed where the fixture's manifest says torch and
    the export disagree there (dynamo sdpa prefill: rows with every key masked; see export.py)."""
    return zero_padded_rows(feeds, outs) if path.name in _padded_rows_differ() else outs


def run_ort(model: graphopt.Model | Path, feeds: dict) -> dict[str, np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    # onnxruntime turns DequantizeLinear -> MatMul into MatMulNBits and by default quantizes its
    # activations to int8; as the numerical reference it must keep them in float.
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    source = str(model) if isinstance(model, Path) else model.to_onnx().SerializeToString()
    sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def make_mlp(hidden: int = 64, layers: int = 3, seed: int = 0) -> onnx.ModelProto:
    """A small MLP with weights over 1 KiB (so they go to external data), a duplicated
    weight, an Identity and a foldable constant expression."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    x = "x"
    for i in range(layers):
        w = rng.standard_normal((hidden, hidden)).astype(np.float32) / hidden**0.5
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    inits.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    inits.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    nodes.append(helper.make_node("Mul", ["two", "half"], ["one"], name="fold_me"))
    nodes.append(helper.make_node("Mul", [x, "one"], ["scaled"], name="scale"))
    nodes.append(helper.make_node("Identity", ["scaled"], ["y"], name="id"))
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="graphopt-tests")
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def mlp_proto() -> onnx.ModelProto:
    return make_mlp()


def save_external(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)
    return path


def manifest() -> dict:
    p = FIXTURES / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else {}
