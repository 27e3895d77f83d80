"""Byte-equal initializer dedupe.

Constants with the same dtype, shape and bytes are stored once; every
consumer reads the kept one. Candidates are grouped by (dtype, shape) first,
so only tensors that could be equal are hashed, and external weights are
hashed by streaming their bytes (never mapped whole). Equality is decided by a
BLAKE2b-256 digest of the bytes.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt._ir import ExternalValues, Model
from graphopt._pipeline import Pass, PassContext, PassResult
from graphopt.rewrite import remove_dead, replace_uses


def _digest(t: gs.Constant) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    v = t._values
    if isinstance(v, ExternalValues):
        for block in v.iter_bytes():
            h.update(block)
    elif isinstance(v, LazyValues) and v.tensor.HasField("raw_data"):
        h.update(v.tensor.raw_data)
    else:
        h.update(np.ascontiguousarray(t.values).tobytes())
    return h.digest()


class InitializerDedupe(Pass):
    name = "initializer-dedupe"
    summary = "store byte-equal initializers once"
    after = ("constant-folding",)
    before = ("dead-code-elimination",)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        boundary = {id(t) for t in graph.outputs} | {id(t) for t in graph.inputs}
        groups: dict[tuple, list[gs.Constant]] = defaultdict(list)
        for t in graph.tensors().values():
            if isinstance(t, gs.Constant) and id(t) not in boundary:
                groups[(str(t.dtype), tuple(t.shape))].append(t)
        removed = saved = 0
        for members in groups.values():
            if len(members) < 2:
                continue
            keep: dict[bytes, gs.Constant] = {}
            for t in members:
                d = _digest(t)
                if d not in keep:
                    keep[d] = t
                    continue
                replace_uses(graph, t, keep[d])
                removed += 1
                saved += int(getattr(t._values, "nbytes", 0) or np.asarray(t.values).nbytes)
        if removed:
            remove_dead(graph)
        return PassResult(removed > 0, {"removed": removed, "bytes_saved": saved})
