#!/usr/bin/env python
"""Weight-only quantization benchmark: graphopt's ``quantize`` pass vs onnxruntime's
``MatMulNBitsQuantizer``.

Models (each first "prepared" once by graphopt's non-fusing cleanup passes, so both
quantizers see exactly the same fp32 graph, which is also the error reference):

* ``llama-tiny`` / ``qwen2-tiny``: ``tests/fixtures/{llama,qwen2}-dynamo-decode.onnx``
  (qwen2 has a tied LM head);
* ``llama-150m``: ``benchmarks/work/llama-150m-decode.onnx`` (made by ``make_llama.py``
  with ``/work/venv-torch`` or ``--torch-python`` if missing);
* ``qwen2-0.5b``: the Qwen2-0.5B-shaped decoder of ``bench_io.py`` (its generator is
  imported; 2.52 GB of fp32 weights in external data, no KV cache).

Settings: int4 block 32, int4 block 128, int8 block 128. Both tools quantize
symmetrically, the LM head at the same bits/block as the other MatMuls, and leave the
embedding table in fp32. Per model and setting:

1. quantization time (load -> quantize -> save, in a fresh subprocess each; median of
   ``--repeat`` runs for small models, ``--repeat-big`` for the 2.5 GB one) of graphopt
   ``rtn`` / ``search`` / ``activation`` and onnxruntime;
2. size on disk of every output;
3. logits error against the fp32 model in onnxruntime CPU (ORT_ENABLE_ALL,
   ``session.qdq_matmulnbits_accuracy_level=0``, i.e. float activations);
4. (llama-150m, int4 block 32) decode-step speed in onnxruntime (graphopt's QDQ output vs
   onnxruntime's MatMulNBits output, at accuracy level 0 and 4) and in graphopt's CPU
   backend (int4 vs fp32: ms/token, peak RSS).

onnxruntime's quantizer imports ``onnx_ir``; if this interpreter lacks it, pass
``--ort-python`` (an interpreter with onnxruntime and onnx_ir; it never imports graphopt).

    python benchmarks/bench_quant.py --quick                      # tiny fixtures, < 1 min
    python benchmarks/bench_quant.py --json benchmarks/work/bench_quant.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_io import _fsync, _peak_rss  # stdlib-only helpers of the sibling benchmark

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MB = 1e6
GB = 1e9

PREP_PASSES = ["shape-inference", "constant-folding", "tie-embedding-dedupe", "dead-code-elimination"]
QUANT_PASSES = ["shape-inference", "constant-folding", "tie-embedding-dedupe", "quantize", "dead-code-elimination"]
SETTINGS = [(4, 32), (4, 128), (8, 128)]
GO_METHODS = ["rtn", "search", "activation"]
ACC_KEY = "session.qdq_matmulnbits_accuracy_level"


# =========================================================================== helpers (no graphopt imports)
def disk_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def remove_model(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)


def _ort_session(path: str, threads: int, acc_level: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry(ACC_KEY, str(acc_level))
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _load_feeds(path: str) -> dict:
    import numpy as np

    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _weight_bytes(path: Path) -> dict:
    """Initializer bytes of an ONNX file (without reading external data): all, and those a
    decode step streams (everything except a table only a Gather reads)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(str(path), load_external_data=False)
    g = proto.graph
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def nbytes(t) -> int:
        if uses_external_data(t):
            return int({e.key: e.value for e in t.external_data}.get("length", 0))
        if t.raw_data:
            return len(t.raw_data)
        return onnx.numpy_helper.to_array(t).nbytes

    def gather_only(name: str) -> bool:
        us = users.get(name, [])
        while us and all(u.op_type == "DequantizeLinear" for u in us):
            us = [c for u in us for c in users.get(u.output[0], [])]
        return bool(us) and all(u.op_type in ("Gather", "GatherBlockQuantized") for u in us)

    total = streamed = 0
    for t in g.initializer:
        b = nbytes(t)
        total += b
        if not gather_only(t.name):
            streamed += b
    return {"initializer_bytes": total, "streamed_bytes": streamed}


# =========================================================================== children
def child_prep(p: dict) -> dict:
    import graphopt

    t0 = time.perf_counter()
    out = graphopt.optimize(graphopt.load(p["src"]), target="cpu", passes=PREP_PASSES)
    out.save(p["dst"])
    return {"seconds": time.perf_counter() - t0, "nodes": out.node_count(),
            "passes": [{"name": s.name, "counters": s.counters} for s in out.history]}


def child_feeds(p: dict) -> dict:
    import numpy as np

    import graphopt
    from graphopt._inputs import InputSpec, build_inputs, has_kv_cache

    m = graphopt.load(p["src"])
    kv = has_kv_cache(m)
    res = {"kv_cache": kv}
    for name, (b, s, past) in p["specs"].items():
        feeds = build_inputs(m, InputSpec(batch=b, seq=s, past=past, left_pad=0, seed=p.get("seed", 0)))
        np.savez(p["out"][name], **feeds)
        res[name] = {k: list(v.shape) for k, v in feeds.items() if not k.startswith("past_key_values")}
    return res


def child_go_quant(p: dict) -> dict:
    import graphopt
    from graphopt._plugins import get_registry

    get_registry()  # imports the pass and backend plugins, as onnxruntime's quantizer module is imported untimed
    t0 = time.perf_counter()
    m = graphopt.load(p["src"])
    t1 = time.perf_counter()
    method, sequential = ("gptq", True) if p["method"] == "gptq-seq" else (p["method"], False)
    out = graphopt.optimize(m, target="cpu", passes=QUANT_PASSES, quant_bits=p["bits"], quant_block=p["block"],
                            quant_lm_bits=p["bits"], quant_method=method, quant_symmetric=True,
                            quant_exclude=p.get("exclude") or None, quant_sequential=sequential)
    t2 = time.perf_counter()
    out.save(p["dst"])
    t3 = time.perf_counter()
    q = next(s for s in out.history if s.name == "quantize")
    weights = q.details.get("weights", [])
    return {"load_s": t1 - t0, "quantize_s": t2 - t1, "save_s": t3 - t2, "total_s": t3 - t0,
            "quantize_pass_s": q.seconds, "peak_rss": _peak_rss(), "counters": q.counters,
            "quantized": sorted(w["name"] for w in weights),
            "weights": [{k: w[k] for k in ("name", "role", "shape", "rel_rms_error", "sqnr_db")} for w in weights]}


def child_ort_quant(p: dict) -> dict:
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    dst = Path(p["dst"])
    t0 = time.perf_counter()
    model = onnx.load(p["src"])
    t1 = time.perf_counter()
    q = MatMulNBitsQuantizer(model, bits=p["bits"], block_size=p["block"], is_symmetric=True, accuracy_level=0)
    q.process()
    t2 = time.perf_counter()
    q.model.save_model_to_file(str(dst), p["external"])
    _fsync(dst)
    if p["external"]:
        _fsync(dst.with_name(dst.name + ".data"))
    t3 = time.perf_counter()
    nodes = [n for n in q.model.model.graph.node if n.op_type == "MatMulNBits"]
    quantized = sorted(n.input[1].rsplit("_Q", 1)[0] for n in nodes)
    return {"load_s": t1 - t0, "quantize_s": t2 - t1, "save_s": t3 - t2, "total_s": t3 - t0,
            "peak_rss": _peak_rss(), "matmulnbits": len(nodes), "quantized": quantized}


def child_ort_weight_error(p: dict) -> dict:
    """Relative RMS error of every weight onnxruntime quantized (its MatMulNBits dequantized here),
    the figure graphopt's quantize pass reports per weight."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    ref = onnx.load(p["ref"])  # fp32 weights
    fp = {t.name: t for t in ref.graph.initializer}
    q = onnx.load(p["model"])
    qi = {t.name: t for t in q.graph.initializer}
    out = {}
    for n in q.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        k, nn, bits, block = a["K"], a["N"], a["bits"], a["block_size"]
        packed = numpy_helper.to_array(qi[n.input[1]])  # [N, k_blocks, blob]
        scales = numpy_helper.to_array(qi[n.input[2]]).astype(np.float64).reshape(nn, -1)
        kb = scales.shape[1]
        if bits == 4:
            codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(nn, kb * block)
        else:
            codes = packed.reshape(nn, kb * block)
        zp = 2 ** (bits - 1)
        if len(n.input) > 3 and n.input[3]:
            raise ValueError("asymmetric MatMulNBits not expected")
        deq = (codes.astype(np.float64) - zp) * np.repeat(scales, block, axis=1)
        deq = deq[:, :k].T  # [K, N]
        name = n.input[1].rsplit("_Q", 1)[0]
        w = numpy_helper.to_array(fp[name]).astype(np.float64).reshape(k, nn)
        out[name] = float(np.sqrt(np.mean((w - deq) ** 2)) / np.sqrt(np.mean(w ** 2)))
    return {"rel_rms_error": out}


def child_set_acc(p: dict) -> dict:
    """Copy an onnxruntime-quantized model with ``accuracy_level`` set on every MatMulNBits."""
    import onnx

    m = onnx.load(p["src"])
    n = 0
    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            for a in list(node.attribute):
                if a.name == "accuracy_level":
                    node.attribute.remove(a)
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", int(p["level"])))
            n += 1
    onnx.save(m, p["dst"])
    return {"nodes": n}


def child_eval(p: dict) -> dict:
    """Logits of the reference and each candidate in onnxruntime CPU; error metrics."""
    import numpy as np

    feeds = _load_feeds(p["feeds"])
    threads = p["threads"]

    def logits(path: str) -> tuple[np.ndarray, dict]:
        t0 = time.perf_counter()
        sess = _ort_session(path, threads, p["acc_level"])
        t1 = time.perf_counter()
        names = [i.name for i in sess.get_inputs()]
        (out,) = sess.run(["logits"], {k: feeds[k] for k in names})
        info = {"session_s": time.perf_counter() - t0, "run_s": time.perf_counter() - t1}
        del sess
        return out.astype(np.float64), info

    ref_path = Path(p["ref_cache"])
    if ref_path.is_file():
        ref = np.load(ref_path)
    else:
        ref, _ = logits(p["ref"])
        np.save(ref_path, ref)
    r2 = ref.reshape(-1, ref.shape[-1])
    res = {"ref": {"positions": int(r2.shape[0]), "vocab": int(r2.shape[1]),
                   "mean_abs_logit": float(np.abs(r2).mean()), "max_abs_logit": float(np.abs(r2).max()),
                   "std_logit": float(r2.std())}}
    top_ref = r2.argmax(-1)
    for label, path in p["candidates"].items():
        out, info = logits(path)
        o2 = out.reshape(r2.shape)
        d = np.abs(o2 - r2)
        cos = (o2 * r2).sum(-1) / (np.linalg.norm(o2, axis=-1) * np.linalg.norm(r2, axis=-1) + 1e-30)
        res[label] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "cosine": float(cos.mean()),
                      "cosine_min": float(cos.min()), "top1": float((o2.argmax(-1) == top_ref).mean()), **info}
    res["peak_rss"] = _peak_rss()
    return res


def child_ort_decode(p: dict) -> dict:
    import numpy as np

    feeds = _load_feeds(p["feeds"])
    t0 = time.perf_counter()
    sess = _ort_session(p["model"], p["threads"], p["acc_level"])
    session_s = time.perf_counter() - t0
    feeds = {i.name: feeds[i.name] for i in sess.get_inputs()}
    outs = ["logits"]
    for _ in range(p["warmup"]):
        sess.run(outs, feeds)
    times = []
    for _ in range(p["runs"]):
        t = time.perf_counter()
        sess.run(outs, feeds)
        times.append(time.perf_counter() - t)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "session_s": session_s,
            "peak_rss": _peak_rss(), "logits_finite": bool(np.isfinite(sess.run(outs, feeds)[0]).all())}


def child_ort_fused_ops(p: dict) -> dict:
    """Op histogram of the graph onnxruntime actually runs (its optimized model)."""
    import collections

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry(ACC_KEY, str(p["acc_level"]))
    so.optimized_model_filepath = p["dst"]
    so.log_severity_level = 3
    ort.InferenceSession(p["model"], so, providers=["CPUExecutionProvider"])
    m = onnx.load(p["dst"], load_external_data=False)
    hist = collections.Counter(n.op_type for n in m.graph.node)
    acc = sorted({a.i for n in m.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                  if a.name == "accuracy_level"})
    return {"ops": {k: hist[k] for k in ("MatMulNBits", "DequantizeLinear", "MatMul") if k in hist},
            "accuracy_levels": acc}


def child_go_decode(p: dict) -> dict:
    import graphopt

    feeds = _load_feeds(p["feeds"])
    t0 = time.perf_counter()
    exe = graphopt.compile(graphopt.load(p["model"]), "cpu")
    compile_s = time.perf_counter() - t0
    for _ in range(p["warmup"]):
        exe.run(feeds)
    times = []
    for _ in range(p["runs"]):
        t = time.perf_counter()
        exe.run(feeds)
        times.append(time.perf_counter() - t)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "compile_s": compile_s,
            "peak_rss": _peak_rss()}


def child_profile(p: dict) -> dict:
    """cProfile of graphopt's quantize run (load -> optimize -> save): where the time goes."""
    import cProfile
    import io
    import pstats

    import graphopt
    from graphopt._plugins import get_registry

    get_registry()
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    m = graphopt.load(p["src"])
    out = graphopt.optimize(m, target="cpu", passes=QUANT_PASSES, quant_bits=p["bits"], quant_block=p["block"],
                            quant_lm_bits=p["bits"], quant_method=p["method"])
    t1 = time.perf_counter()
    out.save(p["dst"])
    pr.disable()
    t2 = time.perf_counter()
    stats = pstats.Stats(pr)
    cum: dict[str, float] = {}
    for (fname, line, func), v in stats.stats.items():
        key = f"{Path(fname).name}:{func}"
        cum[key] = max(cum.get(key, 0.0), v[3])
    watch = {  # the parts of the quantize pass and of the pipeline around it (cumulative seconds)
        "graphopt.load": "_ir.py:load", "optimize (all passes + legalize)": "_api.py:optimize",
        "quantize pass": "quantize.py:run",
        "  _compute (per weight; pool threads are not profiled)": "quantize.py:_compute",
        "    quantize_matrix (scales, round, clip, search, pack)": "_blockquant.py:quantize_matrix",
        "    gptq_matrix": "_gptq.py:gptq_matrix",
        "  _importance (activation statistics run)": "quantize.py:_importance",
        "  _calibrate (gptq calibration runs)": "quantize.py:_calibrate",
        "  ensure_opset (upgrade to 21)": "_opset.py:ensure_opset", "tie-embedding-dedupe": "tie_embedding.py:run",
        "Model.save": "_ir.py:save", "  to_onnx (export)": "_ir.py:to_onnx",
        "  _write_external (external data)": "_ir.py:_write_external",
        "  SerializeToString": "~:<method 'SerializeToString' of 'google._upb._message.Message' objects>",
        "  fsync": "~:<built-in method posix.fsync>"}
    breakdown = {label: round(cum[key], 3) for label, key in watch.items() if key in cum}
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(p.get("top", 20))
    return {"wall_profiled_s": t2 - t0, "optimize_s": t1 - t0, "save_s": t2 - t1,
            "passes": {st.name: round(st.seconds, 3) for st in out.history}, "breakdown": breakdown,
            "text": s.getvalue()}


CHILDREN = {"prep": child_prep, "feeds": child_feeds, "go_quant": child_go_quant, "ort_quant": child_ort_quant,
            "set_acc": child_set_acc, "ort_weight_error": child_ort_weight_error, "eval": child_eval, "ort_decode": child_ort_decode,
            "ort_fused_ops": child_ort_fused_ops, "go_decode": child_go_decode, "profile": child_profile}


class BenchError(Exception):
    pass


IDLE = {"threshold": 0.3, "max_wait": 30.0}


def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return sum(v), v[3] + v[4]  # all, idle + iowait


def cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds (nothing of this benchmark runs meanwhile)."""
    t0, i0 = _cpu_jiffies()
    time.sleep(interval)
    t1, i1 = _cpu_jiffies()
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def wait_idle() -> tuple[float, float]:
    """Before a timed run: wait (at most ``--idle-wait`` s) until other processes leave the CPUs mostly
    idle. Returns (busy fraction seen last, seconds waited)."""
    t0 = time.monotonic()
    while True:
        b = cpu_busy()
        if b <= IDLE["threshold"] or time.monotonic() - t0 >= IDLE["max_wait"]:
            return b, time.monotonic() - t0
        time.sleep(1.5)


def run_child(task: str, payload: dict, python: str | None = None, threads: int | None = None,
              timeout: float = 3600, timed: bool = False) -> dict:
    """Run one task in a fresh process. ``timed``: wait for idle CPUs first, and measure the CPU time
    *other* processes used while it ran (``other_cpu``: fraction of all CPUs over its wall time)."""
    import resource

    busy_before = waited = None
    if timed:
        busy_before, waited = wait_idle()
    env = dict(os.environ)
    if threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    cmd = [python or sys.executable, str(Path(__file__).resolve()), "--_child", task, json.dumps(payload)]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    j0, i0 = _cpu_jiffies()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    j1, i1 = _cpu_jiffies()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    hz = os.sysconf("SC_CLK_TCK")
    busy_s = ((j1 - j0) - (i1 - i0)) / hz
    own_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    other = max(0.0, busy_s - own_s) / (wall * (os.cpu_count() or 1))
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
        raise BenchError(f"{task} failed (exit {proc.returncode}): {lines[-1]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_s"] = wall
    res["other_cpu"] = other
    if timed:
        res["busy_before"], res["idle_waited_s"] = busy_before, waited
    return res


# =========================================================================== orchestration
class ModelSpec:
    def __init__(self, key: str, path: Path, note: str, big: bool = False, tiny: bool = False):
        self.key, self.path, self.note, self.big, self.tiny = key, path, note, big, tiny


def ensure_llama150m(path: Path, torch_python: str | None, console) -> None:
    if path.is_file():
        return
    py = torch_python or "/work/venv-torch/bin/python"
    console.print(f"{path} missing: generating it with {py} benchmarks/make_llama.py ...")
    subprocess.run([py, str(HERE / "make_llama.py"), "--out", str(path)], check=True)


def ensure_qwen05b(workdir: Path, console) -> Path:
    sys.path.insert(0, str(HERE))
    import bench_io  # reuse its generator and cache

    cfg = bench_io.Config()
    if bench_io.model_is_cached(workdir, cfg) is None:
        bench_io.generate(workdir, cfg, False, console)
    return workdir / bench_io.MODEL_NAME


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def source_state() -> dict:
    """The graphopt sources measured: git HEAD, and a hash of the quantize pass (concurrent edits show)."""
    import hashlib

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "passes", "graphopt", "backends"],
                           capture_output=True, text=True)
    qpath = ROOT / "passes" / "quantize.py"
    return {"git_head": head.stdout.strip() or None, "sources_modified": [ln[3:] for ln in dirty.stdout.splitlines()],
            "quantize_py_sha1": hashlib.sha1(qpath.read_bytes()).hexdigest()[:12] if qpath.is_file() else None}


def load_avg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()
    except OSError:
        return "?"


def bench_model(spec: ModelSpec, args, console, report: dict) -> None:
    wd = args.workdir / "quant" / spec.key
    wd.mkdir(parents=True, exist_ok=True)
    prep = wd / "fp32.onnx"
    external = spec.big
    console.rule(f"[bold]{spec.key}[/]: {spec.note}")
    r = run_child("prep", {"src": str(spec.path), "dst": str(prep)}, timeout=3600)
    m_rep = {"source": str(spec.path), "note": spec.note, "prep": r, "fp32_bytes": disk_bytes(prep),
             **_weight_bytes(prep), "settings": {}}
    console.print(f"prepared fp32 graph ({', '.join(PREP_PASSES)}): {r['nodes']} nodes, "
                  f"{disk_bytes(prep) / MB:.1f} MB, {r['seconds']:.1f} s")
    feeds = {"eval": wd / "feeds_eval.npz", "decode": wd / "feeds_decode.npz"}
    fr = run_child("feeds", {"src": str(prep), "specs": {"eval": list(args.eval_shape),
                                                        "decode": [1, 1, args.past]},
                             "out": {k: str(v) for k, v in feeds.items()}})
    m_rep["feeds"] = fr
    ref_cache = wd / "ref_logits.npy"
    ref_cache.unlink(missing_ok=True)
    repeat = args.repeat_big if spec.big else args.repeat
    timed = not spec.tiny  # wait for idle CPUs before each timed run (not worth it for the fixtures)
    wanted = dict.fromkeys(["rtn", "search", *args.methods])  # the report compares against rtn and search
    methods = [m for m in wanted if m != "activation" or not spec.big or not args.no_activation_big]
    report["models"][spec.key] = m_rep

    for bits, block in SETTINGS:
        skey = f"int{bits}-b{block}"
        s_rep: dict = {"bits": bits, "block": block, "tools": {}}
        m_rep["settings"][skey] = s_rep
        outs: dict[str, Path] = {}

        # onnxruntime first: its set of quantized weights decides whether graphopt needs a matched run.
        tools = [("ort", None)] + [(f"go-{m}", m) for m in methods]
        runs: dict[str, list[dict]] = {t: [] for t, _ in tools}
        for i in range(repeat):
            for tool, method in tools:  # interleaved so drift hits all alike
                dst = wd / f"{skey}-{tool}.onnx"
                remove_model(dst)
                if method is None:
                    res = run_child("ort_quant", {"src": str(prep), "dst": str(dst), "bits": bits, "block": block,
                                                  "external": external}, python=args.ort_python, timed=timed)
                else:
                    res = run_child("go_quant", {"src": str(prep), "dst": str(dst), "bits": bits, "block": block,
                                                 "method": method}, timed=timed)
                runs[tool].append(res)
                outs[tool] = dst
        for tool, rs in runs.items():
            s_rep["tools"][tool] = {
                "other_cpu_max": max(x["other_cpu"] for x in rs),
                "runs": len(rs), **{k: med(rs, k) for k in ("load_s", "quantize_s", "save_s", "total_s",
                                                             "process_s", "peak_rss")},
                "bytes": disk_bytes(outs[tool]), "quantized_count": len(rs[0]["quantized"]),
                **({"matmulnbits": rs[0]["matmulnbits"]} if tool == "ort" else
                   {"counters": rs[0]["counters"], "weights": rs[0]["weights"],
                    "quantize_pass_s": med(rs, "quantize_pass_s")}),
                "all_total_s": [x["total_s"] for x in rs]}
        ort_set = set(runs["ort"][0]["quantized"])
        go_set = set(runs["go-rtn"][0]["quantized"])
        extra = sorted(go_set - ort_set)
        missing = sorted(ort_set - go_set)
        s_rep["graphopt_only_weights"] = extra
        s_rep["ort_only_weights"] = missing
        if extra:  # e.g. a tied LM head, which onnxruntime's quantizer leaves in fp32: add a matched run
            for method in ["rtn", "search"] + [m for m in ("gptq", "gptq-seq") if m in methods]:
                tool = f"go-{method}=ort-set"
                dst = wd / f"{skey}-{tool}.onnx"
                remove_model(dst)
                res = run_child("go_quant", {"src": str(prep), "dst": str(dst), "bits": bits, "block": block,
                                             "method": method, "exclude": extra})
                s_rep["tools"][tool] = {"runs": 1, "total_s": res["total_s"], "process_s": res["process_s"],
                                        "load_s": res["load_s"], "quantize_s": res["quantize_s"],
                                        "save_s": res["save_s"], "peak_rss": res["peak_rss"],
                                        "bytes": disk_bytes(dst), "quantized_count": len(res["quantized"]),
                                        "counters": res["counters"], "weights": res["weights"],
                                        "quantize_pass_s": res["quantize_pass_s"]}
                outs[tool] = dst
        ev = run_child("eval", {"ref": str(prep), "ref_cache": str(ref_cache), "feeds": str(feeds["eval"]),
                                "candidates": {t: str(p) for t, p in outs.items()}, "acc_level": 0,
                                "threads": args.threads})
        s_rep["ref"] = ev.pop("ref")
        ev.pop("peak_rss", None)
        for k in ("process_s", "other_cpu"):
            ev.pop(k, None)
        for tool, e in ev.items():
            s_rep["tools"][tool]["error"] = e
        we = run_child("ort_weight_error", {"ref": str(prep), "model": str(outs["ort"])}, python=args.ort_python)
        s_rep["tools"]["ort"]["weights"] = [{"name": k, "rel_rms_error": v} for k, v in
                                            sorted(we["rel_rms_error"].items())]
        for r in s_rep["tools"].values():
            r["weight_rel_rms_mean"] = statistics.mean(w["rel_rms_error"] for w in r["weights"])
        t_ort = s_rep["tools"]["ort"]["total_s"]
        s_rep["ratio_ort_over_go_rtn_time"] = t_ort / s_rep["tools"]["go-rtn"]["total_s"]
        eo = s_rep["tools"]["ort"]["error"]
        s_rep["error_vs_ort"] = {}  # every error-minimising mode run, on onnxruntime's weight set
        for mode in ("search", "gptq", "gptq-seq"):
            tool = f"go-{mode}=ort-set" if extra else f"go-{mode}"
            if tool in s_rep["tools"]:
                e = s_rep["tools"][tool]["error"]
                s_rep["error_vs_ort"][mode] = {"compared": tool, "mean_abs": e["mean_abs"] / eo["mean_abs"],
                                               "max_abs": e["max_abs"] / eo["max_abs"]}
        s_rep["search_vs_ort_error"] = s_rep["error_vs_ort"]["search"]  # the name earlier reports used
        console.print(f"  {skey}: ORT {t_ort:.2f} s, graphopt rtn {s_rep['tools']['go-rtn']['total_s']:.2f} s "
                      f"(ORT/rtn {s_rep['ratio_ort_over_go_rtn_time']:.2f}x); search/ORT logit error: mean "
                      f"{s_rep['search_vs_ort_error']['mean_abs']:.3f}, max {s_rep['search_vs_ort_error']['max_abs']:.3f}"
                      f"  [load {load_avg()}]")
        keep = spec.key == args.decode_model and (bits, block) == (4, 32)
        for tool, pth in outs.items():
            if not (keep and tool in ("ort", "go-search", "go-rtn")) and not args.keep:
                remove_model(pth)
    if spec.key == args.decode_model:
        m_rep["decode"] = bench_decode(wd, prep, feeds["decode"], args, console)


def bench_decode(wd: Path, prep: Path, feeds: Path, args, console) -> dict:
    go = wd / "int4-b32-go-search.onnx"
    ort_q = wd / "int4-b32-ort.onnx"
    ort_levels = {lvl: wd / f"int4-b32-ort-acc{lvl}.onnx" for lvl in (0, 4)}
    for lvl, pth in ort_levels.items():
        run_child("set_acc", {"src": str(ort_q), "dst": str(pth), "level": lvl}, python=args.ort_python)
    res: dict = {"threads": args.decode_threads, "past": args.past, "runs": args.decode_runs,
                 "rounds": args.decode_rounds, "graphopt_model": go.name, "ort_model": ort_q.name,
                 "weights": {"fp32": _weight_bytes(prep), "go-int4": _weight_bytes(go), "ort-int4": _weight_bytes(ort_q)},
                 "ort": {}, "cpu_backend": {}}
    # What onnxruntime runs: does graphopt's QDQ become MatMulNBits, at which accuracy level?
    fused = {}
    for lvl in (0, 4):
        for name, pth in (("go", go), ("ort", ort_levels[lvl])):
            fused[f"{name}-acc{lvl}"] = run_child("ort_fused_ops", {"model": str(pth), "acc_level": lvl,
                                                                    "dst": str(wd / "ort_optimized.onnx")})
    remove_model(wd / "ort_optimized.onnx")
    res["ort_fused_ops"] = fused
    console.print("decode in onnxruntime (" + ", ".join(f"{k}: {v['ops']} acc {v['accuracy_levels']}"
                                                     for k, v in fused.items()) + ")")
    common = {"threads": args.decode_threads, "warmup": 5, "runs": args.decode_runs, "feeds": str(feeds)}
    samples: dict[str, list[dict]] = {}
    for _ in range(args.decode_rounds):
        for lvl in (0, 4):
            for name, pth in (("go", go), ("ort", ort_levels[lvl])):
                r = run_child("ort_decode", {**common, "model": str(pth), "acc_level": lvl},
                              threads=args.decode_threads, timed=True)
                samples.setdefault(f"{name}-acc{lvl}", []).append(r)
    for k, rs in samples.items():
        res["ort"][k] = {"median_ms": statistics.median(r["median_ms"] for r in rs),
                         "min_ms": min(r["min_ms"] for r in rs), "per_round_ms": [r["median_ms"] for r in rs],
                         "peak_rss": max(r["peak_rss"] for r in rs), "other_cpu_max": max(r["other_cpu"] for r in rs)}
    for lvl in (0, 4):
        res["ort"][f"ratio_go_over_ort_acc{lvl}"] = (res["ort"][f"go-acc{lvl}"]["median_ms"]
                                                     / res["ort"][f"ort-acc{lvl}"]["median_ms"])
    # graphopt's own CPU backend: int4 (graphopt output) vs fp32.
    cpu: dict[str, list[dict]] = {}
    for _ in range(args.decode_rounds):
        for name, pth in (("fp32", prep), ("int4", go)):
            cpu.setdefault(name, []).append(run_child("go_decode", {**common, "model": str(pth)},
                                                      threads=args.decode_threads, timed=True))
    for k, rs in cpu.items():
        res["cpu_backend"][k] = {"median_ms": statistics.median(r["median_ms"] for r in rs),
                                 "min_ms": min(r["min_ms"] for r in rs), "per_round_ms": [r["median_ms"] for r in rs],
                                 "peak_rss": statistics.median(r["peak_rss"] for r in rs),
                                 "compile_s": statistics.median(r["compile_s"] for r in rs),
                                 "other_cpu_max": max(r["other_cpu"] for r in rs)}
    if not args.keep:
        for pth in ort_levels.values():
            remove_model(pth)
    return res


# =========================================================================== report
def print_report(console, report: dict) -> None:
    from rich.table import Table

    t = Table(title="Quantization time: load -> quantize -> save, fresh process each (median; s)")
    for c in ("model", "setting", "tool", "runs", "load", "quantize", "save", "total", "process", "peak RSS GB",
              "ORT / this (total)", "ORT / this (process)", "other CPU"):
        t.add_column(c, justify="left" if c in ("model", "setting", "tool") else "right")
    for mk, m in report["models"].items():
        for sk, s in m["settings"].items():
            ort_total = s["tools"]["ort"]["total_s"]
            for tool, r in s["tools"].items():
                if "=ort-set" in tool:
                    continue
                ratio = ort_total / r["total_s"]
                t.add_row(mk, sk, tool, str(r["runs"]), f"{r['load_s']:.2f}", f"{r['quantize_s']:.2f}",
                          f"{r['save_s']:.2f}", f"{r['total_s']:.2f}", f"{r['process_s']:.2f}",
                          f"{r['peak_rss'] / GB:.2f}", ("[bold]" if tool == "go-rtn" else "") + f"{ratio:.2f}x",
                          f"{s['tools']['ort']['process_s'] / r['process_s']:.2f}x", f"{100 * r['other_cpu_max']:.0f}%")
            t.add_section()
    console.print(t)

    e = Table(title="Size on disk and logits error vs fp32 (onnxruntime CPU, ORT_ENABLE_ALL, "
                    "qdq_matmulnbits_accuracy_level=0)")
    for c in ("model", "setting", "tool", "weights q.", "weight rel-RMS", "MB", "max |err|", "mean |err|", "cosine",
              "top-1", "mean/ORT", "max/ORT"):
        e.add_column(c, justify="left" if c in ("model", "setting", "tool") else "right")
    for mk, m in report["models"].items():
        ref = next(iter(m["settings"].values()))["ref"]
        e.add_row(mk, "fp32", f"[dim]ref: {ref['positions']} rows, |logit| {ref['mean_abs_logit']:.3g}[/]", "", "",
                  f"{m['fp32_bytes'] / MB:.1f}", "", "", "", "", "", "")
        for sk, s in m["settings"].items():
            eo = s["tools"]["ort"]["error"]
            for tool, r in s["tools"].items():
                er = r["error"]
                bold = "[bold]" if tool == s["search_vs_ort_error"]["compared"] else ""
                e.add_row(mk, sk, tool, str(r["quantized_count"]), f"{r['weight_rel_rms_mean']:.4f}",
                          f"{r['bytes'] / MB:.1f}", f"{er['max_abs']:.4g}",
                          f"{er['mean_abs']:.4g}", f"{er['cosine']:.6f}", f"{100 * er['top1']:.1f}%",
                          f"{bold}{er['mean_abs'] / eo['mean_abs']:.3f}", f"{bold}{er['max_abs'] / eo['max_abs']:.3f}")
            e.add_section()
    console.print(e)

    for mk, m in report["models"].items():
        d = m.get("decode")
        if not d:
            continue
        o = d["ort"]
        dt = Table(title=f"{mk} int4 block 32 decode step in onnxruntime CPU ({d['threads']} threads, past "
                         f"{d['past']}, median of {d['rounds']} processes x {d['runs']} runs; ms/token)")
        for c in ("accuracy level", "graphopt QDQ (search)", "ORT MatMulNBits", "graphopt / ORT", "other CPU"):
            dt.add_column(c, justify="right")
        for lvl in (0, 4):
            dt.add_row(f"{lvl}" + (" (float)" if lvl == 0 else " (int8 act., ORT default)"),
                       f"{o[f'go-acc{lvl}']['median_ms']:.2f}", f"{o[f'ort-acc{lvl}']['median_ms']:.2f}",
                       f"{o[f'ratio_go_over_ort_acc{lvl}']:.3f}",
                       f"{100 * max(o[f'go-acc{lvl}']['other_cpu_max'], o[f'ort-acc{lvl}']['other_cpu_max']):.0f}%")
        console.print(dt)
        c = d["cpu_backend"]
        w = d["weights"]
        ct = Table(title=f"{mk} decode step in graphopt's CPU backend (graphopt.compile(m, 'cpu'); "
                         f"{d['threads']} threads, past {d['past']})")
        for col in ("model", "ms/token", "min ms", "peak RSS MB", "weights MB (all / streamed per token)",
                    "compile s", "other CPU"):
            ct.add_column(col, justify="left" if col == "model" else "right")
        for k, wk in (("fp32", "fp32"), ("int4", "go-int4")):
            ct.add_row(k, f"{c[k]['median_ms']:.2f}", f"{c[k]['min_ms']:.2f}", f"{c[k]['peak_rss'] / MB:.0f}",
                       f"{w[wk]['initializer_bytes'] / MB:.1f} / {w[wk]['streamed_bytes'] / MB:.1f}",
                       f"{c[k]['compile_s']:.2f}", f"{100 * c[k]['other_cpu_max']:.0f}%")
        ct.add_row("int4 / fp32", f"{c['int4']['median_ms'] / c['fp32']['median_ms']:.3f}", "",
                   f"{c['int4']['peak_rss'] / c['fp32']['peak_rss']:.3f}", "", "", "")
        console.print(ct)


def targets(report: dict) -> list[dict]:
    out = []
    for mk, m in report["models"].items():
        for sk, s in m["settings"].items():
            r = s["ratio_ort_over_go_rtn_time"]
            out.append({"target": "graphopt rtn >= 5x faster than ORT", "model": mk, "setting": sk,
                        "value": f"{r:.2f}x", "met": r >= 5})
            for mode, c in s["error_vs_ort"].items():
                out.append({"target": f"{mode} logit error <= 0.85x ORT (mean; max)", "model": mk, "setting": sk,
                            "value": f"mean {c['mean_abs']:.3f}, max {c['max_abs']:.3f} ({c['compared']})",
                            "met": c["mean_abs"] <= 0.85,
                            "met_max_too": c["max_abs"] <= 0.85})
        d = m.get("decode")
        if d:
            for lvl in (0, 4):
                r = d["ort"][f"ratio_go_over_ort_acc{lvl}"]
                out.append({"target": f"graphopt QDQ decode >= as fast as ORT MatMulNBits (acc {lvl})", "model": mk,
                            "setting": "int4-b32", "value": f"{r:.3f}x time", "met": r <= 1.0})
    return out


def print_targets(console, rows: list[dict]) -> None:
    from rich.table import Table

    t = Table(title="Targets")
    for c in ("target", "model", "setting", "value", "met"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["target"], r["model"], r["setting"], r["value"],
              ("[green]yes[/]" if r["met"] else "[red]no[/]")
              + ("" if "met_max_too" not in r else (" (max too)" if r["met_max_too"] else " (not max)")))
    console.print(t)


# =========================================================================== main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="graphopt quantize pass vs onnxruntime MatMulNBitsQuantizer: "
                                             "time, size, logits error, decode speed.")
    ap.add_argument("--quick", action="store_true", help="tiny fixtures only (< 1 min)")
    ap.add_argument("--models", nargs="+", help="subset of: llama-tiny qwen2-tiny llama-150m qwen2-0.5b")
    ap.add_argument("--json", type=Path, metavar="PATH", help="write every figure as JSON")
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    ap.add_argument("--repeat", type=int, help="quantization runs per tool, small models (median; default 3, "
                                               "1 with --quick)")
    ap.add_argument("--repeat-big", type=int, default=1, help="quantization runs per tool, the 2.5 GB model")
    ap.add_argument("--no-activation-big", action="store_true", help="skip graphopt 'activation' on the 2.5 GB model")
    ap.add_argument("--methods", nargs="+", default=GO_METHODS, choices=GO_METHODS + ["gptq", "gptq-seq"],
                    help="graphopt methods to run; rtn and search always run (default: rtn search activation; "
                         "gptq takes minutes per model, gptq-seq (gptq --quant-sequential) longer)")
    ap.add_argument("--ort-python", help="interpreter for onnxruntime's quantizer (needs onnx_ir); default: this one")
    ap.add_argument("--torch-python", help="interpreter with torch to regenerate llama-150m if missing")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="onnxruntime threads for the error runs")
    ap.add_argument("--eval-shape", type=int, nargs=3, default=(8, 8, 32), metavar=("BATCH", "SEQ", "PAST"),
                    help="inputs for the error runs (default 8 8 32: 64 logit rows)")
    ap.add_argument("--past", type=int, default=128, help="KV length of the decode step")
    ap.add_argument("--decode-threads", type=int, default=2)
    ap.add_argument("--decode-runs", type=int, default=30)
    ap.add_argument("--decode-rounds", type=int, default=3, help="fresh processes per decode configuration")
    ap.add_argument("--idle-wait", type=float,
                    help="before each timed run (not the fixtures), wait at most this long for CPUs < 30%% busy "
                         "(default 30 s; 0 with --quick)")
    ap.add_argument("--profile", action="store_true", help="cProfile graphopt rtn on the largest model run")
    ap.add_argument("--keep", action="store_true", help="keep every quantized model")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("payload", nargs="?", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        print(json.dumps(CHILDREN[args._child](json.loads(args.payload))))
        return 0
    from rich.console import Console

    console = Console(width=max(Console().width, 150))
    try:
        return bench(args, console)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def bench(args, console) -> int:
    args.workdir = args.workdir.resolve()
    IDLE["max_wait"] = args.idle_wait if args.idle_wait is not None else (0.0 if args.quick else 30.0)
    args.workdir.mkdir(parents=True, exist_ok=True)
    # onnxruntime's quantizer needs onnx_ir.
    py = args.ort_python or sys.executable
    chk = subprocess.run([py, "-c", "import onnx_ir, onnxruntime; print(onnxruntime.__version__)"],
                         capture_output=True, text=True)
    if chk.returncode != 0:
        raise BenchError(f"{py} cannot import onnxruntime's quantizer dependencies (onnx_ir): "
                         "pip install onnx-ir, or pass --ort-python")
    ort_version = chk.stdout.strip()
    specs = {
        "llama-tiny": ModelSpec("llama-tiny", ROOT / "tests/fixtures/llama-dynamo-decode.onnx",
                                "fixture, hidden 64, 2 layers, vocab 512, untied", tiny=True),
        "qwen2-tiny": ModelSpec("qwen2-tiny", ROOT / "tests/fixtures/qwen2-dynamo-decode.onnx",
                                "fixture, hidden 64, 2 layers, vocab 512, tied LM head", tiny=True),
        "llama-150m": ModelSpec("llama-150m", args.workdir / "llama-150m-decode.onnx",
                                "make_llama.py: hidden 1024, 8 layers, 16/4 heads, ffn 2816, vocab 32000, untied; "
                                "decode graph with KV cache"),
        "qwen2-0.5b": ModelSpec("qwen2-0.5b", args.workdir / "model.onnx",
                                "bench_io.py generator: Qwen2-0.5B shapes, 24 layers, vocab 151936, untied, "
                                "N(0, 0.02) weights, external data, no KV cache", big=True),
    }
    keys = args.models or (["llama-tiny", "qwen2-tiny"] if args.quick else list(specs))
    args.decode_model = "llama-tiny" if args.quick else "llama-150m"
    if args.quick:
        args.decode_runs, args.decode_rounds = 10, 1
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if "llama-150m" in keys:
        ensure_llama150m(specs["llama-150m"].path, args.torch_python, console)
    if "qwen2-0.5b" in keys:
        specs["qwen2-0.5b"].path = ensure_qwen05b(args.workdir, console)

    import graphopt
    import onnx
    import onnxruntime

    report: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "environment": {"python": platform.python_version(), "graphopt": graphopt.__version__,
                                    "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                                    "onnxruntime_quantizer": f"{ort_version} ({py})",
                                    "cpus": os.cpu_count(), "machine": platform.machine(),
                                    "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                                    "load_start": load_avg(), "sources_start": source_state()},
                    "method": {"prep_passes": PREP_PASSES, "graphopt_passes": QUANT_PASSES,
                               "graphopt_options": "quant_lm_bits=quant_bits, quant_symmetric=True, "
                                                   "embedding not quantized",
                               "ort_options": "MatMulNBitsQuantizer(bits, block_size, is_symmetric=True, "
                                              "accuracy_level=0), default RTN, QOperator (MatMulNBits)",
                               "time": "in-process load -> quantize -> save (fsync) after imports; 'process' adds "
                                       "interpreter start and imports"},
                    "models": {}}
    console.print(f"graphopt {graphopt.__version__} ({report['environment']['sources_start']}), onnxruntime "
                  f"{onnxruntime.__version__} (quantizer: {py}), {os.cpu_count()} CPUs, load average at start {load_avg()}")
    t0 = time.perf_counter()
    for k in keys:
        bench_model(specs[k], args, console, report)
    report["environment"]["load_end"] = load_avg()
    report["environment"]["sources_end"] = source_state()
    if report["environment"]["sources_end"] != report["environment"]["sources_start"]:
        console.print(f"[bold red]graphopt's sources changed during the run[/]: start "
                      f"{report['environment']['sources_start']}, end {report['environment']['sources_end']}")
    report["wall_s"] = time.perf_counter() - t0
    if args.profile:
        big = next((k for k in reversed(keys)), None)
        wd = args.workdir / "quant" / big
        prof = run_child("profile", {"src": str(wd / "fp32.onnx"), "dst": str(wd / "profile.onnx"), "bits": 4,
                                     "block": 32, "method": "rtn", "top": 20})
        remove_model(wd / "profile.onnx")
        report["profile"] = {"model": big, **prof}
    print_report(console, report)
    rows = targets(report)
    report["targets"] = rows
    print_targets(console, rows)
    if "profile" in report:
        pr = report["profile"]
        console.print(f"[bold]cProfile, graphopt rtn int4-b32 on {pr['model']}[/] (profiled wall "
                      f"{pr['wall_profiled_s']:.2f} s; per pass: {pr['passes']})")
        for label, secs in pr["breakdown"].items():
            console.print(f"  {label:45s} {secs:8.3f} s", markup=False, highlight=False)
        console.print(pr["text"], markup=False, highlight=False)
    console.print(f"load average: start {report['environment']['load_start']}, end "
                  f"{report['environment']['load_end']}; wall {report['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
