"""Prefill and decode-step latency of a target next to onnxruntime, measured in one run.

Every (engine, phase) runs in its own subprocess so that its peak resident
memory (``VmHWM``) is its own. Results are ratios against onnxruntime on the
same model and inputs, plus the memory-bandwidth bound of a decode step:
weight bytes per token ÷ the memory bandwidth measured in the same run, since a
decode step is memory-bound.

- CPU targets are compared with onnxruntime's CPU execution provider; a decode step
  re-runs the same inputs (a ``--past``-token cache) ``runs`` times; the bound uses
  DRAM read bandwidth (BLAS matrix-vector product over a 256 MiB matrix).
- GPU targets (``cuda``) are compared with onnxruntime's CUDA execution provider
  (onnxruntime-gpu, I/O bound to the device); decode is a real decode loop: each step's
  ``present`` KV cache is fed back as the next ``past`` and stays on the device, the
  logits come back to the host (as a sampler needs them), so the past grows from
  ``--past`` by one per step. The bound uses the device's read bandwidth (a reduction
  over 1 GiB, timed with CUDA events).
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
    #: cuda target: capture repeated steps in CUDA graphs.
    graphs: bool = False

    @property
    def peer(self) -> str:
        return peer_of(self.target)


#: Engines whose decode phase is a device-resident decode loop.
DEVICE_ENGINES = {"cuda", "onnxruntime-cuda"}


def peer_of(target: str) -> str:
    """The onnxruntime engine a target is measured against: same device."""
    return "onnxruntime-cuda" if target == "cuda" else "onnxruntime"


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


def measure_device_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """GPU memory read bandwidth in bytes/s (CuPy): a sum over ``gib`` GiB, timed with CUDA events."""
    import cupy as cp

    a = cp.ones(int(gib * 2**30) // 4, dtype=cp.float32)
    a.sum()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    best = float("inf")
    for _ in range(repeats):
        start.record()
        a.sum()
        stop.record()
        stop.synchronize()
        best = min(best, cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return a.nbytes / best


class OrtCudaStepper:
    """onnxruntime's CUDA execution provider with I/O bound to the device: ``step(feeds, keep)``
    returns the outputs named in ``keep`` as device ``OrtValue`` objects, which later steps bind
    as inputs without a copy (how a serving loop keeps its KV cache on the GPU)."""

    def __init__(self, path: str, threads: int | None = None):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            from graphopt._errors import GraphoptError

            raise GraphoptError("onnxruntime has no CUDA execution provider here (pip install 'graphopt[cuda]')")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.ort = ort
        # from the file: external data resolves beside it (and a >2 GB model has no bytes form)
        self.session = ort.InferenceSession(str(path), opts, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        if "CUDAExecutionProvider" not in self.session.get_providers():
            from graphopt._errors import GraphoptError

            raise GraphoptError("onnxruntime could not start its CUDA execution provider here")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def step(self, feeds: dict, keep=frozenset()) -> dict:
        binding = self.session.io_binding()
        for name in self.input_names:
            value = feeds[name]
            if isinstance(value, self.ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, "cuda" if name in keep else "cpu")
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {name: v if name in keep else v.numpy() for name, v in zip(self.output_names, values)}

    def run(self, feeds: dict) -> dict:
        return self.step(feeds)


def _engine(cfg: dict, model):
    """The executable (or stepper) an engine name stands for."""
    import graphopt

    engine = cfg["engine"]
    if engine == "onnxruntime":
        from graphopt.backends.onnxruntime import OnnxRuntimeBackend

        return graphopt.compile(model, OnnxRuntimeBackend(threads=cfg.get("threads") or os.cpu_count(),
                                                          optimization="all",
                                                          accuracy_level=cfg.get("ort_accuracy_level")))
    if engine == "onnxruntime-cuda":
        return OrtCudaStepper(cfg["model"], cfg.get("threads"))
    if engine == "cuda":
        from graphopt.backends.cuda import CudaBackend

        backend = CudaBackend(emulate=bool(cfg.get("emulate")), graphs=bool(cfg.get("graphs")))
        return graphopt.compile(model, backend)
    return graphopt.compile(model, graphopt.get_backend(engine))


def decode_loop(exe, model, feeds: dict, steps: int, static: bool = False):
    """Yields the seconds of each of ``steps`` decode steps, feeding each step's KV cache back
    (kept in the engine's memory) and its greedy token as the next input. ``static``: after
    one untimed step on ``feeds``, fixed-size KV buffers (``graphopt._evaluate.StaticKV``), so
    every timed step has the same shapes and a CUDA graph can replay it."""
    from graphopt._evaluate import StaticKV, _past_inputs, input_names, static_kv_slots

    pairs = _past_inputs(model)
    presents = frozenset(p for _, p in pairs)
    feeds = dict(feeds)
    if static:
        out = exe.step(feeds, keep=presents)
        total = np.asarray(feeds["attention_mask"]).shape[1]
        kv = StaticKV(pairs, static_kv_slots(total, steps), getattr(exe, "copy_many", None))
        kv.start(out)
        token = int(np.argmax(out["logits"][0, -1]))
        names = set(input_names(model))
        for _ in range(steps):
            step_feeds = kv.feeds(token, names)
            t = time.perf_counter()
            out = exe.step(step_feeds, keep=presents)
            token = int(np.argmax(out["logits"][0, -1]))
            elapsed = time.perf_counter() - t
            kv.advance(out)
            yield elapsed
        return
    for _ in range(steps):
        t = time.perf_counter()
        out = exe.step(feeds, keep=presents)
        token = np.argmax(out["logits"][:, -1], axis=-1)  # on the host: the step is complete
        elapsed = time.perf_counter() - t
        nxt = dict(feeds)
        for past, present in pairs:
            nxt[past] = out[present]
        nxt["input_ids"] = token.reshape(-1, 1).astype(np.int64)
        if "attention_mask" in nxt:
            mask = np.asarray(feeds["attention_mask"])
            nxt["attention_mask"] = np.concatenate([mask, np.ones((mask.shape[0], 1), mask.dtype)], axis=1)
        if "position_ids" in nxt:
            nxt["position_ids"] = np.asarray(feeds["position_ids"])[:, -1:] + 1
        feeds = nxt
        yield elapsed


def worker(cfg: dict) -> dict:
    """Runs in a subprocess: compile once, time ``runs`` calls of one phase."""
    import graphopt
    from graphopt._inputs import InputSpec, build_inputs, has_kv_cache

    model = graphopt.load(cfg["model"])
    engine = cfg["engine"]
    t0 = time.perf_counter()
    exe = _engine(cfg, model)
    compile_s = time.perf_counter() - t0
    kv = has_kv_cache(model)
    if cfg["phase"] == "prefill":
        spec = InputSpec(batch=cfg["batch"], seq=cfg["prefill"], past=0, left_pad=0)
        tokens = cfg["batch"] * cfg["prefill"]
    else:
        spec = InputSpec(batch=cfg["batch"], seq=1, past=cfg["past"] if kv else 0, left_pad=0)
        tokens = cfg["batch"]
    feeds = build_inputs(model, spec)
    extra = {}
    if engine in DEVICE_ENGINES and cfg["phase"] == "decode" and kv:
        static = bool(cfg.get("graphs")) and engine == "cuda" and cfg["batch"] == 1
        times = list(decode_loop(exe, model, feeds, cfg["warmup"] + cfg["runs"], static=static))[cfg["warmup"]:]
        extra["decode_loop"] = "static KV buffers" if static else "growing KV cache"
    else:
        sync = getattr(exe, "synchronize", lambda: None)
        for _ in range(cfg["warmup"]):
            exe.run(feeds)
        times = [_timed(lambda: (exe.run(feeds), sync())) for _ in range(cfg["runs"])]
    if engine == "cuda" and not cfg.get("emulate"):
        extra["device_bandwidth_bytes_per_s"] = measure_device_bandwidth()
    if hasattr(exe, "stats"):
        extra["stats"] = dict(exe.stats)
    if getattr(exe, "capture_problems", None):
        extra["capture_problems"] = list(exe.capture_problems)
    med = statistics.median(times)
    return {"engine": engine, "phase": cfg["phase"], "compile_s": compile_s, "median_s": med, "min_s": min(times),
            "max_s": max(times), "tokens_per_s": tokens / med, "peak_rss": _peak_rss(), "kv_cache": kv, **extra}


def run(cfg: BenchConfig, progress=None) -> dict:
    """Measure target and onnxruntime, prefill and decode; returns all figures."""
    import graphopt
    from graphopt._inputs import has_kv_cache

    model = graphopt.load(cfg.model)
    wbytes = weight_bytes(model)
    phases = ["prefill", "decode"] if has_kv_cache(model) else ["prefill"]
    results = []
    for engine in (cfg.target, cfg.peer):
        for phase in phases:
            payload = json.dumps({"model": str(cfg.model), "engine": engine, "phase": phase, "prefill": cfg.prefill,
                                  "past": cfg.past, "runs": cfg.runs, "warmup": cfg.warmup, "batch": cfg.batch,
                                  "threads": cfg.threads, "ort_accuracy_level": cfg.ort_accuracy_level,
                                  "graphs": cfg.graphs})
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
    device_bw = [r["device_bandwidth_bytes_per_s"] for r in results if "device_bandwidth_bytes_per_s" in r]
    bandwidth = max(device_bw) if device_bw else measure_bandwidth()
    by = {(r["engine"], r["phase"]): r for r in results}
    summary = {"model": str(cfg.model), "target": cfg.target, "peer": cfg.peer, "weight_bytes": wbytes,
               "bandwidth_bytes_per_s": bandwidth, "bandwidth_of": "device" if device_bw else "host DRAM",
               "decode_bound_tokens_per_s": bandwidth / wbytes * cfg.batch if wbytes else None,
               "config": cfg.__dict__, "results": results, "ratios": {}}
    for phase in phases:
        t, o = by.get((cfg.target, phase)), by.get((cfg.peer, phase))
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
