"""The ``graphopt`` command line.

Every user mistake (missing file, not an ONNX model, unknown target or pass)
is a :class:`GraphoptError`: one line on stderr, non-zero exit, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import graphopt
from graphopt._errors import GraphoptError
from graphopt._evaluate import generate, load_inputs, static_kv_slots, verify
from graphopt._inputs import InputSpec, build_inputs
from graphopt._ir import Model, tensor_nbytes
from graphopt._plugins import get_registry

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _dump_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# ------------------------------------------------------------------ optimize
_QUANT_FLAGS = {"quant_bits": "quant_bits", "quant_block": "quant_block", "lm_quant_bits": "quant_lm_bits",
                "lm_quant_block": "quant_lm_block", "embed_quant_bits": "quant_embed_bits",
                "embed_quant_block": "quant_embed_block", "quant_method": "quant_method",
                "quant_scale_dtype": "quant_scale_dtype", "quant_min_elements": "quant_min_elements",
                "quant_include": "quant_include", "quant_exclude": "quant_exclude",
                "quant_calib_tokens": "quant_calib_tokens", "quant_gptq_order": "quant_gptq_order",
                "quant_format": "quant_format",
                "quant_accuracy_level": "quant_accuracy_level"}


def _optimize_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.fold_max_bytes is not None:
        options["fold_max_bytes"] = args.fold_max_bytes
    for flag, key in _QUANT_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            options[key] = value
    if args.quant_asym:
        options["quant_symmetric"] = False
    if args.quant_sequential:
        options["quant_sequential"] = True
    if any(k.startswith("quant_") for k in options) and "quant_bits" not in options:
        raise GraphoptError("quantization options need --quant-bits (4 or 8)")
    if "quant_accuracy_level" in options and options.get("quant_format") != "matmulnbits":
        raise GraphoptError("--quant-accuracy-level is an attribute of MatMulNBits: use it with --quant-format "
                            "matmulnbits (for the QDQ form onnxruntime reads the session option "
                            "session.qdq_matmulnbits_accuracy_level)")
    for item in args.option or []:
        if "=" not in item:
            raise GraphoptError(f"--option expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def cmd_optimize(args: argparse.Namespace) -> int:
    src = Path(args.model)
    dst = Path(args.output)
    model = graphopt.load(src)
    passes = _split(args.passes) if args.passes else None
    start = time.perf_counter()
    result = graphopt.optimize(model, target=args.target, passes=passes, disable=_split(args.disable_pass),
                               verify=args.verify, explain=args.explain, **_optimize_options(args))
    ext = {"auto": None, "yes": True, "no": False}[args.external_data]
    result.save(dst, external_data=ext)
    total = time.perf_counter() - start

    stats = result.history[len(model.history):]
    table = Table(title=f"graphopt optimize → {dst} (target {args.target})")
    for col in ("pass", "nodes", "time", "counters"):
        table.add_column(col, justify="right" if col in ("time",) else "left")
    for s in stats:
        counters = ", ".join(f"{k}={v}" for k, v in s.counters.items() if v) or "-"
        table.add_row(s.name, f"{s.nodes_before} → {s.nodes_after}", f"{s.seconds * 1000:.1f} ms", counters)
    table.caption = f"{model.node_count()} → {result.node_count()} nodes, {total:.2f} s in all"
    out.print(table)
    for s in stats:  # never a silent miss: one line per fusion pass that left candidates
        if s.counters.get("unfused"):
            left, done = s.counters["unfused"], s.counters.get("fused", 0)
            first = s.details["unfused"][0]
            print(f"warning: {s.name} left {left} of {left + done} candidates unfused; first: {first} "
                  "(--explain lists each)", file=sys.stderr)
    split_back = [sb for s in stats if isinstance(s, graphopt.LegalizeStats) for sb in s.split_back]
    for sb in split_back:
        out.print(sb.line(), markup=False)
    if args.explain:
        for note in result_notes(result):
            out.print(note)
    quality = _quality(args, model, result, stats)
    if args.report:
        report = {
            "input": str(src), "output": str(dst), "target": args.target,
            "nodes_before": model.node_count(), "nodes_after": result.node_count(),
            "ops_before": dict(model.op_histogram()), "ops_after": dict(result.op_histogram()),
            "seconds": total, "passes": [s.to_dict() for s in stats],
            "split_back": [{**dataclasses.asdict(sb), "line": sb.line()} for sb in split_back],
            "quality": quality,
        }
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _quality(args: argparse.Namespace, original: Model, result: Model, stats: list) -> dict[str, Any] | None:
    """What quantization cost: per-weight error, and the optimized model against the
    original on the same generated inputs (cpu backend for both)."""
    quant = next((s for s in stats if s.name == "quantize" and s.details.get("weights")), None)
    if quant is None:
        return None
    weights = quant.details["weights"]
    table = Table(title=f"quantization: {len(weights)} weights (worst first)")
    for col in ("weight", "role", "shape", "bits/block", "rel RMS error", "SQNR"):
        table.add_column(col, justify="right" if col in ("rel RMS error", "SQNR") else "left")
    for w in sorted(weights, key=lambda w: -w["rel_rms_error"])[:12]:
        table.add_row(w["name"], w["role"], "×".join(map(str, w["shape"])), f"{w['bits']}/{w['block']}",
                      f"{w['rel_rms_error']:.4f}", f"{w['sqnr_db']:.1f} dB")
    before = sum(w["bytes_before"] for w in weights)
    after = sum(w["bytes_after"] for w in weights)
    table.caption = f"quantized weights: {before / 2**20:.2f} MiB → {after / 2**20:.2f} MiB"
    out.print(table)
    quality: dict[str, Any] = {"weights": weights, "bytes_before": before, "bytes_after": after}
    if args.no_quality:
        return quality
    from graphopt._evaluate import compare
    from graphopt._inputs import InputSpec, has_kv_cache

    feeds = build_inputs(original, InputSpec(seq=1 if has_kv_cache(original) else 8, past=7))
    ref = graphopt.compile(original, "cpu").run(feeds)
    got = graphopt.compile(result, "cpu").run(feeds)
    diffs = [compare(n, got[n], ref[n], 0.0, 0.0) for n in ref if n in got]
    end = Table(title="end to end: optimized vs original (cpu backend, same generated inputs)")
    for col in ("output", "max abs", "cosine", "top-1 agreement"):
        end.add_column(col)
    for d in diffs:
        end.add_row(d.name, f"{d.max_abs:.4g}", f"{d.cosine:.6f}", "-" if d.top1 is None else f"{d.top1:.3f}")
    out.print(end)
    quality["end_to_end"] = [{"name": d.name, "max_abs": d.max_abs, "cosine": d.cosine, "top1": d.top1}
                             for d in diffs]
    return quality


def result_notes(model: Model) -> list[str]:
    return list(model.notes)


# ---------------------------------------------------------- passes/backends
def cmd_passes(args: argparse.Namespace) -> int:
    reg = get_registry()
    rows = [{"name": n, "summary": getattr(r.obj, "summary", ""), "plugin": r.plugin,
             "default": bool(getattr(r.obj, "default", True)),
             "after": list(getattr(r.obj, "after", ())), "before": list(getattr(r.obj, "before", ()))}
            for n, r in reg.passes.items()]
    if args.json:
        _dump_json(rows)
        return 0
    table = Table(title="graphopt passes")
    for col in ("name", "summary", "plugin", "default"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["summary"], r["plugin"], "yes" if r["default"] else "no")
    out.print(table)
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    reg = get_registry()
    rows = []
    for name, r in reg.backends.items():
        d = r.obj().describe()
        d["plugin"] = r.plugin
        rows.append(d)
    if args.json:
        _dump_json(rows)
        return 0
    table = Table(title="graphopt backends")
    for col in ("name", "device", "executes", "available", "plugin", "declared ops"):
        table.add_column(col)
    for d in rows:
        ops = sorted({(o["domain"] + "::" if o["domain"] else "") + o["op_type"] for o in d["ops"]})
        shown = ", ".join(ops[:12]) + (f", … (+{len(ops) - 12})" if len(ops) > 12 else "")
        table.add_row(d["name"], d["device"], "yes" if d["executes"] else "no",
                      "yes" if d["available"] else escape(f"no: {d['unavailable_reason']}"), d["plugin"],
                      f"{len(ops)}: {shown}")
    out.print(table)
    return 0


# ------------------------------------------------------------------- inspect
def _dims(shape) -> list:
    return [d if isinstance(d, (int, str)) else None for d in shape] if shape is not None else None


def describe_model(model: Model, path: Path) -> dict[str, Any]:
    params = nbytes = 0
    for t in model.constants().values():
        v = t._values
        shape = tuple(getattr(v, "shape", np.shape(v)))
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        params += numel
        nbytes += tensor_nbytes(v.tensor) if hasattr(v, "tensor") else int(np.asarray(v).nbytes)
    io = lambda ts: [{"name": t.name, "dtype": str(np.dtype(t.dtype)) if t.dtype is not None and  # noqa: E731
                      not isinstance(t.dtype, int) else str(t.dtype), "shape": _dims(t.shape)} for t in ts]
    return {
        "path": str(path), "ir_version": model.ir_version, "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opsets": dict(sorted(model.opset_imports.items())), "external_data": model.source_external_data,
        "inputs": io(model.graph.inputs), "outputs": io(model.graph.outputs),
        "nodes": model.node_count(), "ops": dict(model.op_histogram().most_common()),
        "parameters": params, "parameter_bytes": nbytes,
        "initializers": sum(isinstance(t, gs.Constant) for t in model.graph.tensors().values()),
    }


def _opsets(opsets: dict[str, int]) -> str:
    return ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in opsets.items())


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.model)
    info = describe_model(graphopt.load(path), path)
    if args.json:
        _dump_json(info)
        return 0
    out.print(f"[bold]{path}[/]  IR {info['ir_version']}  producer {info['producer'] or '-'}  "
              f"opsets {_opsets(info['opsets'])}")
    out.print(f"{info['nodes']} nodes, {info['initializers']} initializers, {info['parameters']:,} parameters "
              f"({info['parameter_bytes'] / 2**20:.2f} MiB){', external data' if info['external_data'] else ''}")
    io = Table(title="inputs / outputs")
    for col in ("kind", "name", "dtype", "shape"):
        io.add_column(col)
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            io.add_row(kind[:-1], t["name"], t["dtype"], str(t["shape"]))
    out.print(io)
    ops = Table(title="op histogram")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in info["ops"].items():
        ops.add_row(op, str(n))
    out.print(ops)
    return 0



# ------------------------------------------------------------- run / verify
def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomic like every other output: write beside, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GraphoptError(f"cannot write {path}: {e.strerror or e}") from e


def cmd_run(args: argparse.Namespace) -> int:
    model = graphopt.load(args.model)
    feeds = load_inputs(args.inputs) if args.inputs else build_inputs(model, InputSpec(
        batch=args.batch, seq=args.seq, past=args.past))
    exe = graphopt.compile(model, args.target)
    outputs = exe.run({t.name: feeds[t.name] for t in model.graph.inputs if t.name in feeds} if args.inputs is None
                      else feeds)
    if args.output:
        _save_npz(Path(args.output), outputs)
    table = Table(title=f"graphopt run on {args.target}")
    for col in ("output", "shape", "dtype", "mean", "std"):
        table.add_column(col)
    for name, v in outputs.items():
        stats = (f"{float(np.mean(v)):.4g}", f"{float(np.std(v)):.4g}") if v.size and v.dtype.kind in "fiub" else ("-", "-")
        table.add_row(name, str(v.shape), str(v.dtype), *stats)
    out.print(table)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    inputs = load_inputs(args.inputs) if args.inputs else None
    report = verify(args.reference, args.candidate, args.target, inputs=inputs, atol=args.atol, rtol=args.rtol)
    if args.json:
        _dump_json(report.to_dict())
    else:
        table = Table(title=f"graphopt verify: {args.candidate} on {args.target} vs {args.reference} on onnxruntime")
        for col in ("output", "shape", "max abs", "max rel", "cosine", "top-1", "ok"):
            table.add_column(col)
        for o in report.outputs:
            table.add_row(o.name, str(o.shape), f"{o.max_abs:.3e}", f"{o.max_rel:.3e}", f"{o.cosine:.6f}",
                          "-" if o.top1 is None else f"{o.top1:.3f}", "yes" if o.ok else "[red]NO[/]")
        out.print(table)
    if not report.ok:
        bad = [o for o in report.outputs if not o.ok]
        err.print(f"graphopt verify: error: {len(bad)} output(s) beyond atol={args.atol:g} rtol={args.rtol:g}: "
                  + ", ".join(f"{o.name} (max abs {o.max_abs:.3e})" for o in bad), markup=False, soft_wrap=True)
        return 1
    return 0


def _prompt(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise GraphoptError(f"--prompt-ids expects comma-separated integers, got {text!r}") from None
    if not ids:
        raise GraphoptError("--prompt-ids is empty")
    return ids


def cmd_generate(args: argparse.Namespace) -> int:
    target = args.target
    if args.cuda_graphs:
        if target != "cuda":
            raise GraphoptError("--cuda-graphs needs --target cuda")
        from graphopt.backends.cuda import CudaBackend

        target = CudaBackend(graphs=True)
    static = args.static_kv
    if static is None and args.cuda_graphs:  # fixed shapes are what a graph replays
        static = static_kv_slots(len(_prompt(args.prompt_ids)), args.max_new_tokens)
    tokens = generate(args.model, _prompt(args.prompt_ids), args.max_new_tokens, target,
                      eos_token_id=args.eos_token_id, static_kv=static)
    if args.json:
        _dump_json({"prompt_ids": _prompt(args.prompt_ids), "tokens": tokens})
    else:
        sys.stdout.write(",".join(str(t) for t in tokens) + "\n")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from graphopt._bench import BenchConfig
    from graphopt._bench import run as run_bench
    from graphopt._inputs import has_kv_cache

    backend = graphopt.get_backend(args.target)  # unknown or unavailable target: fail before measuring anything
    reason = backend.available()
    if reason is not None:
        raise GraphoptError(f"target {backend.name!r} is unavailable here: {reason}")
    model = graphopt.load(args.model)
    cfg = BenchConfig(args.model, args.target, args.prefill, args.past, args.runs, args.warmup, args.batch, args.threads,
                      args.ort_accuracy_level, graphs=args.cuda_graphs)
    steps = 4 if has_kv_cache(model) else 2
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task(f"bench {args.target} vs {cfg.peer}", total=steps)
        summary = run_bench(cfg, progress=lambda: progress.advance(task))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    table = Table(title=f"graphopt bench {args.model}: {args.target} vs {cfg.peer} "
                        f"(prefill {args.prefill}, past {args.past}, batch {args.batch})")
    for col in ("engine", "phase", "median", "min", "max", "tokens/s", "peak RSS", "vs ort", "of BW bound"):
        table.add_column(col, justify="right" if col not in ("engine", "phase") else "left")
    ratios = summary["ratios"]
    for r in summary["results"]:
        ratio = ratios.get(r["phase"], {}).get("latency_vs_onnxruntime") if r["engine"] != cfg.peer else None
        frac = r.get("fraction_of_bandwidth_bound")
        table.add_row(r["engine"], r["phase"], f"{r['median_s'] * 1e3:.2f} ms", f"{r['min_s'] * 1e3:.2f} ms",
                      f"{r['max_s'] * 1e3:.2f} ms", f"{r['tokens_per_s']:.1f}", f"{r['peak_rss'] / 2**20:.0f} MiB",
                      "-" if ratio is None else f"{ratio:.2f}×", "-" if frac is None else f"{frac:.0%}")
    table.caption = (f"weights {summary['weight_bytes'] / 2**20:.1f} MiB; {summary['bandwidth_of']} read "
                     f"{summary['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s → decode bound "
                     f"{summary['decode_bound_tokens_per_s']:.1f} tokens/s; 'vs ort' = latency ratio (lower is better)")
    out.print(table)
    return 0

# ---------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphopt", description="Graph-optimization compiler for ONNX models.")
    p.add_argument("--version", action="version", version=f"graphopt {graphopt.__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    o = sub.add_parser("optimize", help="run the pass pipeline and write the optimized model",
                       description="Run the pass pipeline for a target and write the optimized model.")
    o.add_argument("model", help="input .onnx file (never modified)")
    o.add_argument("-o", "--output", required=True, help="output .onnx file (written atomically)")
    o.add_argument("--target", default="cpu", help="backend to optimize for (see `graphopt backends`)")
    o.add_argument("--passes", action="append", help="comma-separated passes to run instead of the defaults")
    o.add_argument("--disable-pass", action="append", metavar="NAME", help="skip a pass (repeatable, commas ok)")
    o.add_argument("--report", metavar="REPORT.json", help="write the per-pass report as JSON")
    o.add_argument("--verify", action="store_true", help="verify the graph after every pass")
    o.add_argument("--explain", action="store_true", help="print why candidates were not rewritten")
    o.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto",
                   help="store weights in OUT.onnx.data (auto: if the input did or the model is over 2 GiB)")
    o.add_argument("--fold-max-bytes", type=int, metavar="N", help="largest tensor constant folding may create")
    o.add_argument("--option", action="append", metavar="KEY=VALUE", help="extra pass option (JSON value)")
    q = o.add_argument_group("quantization (weight-only, block-wise; see `graphopt passes`)")
    q.add_argument("--quant-bits", type=int, choices=(4, 8), help="bits of the linear layers' weights")
    q.add_argument("--quant-block", type=int, metavar="N", help="block size along the reduction axis (default 32)")
    q.add_argument("--lm-quant-bits", type=int, choices=(4, 8), help="bits of the LM head (default 8)")
    q.add_argument("--lm-quant-block", type=int, metavar="N", help="block size of the LM head")
    q.add_argument("--embed-quant-bits", type=int, choices=(4, 8), help="bits of the embedding table (default: float)")
    q.add_argument("--embed-quant-block", type=int, metavar="N", help="block size of the embedding table")
    q.add_argument("--quant-asym", action="store_true", help="asymmetric (zero points, UINT4/UINT8)")
    q.add_argument("--quant-method", choices=("rtn", "search", "activation", "gptq"),
                   help="rtn: round to nearest (default); search: error-minimising block scales; "
                        "activation: search weighted by activations from sample inputs; "
                        "gptq: minimise each MatMul's output error on calibration activations")
    q.add_argument("--quant-sequential", action="store_true",
                   help="gptq: quantize the MatMuls in graph order, each on the inputs the model quantized so "
                        "far computes, towards the float model's outputs (compensates earlier layers' error; "
                        "two truncated model runs per MatMul input: slower)")
    q.add_argument("--quant-gptq-order", choices=("auto", "natural", "act"),
                   help="gptq: row order. natural: in order, each block's scale chosen as it starts; act: "
                        "largest activations first, block scales chosen up front (GPTQ's desc_act); auto "
                        "(default): both, keeping the smaller output error per weight (twice the gptq time)")
    q.add_argument("--quant-calib-tokens", type=int, metavar="N",
                   help="gptq: activation rows of generated calibration inputs (default 16384)")
    q.add_argument("--quant-scale-dtype", choices=("float32", "float16"), help="dtype of the scales")
    q.add_argument("--quant-format", choices=("qdq", "matmulnbits"),
                   help="qdq: standard DequantizeLinear (default); matmulnbits: onnxruntime's com.microsoft "
                        "MatMulNBits for the MatMuls (what onnxruntime-gpu's CUDA provider runs at 4 bits)")
    q.add_argument("--quant-accuracy-level", type=int, choices=(0, 1, 2, 3, 4),
                   help="matmulnbits: the nodes' accuracy_level (0: float activations, the reference; 4: int8 "
                        "activations, ~3x faster on CPU at 4 bits with a small extra error; default: unset = 0)")
    q.add_argument("--quant-include", action="append", metavar="PATTERN", help="only weights matching (fnmatch)")
    q.add_argument("--quant-exclude", action="append", metavar="PATTERN", help="skip weights matching (fnmatch)")
    q.add_argument("--quant-min-elements", type=int, metavar="N", help="skip smaller weights (default 1024)")
    q.add_argument("--no-quality", action="store_true", help="skip the end-to-end quality check after quantizing")
    o.set_defaults(func=cmd_optimize)

    s = sub.add_parser("passes", help="list registered passes", description="List registered passes.")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_passes)

    b = sub.add_parser("backends", help="list backends and the ops they declare",
                       description="List backends and the ops each declares it supports.")
    b.add_argument("--json", action="store_true", help="machine-readable output (full op tables)")
    b.set_defaults(func=cmd_backends)

    i = sub.add_parser("inspect", help="summarise a model", description="Opsets, I/O, op histogram, parameters.")
    i.add_argument("model", help=".onnx file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("run", help="run a model on a target", description="Run a model on a target backend.")
    r.add_argument("model", help=".onnx file")
    r.add_argument("--target", default="cpu", help="backend (see `graphopt backends`)")
    r.add_argument("--inputs", metavar="IN.npz", help="inputs by name (default: valid generated inputs)")
    r.add_argument("-o", "--output", metavar="OUT.npz", help="write outputs by name")
    r.add_argument("--batch", type=int, default=1, help="generated inputs: batch size")
    r.add_argument("--seq", type=int, default=8, help="generated inputs: new tokens")
    r.add_argument("--past", type=int, default=0, help="generated inputs: KV-cache length")
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("verify", help="compare a candidate on a target with a reference on onnxruntime",
                       description="Run REFERENCE in onnxruntime and CANDIDATE on --target on the same inputs; "
                                   "print max abs/rel error, cosine similarity and top-1 agreement per output; "
                                   "exit 1 beyond tolerance.")
    v.add_argument("reference", help="reference .onnx (run in onnxruntime)")
    v.add_argument("candidate", help="candidate .onnx (run on --target)")
    v.add_argument("--target", default="cpu")
    v.add_argument("--inputs", metavar="IN.npz", help="inputs by name (default: valid generated inputs)")
    v.add_argument("--atol", type=float, default=1e-4)
    v.add_argument("--rtol", type=float, default=1e-4)
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=cmd_verify)

    g = sub.add_parser("generate", help="greedy decoding with the KV cache",
                       description="Greedy decoding for models with Hugging Face/optimum I/O names.")
    g.add_argument("model", help=".onnx file")
    g.add_argument("--target", default="cpu")
    g.add_argument("--prompt-ids", required=True, help="comma-separated token ids, e.g. 1,2,3")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--eos-token-id", type=int, help="stop after this token")
    g.add_argument("--static-kv", type=int, metavar="SLOTS",
                   help="decode with fixed-size KV buffers of SLOTS tokens (every step has the same shapes)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="cuda target: capture the fixed-shape decode step in a CUDA graph and replay it")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.set_defaults(func=cmd_generate)

    be = sub.add_parser("bench", help="prefill/decode latency of a target next to onnxruntime",
                        description="Prefill and decode-step latency, tokens/s and peak memory of a target and of "
                                    "onnxruntime on the same device (CPU execution provider; CUDA execution "
                                    "provider for --target cuda) on the same model in the same run, with their "
                                    "ratio and the memory-bandwidth bound of a decode step.")
    be.add_argument("model", help=".onnx file")
    be.add_argument("--target", default="cpu")
    be.add_argument("--prefill", type=int, default=32, help="prompt tokens of the prefill step")
    be.add_argument("--past", type=int, default=128, help="KV-cache length of the decode step")
    be.add_argument("--batch", type=int, default=1)
    be.add_argument("--runs", type=int, default=10)
    be.add_argument("--warmup", type=int, default=2)
    be.add_argument("--threads", type=int, help="threads for both engines (default: all cores)")
    be.add_argument("--ort-accuracy-level", type=int, choices=(0, 1, 2, 3, 4),
                    help="onnxruntime's compute for 4/8-bit weights: 0 = float activations (its reference mode, "
                         "slow), 4 = int8 activations (fast, ~1e-2 error); default: onnxruntime's own default")
    be.add_argument("--cuda-graphs", action="store_true",
                    help="cuda target: capture steps whose shapes repeat in CUDA graphs and replay them")
    be.add_argument("--json", metavar="OUT.json", help="write all figures as JSON")
    be.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        return args.func(args)
    except GraphoptError as e:
        err.print(f"graphopt {args.command}: error: {e}", markup=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("graphopt: interrupted", markup=False)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
