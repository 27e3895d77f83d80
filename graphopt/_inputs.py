"""Valid inputs for a decoder graph, built from the graph itself.

Recognises the Hugging Face / optimum I/O names (``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.N.key|value``) by
position of their dimensions, not by the names exporters give symbolic dims
("batch", "s53", "past_sequence_length", ...). Token ids stay inside the
vocabulary (read off the embedding ``Gather`` or the logits width); masks,
positions and KV-cache lengths are consistent with one another; with
``left_pad`` the second row of the batch is left-padded, which exercises the
padding path most optimizers get wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt._ir import Model

PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


@dataclass
class InputSpec:
    batch: int = 2
    seq: int = 8
    past: int = 0
    left_pad: int = 2  # leading masked tokens in the last row (0: no padding)
    seed: int = 0


def has_kv_cache(model: Model) -> bool:
    return any(PAST_RE.match(t.name) for t in model.graph.inputs)


def vocab_size(model: Model) -> int | None:
    """Rows of the embedding table that input_ids index, else the logits width."""
    ids = next((t for t in model.graph.inputs if t.name == "input_ids"), None)
    frontier = [ids] if ids is not None else []
    seen = set()
    while frontier:
        t = frontier.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        for node in t.outputs:
            if node.op == "Gather" and len(node.inputs) > 1 and node.inputs[1] is t and \
                    isinstance(node.inputs[0], gs.Constant):
                return int(node.inputs[0].shape[0])
            if node.op == "DequantizeLinear":
                continue
            if node.op in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"):
                frontier.extend(node.outputs[:1])
    logits = next((t for t in model.graph.outputs if t.name == "logits"), None)
    if logits is not None and logits.shape and isinstance(logits.shape[-1], int):
        return int(logits.shape[-1])
    return None


def _np_dtype(t: gs.Tensor, default=np.float32) -> np.dtype:
    try:
        return np.dtype(t.dtype) if t.dtype is not None else np.dtype(default)
    except TypeError:
        return np.dtype(default)


def build_inputs(model: Model, spec: InputSpec | None = None) -> dict[str, np.ndarray]:
    """Feeds for every graph input of ``model``."""
    spec = spec or InputSpec()
    rng = np.random.default_rng(spec.seed)
    b, s, p = spec.batch, spec.seq, spec.past if has_kv_cache(model) else 0
    pad = min(spec.left_pad, s - 1) if b > 1 else 0
    mask = np.ones((b, p + s), dtype=np.int64)
    if pad:
        mask[-1, : p + pad] = 0  # the last row's prompt starts `pad` tokens late (its past is padding too)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, p:]
    vocab = vocab_size(model) or 100
    feeds: dict[str, np.ndarray] = {}
    for t in model.graph.inputs:
        dtype = _np_dtype(t, np.int64 if t.name in ("input_ids", "attention_mask", "position_ids") else np.float32)
        if t.name == "input_ids":
            feeds[t.name] = rng.integers(0, vocab, size=(b, s)).astype(dtype)
        elif t.name == "attention_mask":
            feeds[t.name] = mask.astype(dtype)
        elif t.name == "position_ids":
            feeds[t.name] = positions.astype(dtype)
        elif PAST_RE.match(t.name):
            shape = list(t.shape or [])
            dims = [b, shape[1], p, shape[3]] if len(shape) == 4 else [b, p]
            dims = [d if isinstance(d, int) else 1 for d in dims]
            feeds[t.name] = (rng.standard_normal(dims) * 0.5).astype(dtype)
        else:
            shape = [d if isinstance(d, int) and d >= 0 else 1 for d in (t.shape or [])]
            if dtype.kind == "f":
                feeds[t.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                feeds[t.name] = np.ones(shape, dtype=bool)
            else:
                feeds[t.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds
