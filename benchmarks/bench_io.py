#!/usr/bin/env python
"""I/O benchmark: graphopt vs. plain onnx on a > 2 GB model with external data.

Generates (once, cached in ``--workdir``) a Qwen2-0.5B-shaped decoder with random
fp32 weights stored as external data (~2.5 GB), then measures, each run in a
fresh subprocess so peak RSS is per task:

* graphopt: ``graphopt.load`` -> ``graphopt.optimize(target="cpu")`` (default
  cleanup pipeline) -> ``Model.save`` (external data);
* onnx: ``onnx.load`` (reads the external data into memory) ->
  ``onnx.save(..., save_as_external_data=True, all_tensors_to_one_file=True)``.

graphopt's save is durable (it fsyncs both files before renaming them into
place); ``onnx.save`` is not, so by default the onnx run fsyncs its two output
files after ``onnx.save`` and counts that in its save time (``--no-onnx-fsync``
leaves it out; the JSON has both figures). One untimed warm-up of each tool
runs first, so every timed run reads the source from the page cache.

Usage::

    python benchmarks/bench_io.py                      # full size, --repeat 3
    python benchmarks/bench_io.py --json bench_io.json --keep
    python benchmarks/bench_io.py --layers 2 --vocab 4096   # smoke test (< 2 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL_NAME = "model.onnx"
DATA_NAME = MODEL_NAME + ".data"
STAMP_NAME = "model.json"
MIN_BYTES = 2 * 10**9  # "at least 2 GB"
GB = 1e9


@dataclass(frozen=True)
class Config:
    """Qwen2-0.5B shapes (untied LM head)."""

    hidden: int = 896
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    head_dim: int = 64
    intermediate: int = 4864
    vocab: int = 151936
    seed: int = 0
    opset: int = 18

    def weight_bytes(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * self.intermediate + 2 * h
        return 4 * (self.layers * per_layer + 2 * self.vocab * h + h)

    @property
    def full_size(self) -> bool:
        return self == Config(seed=self.seed, opset=self.opset)


class BenchError(Exception):
    """A one-line, user-facing error."""


# --------------------------------------------------------------------------- model generation
def build_model(cfg: Config):
    """The decoder as a ModelProto whose initializers hold their bytes (raw_data).

    Weights are drawn tensor by tensor straight into the final ModelProto (helper.make_graph
    and make_model copy their arguments, which would hold the weights three times), so peak
    memory is the model plus about one tensor.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(cfg.seed)
    inits: list = []
    nodes: list = []

    weights: list[tuple[str, tuple[int, ...]]] = []  # drawn after the graph is built, see below

    def weight(name: str, shape: tuple[int, ...]) -> str:
        weights.append((name, shape))
        return name

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    counter = [0]

    def node(op: str, inputs: list[str], prefix: str, **attrs) -> str:
        counter[0] += 1
        out = f"{prefix}/{op.lower()}_{counter[0]}"
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    h, hd, nq, nkv = cfg.hidden, cfg.head_dim, cfg.heads, cfg.kv_heads
    groups = nq // nkv
    # Shared small constants.
    two = const("const/two", np.array(2.0, np.float32))
    eps = const("const/eps", np.array(1e-6, np.float32))
    eps_dup = const("const/eps_copy", np.array(1e-6, np.float32))  # duplicated initializer (dedupe target)
    axes = const("const/axes_last", np.array([-1], np.int64))
    q_shape = const("const/q_shape", np.array([0, 0, nkv, groups, hd], np.int64))
    kv_shape = const("const/kv_shape", np.array([0, 0, nkv, 1, hd], np.int64))
    merge_shape = const("const/merge_shape", np.array([0, 0, h], np.int64))
    # Foldable Constant-node expression: attention scale = 1 / sqrt(head_dim).
    nodes.append(helper.make_node("Constant", [], ["const/head_dim"], name="const/head_dim",
                                  value=numpy_helper.from_array(np.array(float(hd), np.float32))))
    sqrt_hd = node("Sqrt", ["const/head_dim"], "const")
    scale = node("Reciprocal", [sqrt_hd], "const")

    def rms_norm(x: str, w: str, prefix: str, eps_name: str) -> str:
        p = node("Pow", [x, two], prefix)
        m = node("ReduceMean", [p, axes], prefix, keepdims=1)
        a = node("Add", [m, eps_name], prefix)
        s = node("Sqrt", [a], prefix)
        d = node("Div", [x, s], prefix)
        return node("Mul", [d, w], prefix)

    x = node("Gather", [weight("model.embed_tokens.weight", (cfg.vocab, h)), "input_ids"], "embed", axis=0)
    for i in range(cfg.layers):
        L = f"layers.{i}"
        pre = f"model.layers.{i}"
        # Self-attention block.
        hn = rms_norm(x, weight(f"{pre}.input_layernorm.weight", (h,)), f"{L}/attn_norm",
                      eps_dup if i == cfg.layers // 2 else eps)
        q = node("Add", [node("MatMul", [hn, weight(f"{pre}.self_attn.q_proj.weight", (h, nq * hd))], f"{L}/q"),
                         weight(f"{pre}.self_attn.q_proj.bias", (nq * hd,))], f"{L}/q")
        k = node("Add", [node("MatMul", [hn, weight(f"{pre}.self_attn.k_proj.weight", (h, nkv * hd))], f"{L}/k"),
                         weight(f"{pre}.self_attn.k_proj.bias", (nkv * hd,))], f"{L}/k")
        v = node("Add", [node("MatMul", [hn, weight(f"{pre}.self_attn.v_proj.weight", (h, nkv * hd))], f"{L}/v"),
                         weight(f"{pre}.self_attn.v_proj.bias", (nkv * hd,))], f"{L}/v")
        # [B,S,H] -> q [B,kv,g,S,d], k^T [B,kv,1,d,S], v [B,kv,1,S,d]: grouped-query attention by broadcast.
        qh = node("Transpose", [node("Reshape", [q, q_shape], f"{L}/attn")], f"{L}/attn", perm=[0, 2, 3, 1, 4])
        kh = node("Transpose", [node("Reshape", [k, kv_shape], f"{L}/attn")], f"{L}/attn", perm=[0, 2, 3, 4, 1])
        vh = node("Transpose", [node("Reshape", [v, kv_shape], f"{L}/attn")], f"{L}/attn", perm=[0, 2, 3, 1, 4])
        scores = node("Mul", [node("MatMul", [qh, kh], f"{L}/attn"), scale], f"{L}/attn")
        probs = node("Softmax", [scores], f"{L}/attn", axis=-1)
        ctx = node("MatMul", [probs, vh], f"{L}/attn")
        ctx = node("Reshape", [node("Transpose", [ctx], f"{L}/attn", perm=[0, 3, 1, 2, 4]), merge_shape],
                   f"{L}/attn")
        o = node("MatMul", [ctx, weight(f"{pre}.self_attn.o_proj.weight", (nq * hd, h))], f"{L}/o")
        x = node("Add", [x, o], f"{L}/residual")
        x = node("Identity", [x], f"{L}/residual")  # cleanup target
        # MLP block.
        hn = rms_norm(x, weight(f"{pre}.post_attention_layernorm.weight", (h,)), f"{L}/mlp_norm", eps)
        gate = node("MatMul", [hn, weight(f"{pre}.mlp.gate_proj.weight", (h, cfg.intermediate))], f"{L}/mlp")
        act = node("Mul", [gate, node("Sigmoid", [gate], f"{L}/mlp")], f"{L}/mlp")
        up = node("MatMul", [hn, weight(f"{pre}.mlp.up_proj.weight", (h, cfg.intermediate))], f"{L}/mlp")
        down = node("MatMul", [node("Mul", [act, up], f"{L}/mlp"),
                               weight(f"{pre}.mlp.down_proj.weight", (cfg.intermediate, h))], f"{L}/mlp")
        x = node("Add", [x, down], f"{L}/residual")
    x = rms_norm(x, weight("model.norm.weight", (h,)), "final_norm", eps)
    nodes.append(helper.make_node("MatMul", [x, weight("lm_head.weight", (h, cfg.vocab))], ["logits"],
                                  name="lm_head/matmul"))
    graph = helper.make_graph(
        nodes, "qwen2_like_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", cfg.vocab])],
        inits,  # the small constants only
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", cfg.opset)],
                              producer_name="graphopt-bench-io")
    del graph
    for name, shape in weights:
        arr = rng.standard_normal(shape, dtype=np.float32)
        arr *= np.float32(0.02)
        t = model.graph.initializer.add()
        t.name = name
        t.data_type = TensorProto.FLOAT
        t.dims.extend(shape)
        t.raw_data = arr.tobytes()
        del arr
    return model


def model_is_cached(workdir: Path, cfg: Config) -> dict | None:
    stamp = workdir / STAMP_NAME
    if not (stamp.is_file() and (workdir / MODEL_NAME).is_file() and (workdir / DATA_NAME).is_file()):
        return None
    try:
        info = json.loads(stamp.read_text())
    except ValueError:
        return None
    if info.get("config") != asdict(cfg) or info.get("data_bytes") != (workdir / DATA_NAME).stat().st_size:
        return None
    return info


def generate(workdir: Path, cfg: Config, ort_check: bool, console) -> dict:
    import onnx

    for name in (STAMP_NAME, MODEL_NAME, DATA_NAME):  # onnx appends to an existing data file
        (workdir / name).unlink(missing_ok=True)
    console.print(f"generating model ({cfg.weight_bytes() / GB:.2f} GB of fp32 weights) in {workdir} ...")
    t0 = time.perf_counter()
    model = build_model(cfg)
    t1 = time.perf_counter()
    onnx.save(model, str(workdir / MODEL_NAME), save_as_external_data=True, all_tensors_to_one_file=True,
              location=DATA_NAME, size_threshold=1024)
    t2 = time.perf_counter()
    n_nodes = len(model.graph.node)
    del model
    onnx.checker.check_model(str(workdir / MODEL_NAME))
    info = {
        "config": asdict(cfg),
        "onnx_bytes": (workdir / MODEL_NAME).stat().st_size,
        "data_bytes": (workdir / DATA_NAME).stat().st_size,
        "nodes": n_nodes,
        "generate_s": round(t1 - t0, 2),
        "write_s": round(t2 - t1, 2),
        "generate_peak_rss": _peak_rss(),
        "checker": "ok",
    }
    if ort_check:
        console.print("running the model once in onnxruntime (1x8 tokens) ...")
        info["onnxruntime"] = run_child("ort", workdir / MODEL_NAME, None, timeout=900)
    (workdir / STAMP_NAME).write_text(json.dumps(info, indent=2))
    return info


# --------------------------------------------------------------------------- children (one task each)
def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def child_graphopt(src: Path, dst: Path) -> dict:
    import graphopt
    from graphopt import ExternalValues

    base_rss = _rss()
    t0 = time.perf_counter()
    m = graphopt.load(src)
    t1 = time.perf_counter()
    out = graphopt.optimize(m, target="cpu")
    t2 = time.perf_counter()
    out.save(dst)
    t3 = time.perf_counter()
    ext = [t._values for t in m.constants().values() if isinstance(t._values, ExternalValues)]
    return {
        "load_s": t1 - t0, "pipeline_s": t2 - t1, "save_s": t3 - t2, "total_s": t3 - t0,
        "peak_rss": _peak_rss(), "import_rss": base_rss,
        "nodes_in": m.node_count(), "nodes_out": out.node_count(),
        "external_weights": len(ext), "weights_materialised": sum(v.loads > 0 for v in ext),
        "passes": [s.to_dict() for s in out.history],
    }


def child_onnx(src: Path, dst: Path, fsync: bool) -> dict:
    import onnx

    base_rss = _rss()
    data = dst.with_name(dst.name + ".data")
    t0 = time.perf_counter()
    model = onnx.load(str(src))
    t1 = time.perf_counter()
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    t2 = time.perf_counter()
    if fsync:
        _fsync(data)
        _fsync(dst)
    t3 = time.perf_counter()
    return {
        "load_s": t1 - t0, "save_s": t3 - t1, "save_only_s": t2 - t1, "fsync_s": t3 - t2,
        "total_s": t3 - t0, "peak_rss": _peak_rss(), "import_rss": base_rss,
        "nodes_in": len(model.graph.node),
    }


def child_ort(src: Path, other: Path | None) -> dict:
    """Run ``src`` (and ``other``, if given, to compare logits) once on a 1x8 token input."""
    import numpy as np
    import onnxruntime as ort

    ids = np.random.default_rng(1).integers(0, 1000, size=(1, 8), dtype=np.int64)
    res: dict = {}
    outs = []
    for path in [src] + ([other] if other else []):
        t0 = time.perf_counter()
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        t1 = time.perf_counter()
        (logits,) = sess.run(["logits"], {"input_ids": ids})
        t2 = time.perf_counter()
        del sess
        outs.append(logits)
        res.setdefault("runs", []).append({"session_s": round(t1 - t0, 2), "run_s": round(t2 - t1, 3)})
    res["logits_shape"] = list(outs[0].shape)
    res["finite"] = bool(np.isfinite(outs[0]).all())
    if other:
        res["max_abs_diff"] = float(np.abs(outs[0] - outs[1]).max())
    res["peak_rss"] = _peak_rss()
    return res


def run_child(task: str, src: Path, dst: Path | None, *, fsync: bool = True, other: Path | None = None,
              timeout: float = 1800) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", task, "--_src", str(src)]
    if dst is not None:
        cmd += ["--_dst", str(dst)]
    if other is not None:
        cmd += ["--_other", str(other)]
    if not fsync:
        cmd.append("--no-onnx-fsync")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise BenchError(f"{task} run failed (exit {proc.returncode}): {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def remove_outputs(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)


# --------------------------------------------------------------------------- verification
def verify_output(out: Path) -> dict:
    import onnx

    proto = onnx.load(str(out), load_external_data=False)
    onnx.checker.check_model(str(out))
    data = out.with_name(out.name + ".data")
    size = data.stat().st_size if data.is_file() else 0
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    res = {"nodes": len(proto.graph.node), "initializers": len(proto.graph.initializer),
           "external_locations": sorted(locations), "data_bytes": size, "checker": "ok",
           "data_ge_2gb": size >= MIN_BYTES}
    return res


# --------------------------------------------------------------------------- report
def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarise(runs: list[dict], keys: list[str]) -> dict:
    return {k: median(runs, k) for k in keys if all(k in r for r in runs)}


def print_report(console, info: dict, med: dict, go_runs: list[dict], verification: dict, args) -> None:
    from rich.table import Table

    size_gb = info["data_bytes"] / GB
    go, ox = med["graphopt"], med["onnx"]
    t = Table(title=f"graphopt vs onnx: load -> (optimize) -> save, median of {args.repeat} "
                    f"(fresh process each, page cache warm)")
    for col in ("tool", "model GB", "nodes", "load s", "pipeline s", "save s", "total s", "peak RSS GB"):
        t.add_column(col, justify="left" if col == "tool" else "right")
    nodes = f"{info['nodes']}"
    t.add_row("graphopt", f"{size_gb:.2f}", f"{nodes} -> {go_runs[0]['nodes_out']}", f"{go['load_s']:.2f}",
              f"{go['pipeline_s']:.2f}", f"{go['save_s']:.2f}", f"{go['total_s']:.2f}", f"{go['peak_rss'] / GB:.2f}")
    t.add_row("onnx" + ("" if args.onnx_fsync else " (no fsync)"), f"{size_gb:.2f}", nodes, f"{ox['load_s']:.2f}",
              "-", f"{ox['save_s']:.2f}", f"{ox['total_s']:.2f}", f"{ox['peak_rss'] / GB:.2f}")
    t.add_row("graphopt/onnx", "", "", f"{go['load_s'] / ox['load_s']:.2f}", "", f"{go['save_s'] / ox['save_s']:.2f}",
              f"[bold]{med['ratio_total_s']:.2f}[/]", f"[bold]{med['ratio_peak_rss']:.2f}[/]")
    console.print(t)

    p = Table(title="graphopt default pipeline (median seconds over runs; counters of run 1)")
    for col in ("pass", "nodes", "seconds", "counters"):
        p.add_column(col, justify="right" if col == "seconds" else "left")
    for i, s in enumerate(go_runs[0]["passes"]):
        secs = statistics.median(r["passes"][i]["seconds"] for r in go_runs)
        counters = ", ".join(f"{k}={v}" for k, v in s["counters"].items())
        p.add_row(s["name"], f"{s['nodes_before']} -> {s['nodes_after']}", f"{secs:.3f}", counters)
    console.print(p)

    notes = [
        f"model: {info['data_bytes']:,} bytes of external data ({size_gb:.2f} GB, {info['data_bytes'] / 2**30:.2f} GiB)"
        f" + {info['onnx_bytes']:,} B graph; {info['nodes']} nodes",
        "each figure: median of --repeat runs, each in a fresh subprocess (peak RSS = VmHWM of that process, "
        f"imports included: graphopt {go['import_rss'] / GB:.2f} GB, onnx {ox['import_rss'] / GB:.2f} GB after import)",
        "one untimed warm-up run of each tool came first, so every timed run read the source from the page cache",
        ("onnx save = onnx.save + fsync of both output files "
         f"(fsync {ox.get('fsync_s', 0):.2f} s of it), matching graphopt's durable save"
         if args.onnx_fsync else "onnx save = onnx.save only (no fsync); graphopt's save fsyncs both files"),
        f"graphopt materialised {go_runs[0]['weights_materialised']} of {go_runs[0]['external_weights']} "
        "external weights (0 = weights streamed, never mapped)",
        f"verified graphopt output: onnx.load(load_external_data=False) ok, checker ok, "
        f"{verification['nodes']} nodes, external data {verification['data_bytes']:,} bytes "
        f"({'>=' if verification['data_ge_2gb'] else '<'} 2 GB)",
    ]
    if "onnxruntime" in verification:
        o = verification["onnxruntime"]
        notes.append(f"onnxruntime 1x8: source vs graphopt output logits max |diff| = {o['max_abs_diff']:.3g}")
    for n in notes:
        console.print(f"  - {n}")


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark graphopt load -> optimize -> save against onnx load -> save on a generated "
                    "Qwen2-0.5B-shaped fp32 model (>= 2 GB, external data). Each run is a fresh subprocess.")
    ap.add_argument("--workdir", type=Path, default=HERE / "work",
                    help="where the model is generated (cached) and outputs are written (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per tool; the median is reported (default 3)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="write every figure as JSON to PATH")
    ap.add_argument("--keep", action="store_true", help="keep the output models (default: delete them)")
    ap.add_argument("--regenerate", action="store_true", help="regenerate the model even if cached")
    ap.add_argument("--no-ort", dest="ort", action="store_false",
                    help="skip the onnxruntime runs (source model at generation; source vs output comparison)")
    ap.add_argument("--no-onnx-fsync", dest="onnx_fsync", action="store_false",
                    help="do not fsync onnx.save's outputs (graphopt's save always fsyncs)")
    ap.add_argument("--layers", type=int, default=Config.layers, help="decoder layers (default 24; fewer: smoke test)")
    ap.add_argument("--vocab", type=int, default=Config.vocab, help="vocabulary (default 151936; smaller: smoke test)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_src", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_dst", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_other", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._child:
        if args._child == "graphopt":
            res = child_graphopt(args._src, args._dst)
        elif args._child == "onnx":
            res = child_onnx(args._src, args._dst, args.onnx_fsync)
        else:
            res = child_ort(args._src, args._other)
        print(json.dumps(res))
        return 0

    from rich.console import Console

    console = Console(width=max(Console().width, 132))  # tables stay readable when piped
    try:
        return bench(args, console)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)  # one line, never wrapped
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def bench(args: argparse.Namespace, console) -> int:
    cfg = Config(layers=args.layers, vocab=args.vocab)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    expected = cfg.weight_bytes()
    min_bytes = MIN_BYTES if cfg.full_size else 0
    if cfg.full_size and expected < MIN_BYTES:
        raise BenchError(f"configuration gives {expected / GB:.2f} GB, expected >= 2 GB")

    info = None if args.regenerate else model_is_cached(workdir, cfg)
    # The model (if not cached) plus two outputs (one per tool; both stay with --keep).
    need = (0 if info else expected) + 2 * expected + 256 * 2**20
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise BenchError(f"not enough disk space in {workdir}: {free / GB:.1f} GB free, "
                         f"{need / GB:.1f} GB needed (about 3x the {expected / GB:.1f} GB model); use --workdir")
    if info is None:
        info = generate(workdir, cfg, args.ort, console)
    else:
        console.print(f"using cached model {workdir / MODEL_NAME}")
    size = info["data_bytes"]
    if "generate_peak_rss" in info:
        console.print(f"generation: {info['generate_s']} s drawing weights, {info['write_s']} s writing, "
                      f"peak RSS {info['generate_peak_rss'] / GB:.2f} GB")
    console.print(f"model: {size / GB:.3f} GB of external data ({size:,} bytes), {info['nodes']} nodes"
                  + ("" if size >= MIN_BYTES else "  [yellow](below 2 GB: smoke-test size)[/]"))
    if cfg.full_size and size < MIN_BYTES:
        raise BenchError(f"generated model is {size / GB:.2f} GB, expected >= 2 GB")
    if "onnxruntime" in info:
        o = info["onnxruntime"]
        console.print(f"onnxruntime (source, 1x8 tokens): logits {o['logits_shape']}, finite={o['finite']}, "
                      f"session {o['runs'][0]['session_s']} s, run {o['runs'][0]['run_s']} s")

    src = workdir / MODEL_NAME
    outs = {"graphopt": workdir / "out_graphopt.onnx", "onnx": workdir / "out_onnx.onnx"}
    for p in outs.values():
        remove_outputs(p)

    def once(tool: str) -> dict:
        remove_outputs(outs[tool])
        return run_child(tool, src, outs[tool], fsync=args.onnx_fsync)

    console.print("warm-up (untimed): graphopt, onnx ...")
    for tool in outs:
        once(tool)
    runs: dict[str, list[dict]] = {t: [] for t in outs}
    for i in range(args.repeat):
        for tool in outs:  # interleaved, so drift hits both alike
            r = once(tool)
            runs[tool].append(r)
            console.print(f"  run {i + 1}/{args.repeat} {tool:8s}: total {r['total_s']:.2f} s, "
                          f"peak RSS {r['peak_rss'] / GB:.2f} GB")

    go_keys = ["load_s", "pipeline_s", "save_s", "total_s", "peak_rss", "import_rss"]
    ox_keys = ["load_s", "save_s", "save_only_s", "fsync_s", "total_s", "peak_rss", "import_rss"]
    med = {"graphopt": summarise(runs["graphopt"], go_keys), "onnx": summarise(runs["onnx"], ox_keys)}
    med["ratio_total_s"] = med["graphopt"]["total_s"] / med["onnx"]["total_s"]
    med["ratio_peak_rss"] = med["graphopt"]["peak_rss"] / med["onnx"]["peak_rss"]

    # The outputs of the last timed run are still on disk: verify graphopt's.
    verification = verify_output(outs["graphopt"])
    if min_bytes and not verification["data_ge_2gb"]:
        raise BenchError(f"graphopt output's external data is {verification['data_bytes'] / GB:.2f} GB, "
                         "expected >= 2 GB")
    if args.ort:
        console.print("comparing source and graphopt output in onnxruntime (1x8 tokens) ...")
        verification["onnxruntime"] = run_child("ort", src, None, other=outs["graphopt"])
    verification["onnx_output_data_bytes"] = outs["onnx"].with_name(outs["onnx"].name + ".data").stat().st_size

    print_report(console, info, med, runs["graphopt"], verification, args)

    if args.json:
        import graphopt
        import onnx

        report = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "model": {**info, "path": str(src)},
            "repeat": args.repeat, "onnx_fsync": args.onnx_fsync,
            "median": med, "runs": runs, "verification": verification,
            "environment": {"python": platform.python_version(), "graphopt": graphopt.__version__,
                            "onnx": onnx.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
                            "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        }
        args.json.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {args.json}")
    if not args.keep:
        for p in outs.values():
            remove_outputs(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
