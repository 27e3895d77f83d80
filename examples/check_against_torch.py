"""Run an (optimized) model in onnxruntime on a fixture's stored inputs and compare
every output with torch's reference outputs stored beside the fixture.

    python examples/check_against_torch.py OPTIMIZED.onnx tests/fixtures/NAME.npz [--atol 1e-4]

Exits 1 when any output differs from torch by more than ``--atol``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnxruntime as ort


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("reference", help=".npz with the inputs and torch's outputs")
    p.add_argument("--atol", type=float, default=1e-4)
    args = p.parse_args(argv)

    sess = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    ref = dict(np.load(args.reference))
    feeds = {i.name: ref[i.name] for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    worst = 0.0
    for name, got in zip(names, sess.run(names, feeds)):
        err = float(np.max(np.abs(got.astype(np.float64) - ref[name]))) if got.size else 0.0
        worst = max(worst, err)
        print(f"{name:24s} {str(got.shape):18s} max |onnxruntime - torch| = {err:.2e}")
    ok = worst <= args.atol
    print(f"{'OK' if ok else 'MISMATCH'}: worst {worst:.2e} (tolerance {args.atol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
