"""Prefill and decode-step latency of a target next to onnxruntime, measured in one run.

Every (engine, phase) runs in its own subprocess so that its peak resident
memory (``VmHWM``) is its own. Results are ratios against onnxruntime on the
same model and inputs, plus the memory-bandwidth bound of a decode step:
weight bytes per token ÷ the DRAM read bandwidth measured here (BLAS
matrix-vector product over a 256 MiB matrix), since a decode step is
memory-bound.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class BenchConfig:
    model: str
    target: str
    prefill: int = 32
    past: int = 128
    runs: int = 10
    warmup: int = 2
    batch: int = 1
    threads: int | None = None
    #: onnxruntime's MatMulNBits compute: None = its default (int8 activations, fast), 0 = float.
    ort_accuracy_level: int | None = None


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """DRAM read bandwidth in bytes/s: a float32 matrix-vector product streams the matrix once."""
    n = 4096
    rows = mib * 2**20 // (4 * n)
    a = np.random.default_rng(0).standard_normal((rows, n), dtype=np.float32)
    x = np.ones(n, np.float32)
    a @ x
    best = min(_timed(lambda: a @ x) for _ in range(repeats))
    return a.nbytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes(model) -> int:
    """Bytes a decode step must stream: every weight, except tables only read by ``Gather``
    (an embedding lookup reads one row per token, not the table)."""
    import onnx_graphsurgeon as gs

    from graphopt._ir import tensor_nbytes

    def gather_only(t) -> bool:
        users = list(t.outputs)
        while users and all(u.op == "DequantizeLinear" for u in users):
            users = [c for u in users for c in u.outputs[0].outputs]
        return bool(users) and all(u.op == "Gather" and u.inputs[0] is not None for u in users)

    total = 0
    for t in model.graph.tensors().values():
        if isinstance(t, gs.Constant) and not gather_only(t):
            v = t._values
            total += tensor_nbytes(v.tensor) if hasattr(v, "tensor") else int(np.asarray(v).nbytes)
    return total


def worker(cfg: dict) -> dict:
    """Runs in a subprocess: compile once, time ``runs`` calls of one phase."""
    import graphopt
    from graphopt._backend import Backend
    from graphopt._inputs import InputSpec, build_inputs, has_kv_cache

    model = graphopt.load(cfg["model"])
    engine = cfg["engine"]
    backend: Backend
    if engine == "onnxruntime":
        from graphopt.backends.onnxruntime import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(threads=cfg.get("threads") or os.cpu_count(), optimization="all",
                                     accuracy_level=cfg.get("ort_accuracy_level"))
    else:
        backend = graphopt.get_backend(engine)
    t0 = time.perf_counter()
    exe = graphopt.compile(model, backend)
    compile_s = time.perf_counter() - t0
    kv = has_kv_cache(model)
    if cfg["phase"] == "prefill":
        spec = InputSpec(batch=cfg["batch"], seq=cfg["prefill"], past=0, left_pad=0)
        tokens = cfg["batch"] * cfg["prefill"]
    else:
        spec = InputSpec(batch=cfg["batch"], seq=1, past=cfg["past"] if kv else 0, left_pad=0)
        tokens = cfg["batch"]
    feeds = build_inputs(model, spec)
    for _ in range(cfg["warmup"]):
        exe.run(feeds)
    times = [_timed(lambda: exe.run(feeds)) for _ in range(cfg["runs"])]
    med = statistics.median(times)
    return {"engine": engine, "phase": cfg["phase"], "compile_s": compile_s, "median_s": med, "min_s": min(times),
            "max_s": max(times), "tokens_per_s": tokens / med, "peak_rss": _peak_rss(), "kv_cache": kv}


def run(cfg: BenchConfig, progress=None) -> dict:
    """Measure target and onnxruntime, prefill and decode; returns all figures."""
    import graphopt
    from graphopt._inputs import has_kv_cache

    model = graphopt.load(cfg.model)
    wbytes = weight_bytes(model)
    phases = ["prefill", "decode"] if has_kv_cache(model) else ["prefill"]
    results = []
    for engine in (cfg.target, "onnxruntime"):
        for phase in phases:
            payload = json.dumps({"model": str(cfg.model), "engine": engine, "phase": phase, "prefill": cfg.prefill,
                                  "past": cfg.past, "runs": cfg.runs, "warmup": cfg.warmup, "batch": cfg.batch,
                                  "threads": cfg.threads, "ort_accuracy_level": cfg.ort_accuracy_level})
            env = dict(os.environ)
            if cfg.threads:
                for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                    env[var] = str(cfg.threads)
            res = subprocess.run([sys.executable, "-m", "graphopt._bench", payload], capture_output=True, text=True,
                                 env=env)
            if res.returncode != 0:
                tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
                raise graphopt.GraphoptError(f"bench: {engine} {phase} failed: {tail}")
            results.append(json.loads(res.stdout.strip().splitlines()[-1]))
            if progress:
                progress()
    bandwidth = measure_bandwidth()
    by = {(r["engine"], r["phase"]): r for r in results}
    summary = {"model": str(cfg.model), "target": cfg.target, "weight_bytes": wbytes, "bandwidth_bytes_per_s": bandwidth,
               "decode_bound_tokens_per_s": bandwidth / wbytes * cfg.batch if wbytes else None,
               "config": cfg.__dict__, "results": results, "ratios": {}}
    for phase in phases:
        t, o = by.get((cfg.target, phase)), by.get(("onnxruntime", phase))
        if t and o:
            summary["ratios"][phase] = {"latency_vs_onnxruntime": t["median_s"] / o["median_s"],
                                        "peak_rss_vs_onnxruntime": t["peak_rss"] / o["peak_rss"]}
    if summary["decode_bound_tokens_per_s"]:
        for r in results:
            if r["phase"] == "decode":
                r["fraction_of_bandwidth_bound"] = r["tokens_per_s"] / summary["decode_bound_tokens_per_s"]
    return summary


if __name__ == "__main__":  # worker entry point
    print(json.dumps(worker(json.loads(sys.argv[1]))))
