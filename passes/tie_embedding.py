"""Tie-embedding dedupe: one matrix stored once, even when an exporter stored it transposed.

Tied LLMs share one matrix between the embedding table (``Gather`` data, [V, H]) and
the LM head (``MatMul`` weight, [H, V]). torch's TorchScript exporter stores it twice,
the second copy transposed; a quantizer then quantizes the two copies differently and
the model silently disagrees with itself. This pass finds 2-D constants that are
exact transposes of each other (byte-equal after transposition), keeps the one used as
an embedding table (else the first), and feeds the other's consumers
``Transpose(kept, [1, 0])``. The quantize pass then sees one matrix and quantizes it
once for both uses. Byte-equal duplicates without transposition are the job of
``initializer-dedupe``.

Candidates are pairs of shapes (a, b) and (b, a). Each matrix gets a fingerprint, 16
elements at positions drawn from its shape (read at the transposed positions for the
(b, a) side), so only pairs whose fingerprints are equal are compared in full, streamed
in row blocks: a model with nothing tied costs one small read per weight, not one per
pair of same-shaped weights.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from graphopt._ir import Model, array_view, sample_elements
from graphopt._pipeline import Pass, PassContext, PassResult
from graphopt.rewrite import remove_dead, unique_name

_MIN_ELEMENTS = 1024
_ROWS = 4096


def _nbytes(t: gs.Constant) -> int:
    v = t._values
    return int(getattr(v, "nbytes", 0) or np.asarray(v).nbytes)


def is_transpose_of(a: gs.Constant, b: gs.Constant, samples: int = 64, views: dict | None = None) -> bool:
    """Whether b == a.T exactly (same dtype), checked on samples first, then in row blocks."""
    if a.dtype != b.dtype or len(a.shape) != 2 or tuple(b.shape) != tuple(a.shape)[::-1]:
        return False
    views = {} if views is None else views
    for t in (a, b):
        if id(t) not in views:
            views[id(t)] = array_view(t)
    va, vb = views[id(a)], views[id(b)]
    rng = np.random.default_rng(0)
    i = rng.integers(0, va.shape[0], samples)
    j = rng.integers(0, va.shape[1], samples)
    if not np.array_equal(va[i, j], vb[j, i]):
        return False
    for start in range(0, va.shape[0], _ROWS):
        if not np.array_equal(va[start:start + _ROWS], vb[:, start:start + _ROWS].T):
            return False
    return True


def _sample_positions(shape: tuple, samples: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(shape)
    return rng.integers(0, shape[0], samples), rng.integers(0, shape[1], samples)


def _fingerprint(t: gs.Constant, positions: tuple[np.ndarray, np.ndarray], transposed: bool) -> bytes:
    """Bytes of the sampled elements; ``transposed`` reads ``values.T`` at ``positions``, so a
    matrix and its transposed copy have the same fingerprint."""
    i, j = positions
    return (sample_elements(t, j, i) if transposed else sample_elements(t, i, j)).tobytes()


def _is_embedding(t: gs.Constant) -> bool:
    return any(n.op == "Gather" and n.inputs[0] is t for n in t.outputs)


class TieEmbeddingDedupe(Pass):
    name = "tie-embedding-dedupe"
    summary = "store tied (possibly transposed) weight copies once; both uses read one matrix"
    after = ("constant-folding", "initializer-dedupe")
    before = ("quantize", "dead-code-elimination")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        by_shape: dict[tuple, list[gs.Constant]] = defaultdict(list)
        for t in graph.tensors().values():
            if isinstance(t, gs.Constant) and len(t.shape) == 2 and int(np.prod(t.shape)) >= _MIN_ELEMENTS:
                by_shape[tuple(t.shape)].append(t)
        merged = saved = 0
        done: set[int] = set()
        views: dict[int, np.ndarray] = {}
        outputs = {id(t) for t in graph.outputs}
        prints: dict[tuple, dict[int, bytes]] = {}  # (shape, transposed) -> id -> fingerprint

        def fingerprints(shape: tuple, transposed: bool) -> dict[int, bytes]:
            key = (shape, transposed)
            if key not in prints:  # positions in the (rows, cols) frame of `shape`, or of its transpose
                frame = shape[::-1] if transposed else shape
                positions = _sample_positions(frame)
                result = {}
                for t in by_shape[shape]:
                    result[id(t)] = _fingerprint(t, positions, transposed)
                prints[key] = result
            return prints[key]

        for shape, group in list(by_shape.items()):
            partners = by_shape.get(shape[::-1], [])
            if shape[0] == shape[1]:
                partners = group
            if not partners:
                continue
            mine, theirs = fingerprints(shape, False), fingerprints(shape[::-1], True)
            for a in group:
                for b in partners:
                    if a is b or id(a) in done or id(b) in done or id(a) in outputs or id(b) in outputs:
                        continue
                    if mine[id(a)] != theirs[id(b)] or not is_transpose_of(a, b, views=views):
                        continue
                    keep, drop = (b, a) if _is_embedding(b) and not _is_embedding(a) else (a, b)
                    self._rewire(graph, keep, drop)
                    done |= {id(a), id(b)}
                    merged += 1
                    saved += _nbytes(drop)
        if merged:
            remove_dead(graph)
        return PassResult(merged > 0, {"tied": merged, "bytes_saved": saved})

    @staticmethod
    def _rewire(graph: gs.Graph, keep: gs.Constant, drop: gs.Constant) -> None:
        out = gs.Variable(unique_name(graph, f"{keep.name}_T"), keep.dtype, list(keep.shape)[::-1])
        node = gs.Node("Transpose", unique_name(graph, f"Transpose_{keep.name}"), attrs={"perm": [1, 0]},
                       inputs=[keep], outputs=[out])
        node.meta = {"graphopt.rule": "tie-transposed"}
        graph.nodes.append(node)
        for consumer in list(drop.outputs):
            consumer.inputs = [out if t is drop else t for t in consumer.inputs]
