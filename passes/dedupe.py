"""Byte-equal initializer dedupe.

Constants with the same dtype, shape and bytes are stored once; every
consumer reads the kept one. Candidates are grouped by (dtype, shape) first,
so only tensors that could be equal are hashed, and external weights are
hashed by streaming their bytes (never mapped whole); a digest of the first
64 KiB rules out most pairs before any tensor is read in full. Equality is
decided by a BLAKE2b-256 digest of all bytes.
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


_PREFIX = 64 * 1024


def _blocks(t: gs.Constant, limit: int | None = None):
    """The tensor's bytes in blocks, read from wherever they live (up to ``limit`` bytes)."""
    v = t._values
    if isinstance(v, ExternalValues):
        left = limit
        for block in v.iter_bytes(chunk=min(limit or 2**26, 2**26)):
            if left is not None:
                block, left = block[:left], left - len(block)
            yield block
            if left is not None and left <= 0:
                return
    elif isinstance(v, LazyValues) and v.tensor.HasField("raw_data"):
        yield v.tensor.raw_data[:limit] if limit else v.tensor.raw_data
    else:
        data = np.ascontiguousarray(t.values).tobytes()
        yield data[:limit] if limit else data


def _digest(t: gs.Constant, limit: int | None = None) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    for block in _blocks(t, limit):
        h.update(block)
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
            # Cheap first: tensors whose first 64 KiB differ cannot be equal, so most
            # weights are never read whole.
            by_prefix: dict[bytes, list[gs.Constant]] = defaultdict(list)
            for t in members:
                by_prefix[_digest(t, _PREFIX)].append(t)
            candidates = [t for group in by_prefix.values() if len(group) > 1 for t in group]
            keep: dict[bytes, gs.Constant] = {}
            for t in candidates:
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
