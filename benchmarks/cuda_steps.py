"""How many device steps (kernel launches, roughly) a decode step costs on the cuda backend.

Runs anywhere: compiles the model with ``CudaBackend(emulate=True)`` (numpy standing in for
the device) in four configurations (attention split back or fused, elementwise fusion off
or on) and prints the compile-time rewrites and the device-step count per configuration,
plus the op histogram of the last one. A GPU decode step is bound by launches long before
it is bound by memory for small models, so this is the number to drive down.

    python benchmarks/cuda_steps.py benchmarks/work/qwen2-0.5b-decode.onnx --quant-bits 4 --quant-block 32
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import graphopt
from graphopt.backends.cuda import CudaBackend


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--quant-bits", type=int)
    p.add_argument("--quant-block", type=int, default=32)
    args = p.parse_args(argv)
    options = {"quant_bits": args.quant_bits, "quant_block": args.quant_block} if args.quant_bits else {}
    model = graphopt.load(args.model)
    exe = None
    for fused_attention in (False, True):
        backend = CudaBackend(emulate=True, fused_attention=fused_attention)
        optimized = graphopt.optimize(model, target=backend, **options)
        for fuse in (False, True):
            backend.fuse_elementwise = fuse
            t = time.perf_counter()
            exe = graphopt.compile(optimized, backend)
            seconds = time.perf_counter() - t
            device = sum(not s.host for s in exe.steps)
            print(f"fused attention {str(fused_attention):5}  elementwise fusion {str(fuse):5}  "
                  f"device steps {device:5}  host steps {exe.rewrites['host_steps']:4}  compile {seconds:.1f} s  "
                  f"{ {k: v for k, v in exe.rewrites.items() if not k.endswith('_steps')} }")
    if exe is not None:
        print("device steps of the last:", dict(Counter(s.op for s in exe.steps if not s.host).most_common()))
        print(f"device weight bytes: {exe.weight_bytes / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
