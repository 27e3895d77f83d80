"""Export a Llama-shaped decoder with random weights for CPU benchmarks (needs torch).

Default: ~150 M parameters (hidden 1024, 8 layers, 16 query / 4 KV heads, intermediate
2816, vocab 32000, untied), fp32, the decode graph with KV cache (Hugging Face I/O
names), exported by torch's dynamo exporter — the same machinery as the test fixtures.

    python benchmarks/make_llama.py --out benchmarks/work/llama-150m-decode.onnx

Needs tests/fixtures/requirements.txt (torch==2.13.0 CPU build, transformers).
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "work" / "llama-150m-decode.onnx"))
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    p.add_argument("--graph", choices=("decode", "prefill"), default="decode")
    args = p.parse_args(argv)

    ex = _export_module()
    ex.COMMON_CONFIG.update(hidden_size=args.hidden, num_hidden_layers=args.layers,
                            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                            intermediate_size=args.intermediate, vocab_size=args.vocab,
                            initializer_range=0.02)
    model = ex.build_model("llama")
    params = sum(p.numel() for p in model.parameters())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    opset = ex.export_one(model, args.exporter, args.graph, str(out))
    print(f"wrote {out}: {params / 1e6:.1f} M parameters, opset {opset}, {out.stat().st_size / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
