"""Export a Llama-family decoder with random weights for benchmarks (needs torch).

Default: ~150 M parameters (hidden 1024, 8 layers, 16 query / 4 KV heads, intermediate
2816, vocab 32000, untied), fp32, the decode graph with KV cache (Hugging Face I/O
names), exported by torch's dynamo exporter with transformers' default attention (``--attn sdpa``;
``--attn eager`` for the explicit form) — the same machinery as the test fixtures.

    python benchmarks/make_llama.py --out benchmarks/work/llama-150m-decode.onnx
    python benchmarks/make_llama.py --preset qwen2-0.5b --out benchmarks/work/qwen2-0.5b-decode.onnx

``--preset qwen2-0.5b`` is Qwen2-0.5B's shape (Qwen2 architecture with q/k/v biases, hidden
896, 24 layers, 14 query / 2 KV heads, intermediate 4864, vocab 151936, tied embeddings:
494 M parameters, 1.98 GB fp32), the model ``graphopt bench --target cuda`` is measured on.
Models over 1.5 GB are written with external data (``OUT.onnx.data``).

``--genai-peer DIR`` also builds the hand-tuned peer the fusion target is set against: the same
model (same weights) saved as a Hugging Face checkpoint and converted by onnxruntime-genai's model
builder (``python -m onnxruntime_genai.models.builder -p fp32 -e cpu``), which emits
GroupQueryAttention, SkipSimplifiedLayerNormalization and merged QKV by hand-written rules.
``benchmarks/bench_fusion.py --peer genai=DIR/model.onnx`` times it beside the unfused export and
graphopt's fused model. Needs ``pip install onnxruntime-genai==0.18.0`` beside the requirements.

Needs tests/fixtures/requirements.txt (torch==2.13.0 CPU build, transformers).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _export_module():
    spec = importlib.util.spec_from_file_location("fixture_export", ROOT / "tests" / "fixtures" / "export.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fixture_export"] = mod
    spec.loader.exec_module(mod)
    return mod


PRESETS = {
    "llama-150m": dict(arch="llama", hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=2816, vocab=32000),
    "qwen2-0.5b": dict(arch="qwen2", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "work" / "llama-150m-decode.onnx"))
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named shape (overrides the size flags)")
    p.add_argument("--arch", choices=("llama", "qwen2"), default="llama")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    p.add_argument("--graph", choices=("decode", "prefill"), default="decode")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa",
                   help="transformers' attention implementation (sdpa is its default)")
    p.add_argument("--genai-peer", metavar="DIR",
                   help="also write onnxruntime-genai's model builder output (fp32, cpu) of the same model to DIR")
    args = p.parse_args(argv)
    for key, value in PRESETS.get(args.preset, {}).items():
        setattr(args, key, value)

    ex = _export_module()
    ex.COMMON_CONFIG.update(hidden_size=args.hidden, num_hidden_layers=args.layers,
                            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                            intermediate_size=args.intermediate, vocab_size=args.vocab,
                            initializer_range=0.02)
    model = ex.build_model(args.arch)
    params = sum(p.numel() for p in model.parameters())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    exp = {("dynamo", "decode"): ex.DYNAMO_DECODE, ("dynamo", "prefill"): ex.DYNAMO_PREFILL,
           ("torchscript", "decode"): ex.TS_DECODE, ("torchscript", "prefill"): ex.TS_PREFILL}[args.exporter, args.graph]
    exp = dataclasses.replace(exp, attn=args.attn)
    opset = ex.export_one(model, exp, str(out), external_data=params * 4 > 1.5e9)
    size = sum(f.stat().st_size for f in (out, Path(str(out) + ".data")) if f.exists())
    print(f"wrote {out}: {params / 1e6:.1f} M parameters, opset {opset}, {size / 2**20:.0f} MiB")
    if args.genai_peer:
        build_genai_peer(model, Path(args.genai_peer))
    return 0


def build_genai_peer(model, out: Path) -> None:
    """Convert the same model (same weights) with onnxruntime-genai's hand-written model builder."""
    import subprocess
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        # the builder copies a tokenizer into its output: a word-level one over the model's vocabulary
        vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1",
                                eos_token="t2").save_pretrained(tmp)
        done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", tmp, "-o", str(out),
                               "-p", "fp32", "-e", "cpu", "-c", str(Path(tmp) / "cache")],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"onnxruntime-genai's model builder failed:\n{done.stderr[-2000:]}")
    print(f"wrote {out / 'model.onnx'} (onnxruntime-genai model builder, fp32, cpu)")


if __name__ == "__main__":
    sys.exit(main())
