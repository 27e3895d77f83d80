"""Where a step's GPU time goes on the cuda backend: CUDA events around every device step.

Runs one phase op by op (no CUDA graph) after a warm-up, recording an event pair around
each step on the backend's stream, and prints GPU milliseconds per op type and the
slowest steps, beside the wall time of the whole call and of the output download. Needs
a GPU. Event pairs add a little time of their own; read the table as shares.

    python benchmarks/cuda_profile.py /tmp/work/q05-cuda.onnx --phase prefill --seq 512
    python benchmarks/cuda_profile.py /tmp/work/q05-cuda-int4.onnx --phase decode --past 128
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import graphopt
from graphopt._inputs import InputSpec, build_inputs, has_kv_cache
from graphopt.backends.cuda import CudaBackend


def main(argv: list[str] | None = None) -> int:
    import cupy as cp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--phase", choices=("prefill", "decode"), default="decode")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--past", type=int, default=128)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--graphs", action="store_true", help="decode with static KV buffers: time the captured "
                   "CUDA graph's replay alone (GPU time) against the whole step (wall time)")
    args = p.parse_args(argv)
    model = graphopt.load(args.model)
    if args.graphs:
        return _graph_replay(model, args)
    exe = graphopt.compile(model, CudaBackend())
    kv = has_kv_cache(model)
    spec = InputSpec(batch=1, seq=args.seq if args.phase == "prefill" else 1,
                     past=args.past if kv and args.phase == "decode" else 0, left_pad=0)
    feeds = build_inputs(model, spec)
    for _ in range(2):
        exe.run(feeds)
    exe.synchronize()
    t = time.perf_counter()
    exe.run(feeds)
    exe.synchronize()
    wall = time.perf_counter() - t

    events: list[tuple[object, object, object]] = []
    for step in exe.steps:
        if step.host:
            continue
        fn = step.fn

        def timed(*a, _fn=fn, _step=step):
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            out = _fn(*a)
            stop.record()
            events.append((_step, start, stop))
            return out
        step.fn = timed
    t = time.perf_counter()
    out = exe.run(feeds)
    exe.synchronize()
    wall_events = time.perf_counter() - t
    by_op: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    steps = []
    for step, start, stop in events:
        ms = cp.cuda.get_elapsed_time(start, stop)
        by_op[step.op] += ms
        count[step.op] += 1
        steps.append((ms, step.name, step.op))
    gpu = sum(by_op.values())
    nbytes = sum(v.nbytes for v in out.values())
    print(f"{args.model} {args.phase}: wall {wall * 1e3:.2f} ms (with events {wall_events * 1e3:.2f}); "
          f"GPU time in steps {gpu:.2f} ms over {len(events)} steps; outputs {nbytes / 2**20:.1f} MiB to host")
    for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {op:24} {count[op]:5} steps {ms:9.3f} ms {100 * ms / gpu:5.1f}%")
    print("  slowest steps:")
    for ms, name, op in sorted(steps, reverse=True)[:args.top]:
        print(f"    {ms:8.3f} ms  {op:20} {name}")
    return 0


def _graph_replay(model, args) -> int:
    import cupy as cp

    from graphopt._bench import decode_loop

    exe = graphopt.compile(model, CudaBackend(graphs=True))
    feeds = build_inputs(model, InputSpec(batch=1, seq=1, past=args.past, left_pad=0))
    walls = list(decode_loop(exe, model, feeds, 24, static=True))[4:]
    sig = next(s for s in exe._signatures.values() if s.graph is not None)
    plan = sig.graph[0]
    stream = exe._stream
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    with stream:
        start.record(stream)
        for _ in range(20):
            for item in plan:
                item[1].launch(stream=stream)
        stop.record(stream)
    stop.synchronize()
    gpu = cp.cuda.get_elapsed_time(start, stop) / 20
    walls.sort()
    print(f"{args.model} decode with a CUDA graph: step wall {walls[len(walls) // 2] * 1e3:.3f} ms (median), "
          f"graph replay GPU {gpu:.3f} ms ({len(plan)} piece(s)), the rest {walls[len(walls) // 2] * 1e3 - gpu:.3f} ms "
          f"on the host (input copies, output copies, static-KV moves, logits download)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
