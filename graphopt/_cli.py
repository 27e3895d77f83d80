"""The ``graphopt`` command line.

Every user mistake (missing file, not an ONNX model, unknown target or pass)
is a :class:`GraphoptError`: one line on stderr, non-zero exit, no traceback.
"""

from __future__ import annotations

import argparse
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
from rich.table import Table

import graphopt
from graphopt._errors import GraphoptError
from graphopt._ir import Model, tensor_nbytes
from graphopt._plugins import get_registry

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _dump_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# ------------------------------------------------------------------ optimize
def _optimize_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.fold_max_bytes is not None:
        options["fold_max_bytes"] = args.fold_max_bytes
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
    if args.explain:
        for note in result_notes(result):
            out.print(note)
    if args.report:
        report = {
            "input": str(src), "output": str(dst), "target": args.target,
            "nodes_before": model.node_count(), "nodes_after": result.node_count(),
            "ops_before": dict(model.op_histogram()), "ops_after": dict(result.op_histogram()),
            "seconds": total, "passes": [s.to_dict() for s in stats],
        }
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    return 0


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
                      "yes" if d["available"] else f"no: {d['unavailable_reason']}", d["plugin"],
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
