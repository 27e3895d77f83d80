"""Fused vs unfused: decode-step and prefill latency of one model, interleaved in one run.

    python benchmarks/bench_fusion.py [MODEL.onnx] [--runs 30] [--threads 2] [--json OUT.json]

MODEL defaults to ``benchmarks/work/llama-150m-decode.onnx`` (``benchmarks/make_llama.py``
exports it: ~150 M parameters, hidden 1024, 8 layers, 16/4 heads, vocab 32000). The script

1. optimizes it with graphopt's default pipeline for the cpu target and prints each pass's
   time (the pass timing figure),
2. opens the unfused export and the fused model in onnxruntime CPU (``--threads``,
   ORT_ENABLE_ALL) and on graphopt's cpu backend,
3. times a decode step (``--past`` cached tokens, 1 new) and a prefill (``--prefill``
   tokens), alternating unfused/fused call by call so both see the same machine state,
4. prints medians and the fused/unfused ratio per engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import graphopt
from graphopt._inputs import InputSpec, build_inputs
from graphopt.backends.onnxruntime import OnnxRuntimeBackend

ROOT = Path(__file__).resolve().parents[1]


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=str(ROOT / "benchmarks" / "work" / "llama-150m-decode.onnx"))
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--past", type=int, default=128)
    p.add_argument("--prefill", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default="onnxruntime,cpu")
    p.add_argument("--json", metavar="OUT.json")
    args = p.parse_args(argv)
    console = Console()
    path = Path(args.model)
    if not path.is_file():
        console.print(f"error: {path} not found; run benchmarks/make_llama.py first")
        return 2

    model = graphopt.load(path)
    start = time.perf_counter()
    fused = graphopt.optimize(model, target="cpu")
    total = time.perf_counter() - start
    passes = Table(title=f"graphopt optimize {path.name}: {model.node_count()} → {fused.node_count()} nodes, "
                         f"{total:.2f} s")
    for col in ("pass", "nodes", "ms", "counters"):
        passes.add_column(col)
    for s in fused.history:
        passes.add_row(s.name, f"{s.nodes_before} → {s.nodes_after}", f"{s.seconds * 1e3:.1f}",
                       ", ".join(f"{k}={v}" for k, v in s.counters.items() if v))
    console.print(passes)

    with tempfile.TemporaryDirectory() as tmp:
        fused_path = Path(tmp) / "fused.onnx"
        fused.save(fused_path)
        phases = {"decode": build_inputs(model, InputSpec(batch=1, seq=1, past=args.past, left_pad=0)),
                  "prefill": build_inputs(model, InputSpec(batch=1, seq=args.prefill, past=0, left_pad=0))}
        results = []
        for engine in args.engines.split(","):
            # two sessions take turns: idle threads must not spin, or each slows the other
            backend = OnnxRuntimeBackend(threads=args.threads, optimization="all", spinning=False) \
                if engine == "onnxruntime" \
                else graphopt.get_backend(engine)
            exes = {"unfused": graphopt.compile(graphopt.load(path), backend),
                    "fused": graphopt.compile(graphopt.load(fused_path), backend)}
            for phase, feeds in phases.items():
                times = {k: [] for k in exes}
                for exe in exes.values():  # warm up
                    exe.run(feeds)
                    exe.run(feeds)
                for i in range(args.runs):
                    order = list(exes) if i % 2 == 0 else list(exes)[::-1]
                    for k in order:
                        times[k].append(_time(lambda: exes[k].run(feeds)))
                med = {k: statistics.median(v) for k, v in times.items()}
                results.append({"engine": engine, "phase": phase, "unfused_ms": med["unfused"] * 1e3,
                                "fused_ms": med["fused"] * 1e3, "ratio": med["fused"] / med["unfused"],
                                "runs": args.runs})
    table = Table(title=f"fused vs unfused, interleaved, median of {args.runs} (threads {args.threads}, "
                        f"past {args.past}, prefill {args.prefill})")
    for col in ("engine", "phase", "unfused", "fused", "fused / unfused"):
        table.add_column(col, justify="right" if col not in ("engine", "phase") else "left")
    for r in results:
        table.add_row(r["engine"], r["phase"], f"{r['unfused_ms']:.2f} ms", f"{r['fused_ms']:.2f} ms",
                      f"{r['ratio']:.2f}×")
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": str(path), "nodes": [model.node_count(), fused.node_count()], "optimize_seconds": total,
            "passes": [s.to_dict() for s in fused.history], "results": results}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
