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
4. prints medians and the fused/unfused ratio per engine, and the decode step's floor: the bytes of
   weights a step streams ÷ the DRAM read bandwidth measured in the same run.

``--peer NAME=PATH`` adds another build of the same model to the onnxruntime rounds, e.g. the
hand-tuned graph of onnxruntime-genai's model builder (``make_llama.py --genai-peer DIR``). A peer
gets the unfused export's feeds by input name, and the decode logits of every build must match
the unfused export's within 1e-3 (max abs error printed), so a peer with other weights, or a
wrong fusion, stops the benchmark.
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
from graphopt._bench import measure_bandwidth, weight_bytes
from graphopt._inputs import InputSpec, build_inputs
from graphopt.backends.onnxruntime import OnnxRuntimeBackend

ROOT = Path(__file__).resolve().parents[1]
#: Decode logits of every timed build must match the unfused export's within this.
LOGITS_ATOL = 1e-3


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
    p.add_argument("--peer", action="append", default=[], metavar="NAME=PATH",
                   help="another build of the same model, timed in the onnxruntime rounds")
    p.add_argument("--logits-atol", type=float, default=LOGITS_ATOL,
                   help="how far a build's decode logits may be from MODEL's (raise it for a peer quantized by "
                        "another tool: same codes, other float order)")
    p.add_argument("--json", metavar="OUT.json")
    args = p.parse_args(argv)
    console = Console(width=max(Console().width, 132))
    path = Path(args.model)
    peers = dict(item.split("=", 1) for item in args.peer if "=" in item)
    for f in [path, *map(Path, peers.values())]:
        if not f.is_file():
            console.print(f"error: {f} not found; run benchmarks/make_llama.py first")
            return 2
    if len(peers) != len(args.peer):
        console.print("error: --peer takes NAME=PATH")
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
            # sessions take turns: idle threads must not spin, or each slows the others
            backend = OnnxRuntimeBackend(threads=args.threads, optimization="all", spinning=False) \
                if engine == "onnxruntime" \
                else graphopt.get_backend(engine)
            files = {"unfused": path, "fused": fused_path, **(peers if engine == "onnxruntime" else {})}
            loaded = {k: graphopt.load(f) for k, f in files.items()}
            exes = {k: graphopt.compile(m, backend) for k, m in loaded.items()}
            for phase, feeds in phases.items():
                feeds_of = {k: _feeds_for(m, feeds) for k, m in loaded.items()}
                if phase == "decode":
                    ref = exes["unfused"].run(feeds)["logits"]
                    errors = {k: float(abs(exe.run(feeds_of[k])["logits"] - ref).max()) for k, exe in exes.items()}
                    wrong = {k: e for k, e in errors.items() if not e <= args.logits_atol}
                    if wrong:
                        console.print(f"error: {engine}: logits differ from the unfused export's by "
                                      + ", ".join(f"{k} {e:.2e}" for k, e in wrong.items())
                                      + f" (> {args.logits_atol}): not the same model")
                        return 2
                for k, exe in exes.items():  # warm up
                    exe.run(feeds_of[k])
                times = {k: [] for k in exes}
                names = list(exes)
                for i in range(args.runs):
                    for k in names[i % len(names):] + names[:i % len(names)]:
                        times[k].append(_time(lambda: exes[k].run(feeds_of[k])))
                for k, v in times.items():
                    results.append({"engine": engine, "phase": phase, "model": k,
                                    "ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3,
                                    "vs_unfused": statistics.median(v) / statistics.median(times["unfused"]),
                                    "max_abs_logits_vs_unfused": errors[k] if phase == "decode" else None,
                                    "runs": args.runs})
    bandwidth = measure_bandwidth()
    streamed = weight_bytes(model)
    floor_ms = streamed / bandwidth * 1e3
    table = Table(title=f"fused vs unfused, interleaved, median of {args.runs} (threads {args.threads}, "
                        f"past {args.past}, prefill {args.prefill})")
    for col in ("engine", "phase", "model", "median", "min", "vs unfused", "decode floor / median",
                "logits vs unfused"):
        table.add_column(col, justify="right" if col not in ("engine", "phase", "model") else "left")
    for r in results:
        decode = r["phase"] == "decode"
        table.add_row(r["engine"], r["phase"], r["model"], f"{r['ms']:.2f} ms", f"{r['min_ms']:.2f} ms",
                      f"{r['vs_unfused']:.2f}×", f"{floor_ms / r['ms']:.0%}" if decode else "",
                      f"{r['max_abs_logits_vs_unfused']:.1e}" if decode else "")
    table.caption = (f"decode floor {floor_ms:.2f} ms = {streamed / 2**20:.0f} MiB of weights per step "
                     f"÷ {bandwidth / 1e9:.1f} GB/s DRAM read bandwidth measured in this run")
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": str(path), "nodes": [model.node_count(), fused.node_count()], "optimize_seconds": total,
            "passes": [s.to_dict() for s in fused.history], "bandwidth_bytes_per_s": bandwidth,
            "decode_floor_ms": floor_ms, "results": results}, indent=2, default=str) + "\n")
    return 0


def _feeds_for(model, feeds: dict) -> dict:
    """The unfused export's feeds, by input name, for a build of the same model."""
    names = [t.name for t in model.graph.inputs]
    missing = [n for n in names if n not in feeds]
    if missing:
        sys.exit(f"error: a peer's inputs {missing} are not inputs of the unfused export")
    return {n: feeds[n] for n in names}


if __name__ == "__main__":
    sys.exit(main())
