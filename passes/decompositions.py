"""Decompositions of the fused ops other optimizers emit, in standard ONNX ops.

onnxruntime's transformers optimizer and quantizer write ``com.microsoft``
contrib ops (and ``SimplifiedLayerNormalization`` in the default domain) that
only onnxruntime runs. Each function here rewrites one such node into standard
ops, preferring graphopt's own fused forms (``RMSNormalization``-23,
``RotaryEmbedding``-23, ``Attention``-23, ``LayerNormalization``-17, ``Gelu``-20,
blocked ``DequantizeLinear``-21 → ``MatMul``), so a target that runs those keeps
them fused. Legalization splits those further when the target lacks them, or
when the model's opset import is older than the op (the ONNX function body is
then converted down to the model's opset), so every decomposition ends in ops
any backend runs.

A decomposition returns the new nodes, reading the node's input tensors and
producing its output tensors, or raises :class:`CannotDecompose` naming the
attribute or input it does not cover (quantized KV caches, packed batching …);
legalization reports that instead of running something wrong. Each is checked
against onnxruntime's own kernel on random inputs in
``tests/legalize/test_contrib_decompositions.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from graphopt._expand import CannotDecompose, onnx_dtype
from graphopt._ir import Model

MS = "com.microsoft"
Tensor = gs.Tensor


class Builder:
    """Collects the nodes of one decomposition; new tensors are named after the node."""

    def __init__(self, node: gs.Node, model: Model):
        self.node = node
        self.model = model
        self.opset = model.opset("") or 17
        self.nodes: list[gs.Node] = []
        self.prefix = node.name or node.op
        self._count = 0

    # ------------------------------------------------------------- basics
    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def const(self, value: Any, dtype: Any = None, hint: str = "c") -> gs.Constant:
        return gs.Constant(self._name(hint), np.ascontiguousarray(np.asarray(value, dtype=dtype)))

    def ints(self, *values: int) -> gs.Constant:
        return self.const(np.array(values, dtype=np.int64), hint="i")

    def op(self, op: str, inputs: Sequence[Tensor | None], attrs: dict | None = None, *,
           outputs: int | Sequence[Tensor | None] = 1, dtype: Any = None, domain: str = "") -> Any:
        """Add a node. ``outputs``: how many new tensors, or the tensors to produce (the node's own).
        Returns the output tensor (one output) or the list of them."""
        ins = [t if t is not None else gs.Variable.empty() for t in inputs]
        if isinstance(outputs, int):
            outs = [gs.Variable(self._name(op.lower()), dtype=dtype) for _ in range(outputs)]
        else:
            outs = [t if t is not None else gs.Variable.empty() for t in outputs]
        self.nodes.append(gs.Node(op, name=self._name(op), attrs=dict(attrs or {}), inputs=ins, outputs=outs,
                                  domain=domain))
        return outs[0] if len(outs) == 1 else outs

    # ------------------------------------------------------ opset-aware ops
    def unsqueeze(self, x: Tensor, axes: Sequence[int]) -> Tensor:
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.ints(*axes)], dtype=x.dtype)
        return self.op("Unsqueeze", [x], {"axes": list(axes)}, dtype=x.dtype)

    def squeeze(self, x: Tensor, axes: Sequence[int]) -> Tensor:
        if self.opset >= 13:
            return self.op("Squeeze", [x, self.ints(*axes)], dtype=x.dtype)
        return self.op("Squeeze", [x], {"axes": list(axes)}, dtype=x.dtype)

    def reduce_mean(self, x: Tensor, axes: Sequence[int]) -> Tensor:
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.ints(*axes)], {"keepdims": 1}, dtype=x.dtype)
        return self.op("ReduceMean", [x], {"axes": list(axes), "keepdims": 1}, dtype=x.dtype)

    def split(self, x: Tensor, sizes: Sequence[int], axis: int) -> list[Tensor]:
        if self.opset >= 13:
            return self.op("Split", [x, self.ints(*sizes)], {"axis": axis}, outputs=len(sizes), dtype=x.dtype)
        return self.op("Split", [x], {"axis": axis, "split": list(sizes)}, outputs=len(sizes), dtype=x.dtype)

    def dim(self, x: Tensor, axis: int) -> Tensor:
        """``x.shape[axis]`` as a 1-element int64 tensor."""
        if self.opset >= 15:
            attrs = {"start": axis} if axis == -1 else {"start": axis, "end": axis + 1}
            return self.op("Shape", [x], attrs, dtype=np.int64)
        shape = self.op("Shape", [x], dtype=np.int64)
        end = 2**62 if axis == -1 else axis + 1
        return self.op("Slice", [shape, self.ints(axis), self.ints(end)], dtype=np.int64)

    def cast(self, x: Tensor, to: int) -> Tensor:
        return self.op("Cast", [x], {"to": int(to)})


# ----------------------------------------------------------------- helpers
def _input(node: gs.Node, i: int) -> Tensor | None:
    """The node's i-th input, None when absent (missing or empty name)."""
    return node.inputs[i] if i < len(node.inputs) and node.inputs[i].name else None


def _output(node: gs.Node, i: int) -> Tensor | None:
    return node.outputs[i] if i < len(node.outputs) and node.outputs[i].name else None


def _used(node: gs.Node, i: int, graph_outputs: set[int] | None = None) -> bool:
    t = _output(node, i)
    return t is not None and (bool(t.outputs) or (graph_outputs is not None and id(t) in graph_outputs))


def _used_outputs(node: gs.Node, model: Model) -> list[bool]:
    graph_outputs = {id(t) for t in model.graph.outputs}
    return [_used(node, i, graph_outputs) for i in range(len(node.outputs))]


def _rank(t: Tensor) -> int | None:
    return len(t.shape) if t.shape is not None else None


def _static(t: Tensor, axis: int) -> int | None:
    if t.shape is None or not (-len(t.shape) <= axis < len(t.shape)):
        return None
    d = t.shape[axis]
    return int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None


def _refuse_if(cond: bool, why: str) -> None:
    if cond:
        raise CannotDecompose(why)


def _values(t: Tensor | None) -> np.ndarray | None:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def _float_dtype(t: Tensor) -> Any:
    return t.dtype if t.dtype is not None else np.float32


# ----------------------------------------------------------------- norms
def _inv_std_var(b: Builder, x: Tensor, eps: float, axis: int, mean_of_squares: bool,
                 out: Tensor, stash: int = TensorProto.FLOAT) -> None:
    """``1 / sqrt(var + eps)`` (or ``mean(x²)`` for RMS norms) over ``axis..rank-1`` into ``out``."""
    rank = _rank(x)
    _refuse_if(rank is None, "the rank of the input is unknown, needed for the inv_std_var output")
    axes = list(range(axis % rank, rank))
    xs = b.cast(x, stash)
    if mean_of_squares:
        var = b.reduce_mean(b.op("Mul", [xs, xs]), axes)
    else:
        d = b.op("Sub", [xs, b.reduce_mean(xs, axes)])
        var = b.reduce_mean(b.op("Mul", [d, d]), axes)
    eps_c = b.const(eps, helper.tensor_dtype_to_np_dtype(stash))
    b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, eps_c])])], outputs=[out])


def simplified_layer_norm(node: gs.Node, model: Model) -> list[gs.Node]:
    """onnxruntime's ``SimplifiedLayerNormalization`` (an RMS norm) → ``RMSNormalization``."""
    b = Builder(node, model)
    axis, eps = int(node.attrs.get("axis", -1)), float(node.attrs.get("epsilon", 1e-5))
    stash = int(node.attrs.get("stash_type", 1))
    x, scale = node.inputs[0], node.inputs[1]
    b.op("RMSNormalization", [x, scale], {"axis": axis, "epsilon": eps, "stash_type": stash},
         outputs=[node.outputs[0]])
    if _used_outputs(node, model)[1:2] == [True]:
        _inv_std_var(b, x, eps, axis, True, node.outputs[1], stash)
    return b.nodes


def _skip_sum(b: Builder, node: gs.Node, bias_index: int) -> Tensor:
    """``input + skip (+ bias)``, written to the node's input_skip_bias_sum output when it is named."""
    x, skip, bias = node.inputs[0], node.inputs[1], _input(node, bias_index)
    sum_out = _output(node, 3)
    if bias is None:
        return b.op("Add", [x, skip], outputs=[sum_out] if sum_out is not None else 1, dtype=x.dtype)
    s = b.op("Add", [x, skip], dtype=x.dtype)
    return b.op("Add", [s, bias], outputs=[sum_out] if sum_out is not None else 1, dtype=x.dtype)


def skip_simplified_layer_norm(node: gs.Node, model: Model) -> list[gs.Node]:
    """``SkipSimplifiedLayerNormalization``: ``RMSNormalization(input + skip (+ bias), gamma)``."""
    used = _used_outputs(node, model) + [False] * 4
    _refuse_if(used[1], "its 'mean' output is used (an RMS norm has no mean)")
    b = Builder(node, model)
    eps = float(node.attrs.get("epsilon", 1e-12))
    s = _skip_sum(b, node, 3)
    b.op("RMSNormalization", [s, node.inputs[2]], {"axis": -1, "epsilon": eps}, outputs=[node.outputs[0]])
    if used[2]:
        _inv_std_var(b, s, eps, -1, True, node.outputs[2])
    return b.nodes


def skip_layer_norm(node: gs.Node, model: Model) -> list[gs.Node]:
    """``SkipLayerNormalization``: ``LayerNormalization(input + skip (+ bias), gamma, beta)``."""
    b = Builder(node, model)
    eps = float(node.attrs.get("epsilon", 1e-12))
    s = _skip_sum(b, node, 4)
    beta = _input(node, 3)
    outs = [node.outputs[0], _output(node, 1), _output(node, 2)]
    while outs and outs[-1] is None:
        outs.pop()
    b.op("LayerNormalization", [s, node.inputs[2]] + ([beta] if beta is not None else []),
         {"axis": -1, "epsilon": eps}, outputs=outs)
    return b.nodes


# ---------------------------------------------------------------- gelus
def fast_gelu(node: gs.Node, model: Model) -> list[gs.Node]:
    """``FastGelu(X, bias)``: the tanh approximation, ``Gelu(X + bias, approximate="tanh")``."""
    b = Builder(node, model)
    x, bias = node.inputs[0], _input(node, 1)
    if bias is not None:
        x = b.op("Add", [x, bias], dtype=x.dtype)
    b.op("Gelu", [x], {"approximate": "tanh"}, outputs=[node.outputs[0]])
    return b.nodes


def bias_gelu(node: gs.Node, model: Model) -> list[gs.Node]:
    """``BiasGelu(A, B)``: ``Gelu(A + B)`` (exact, erf)."""
    b = Builder(node, model)
    s = b.op("Add", [node.inputs[0], node.inputs[1]], dtype=node.inputs[0].dtype)
    b.op("Gelu", [s], outputs=[node.outputs[0]])
    return b.nodes


def ms_gelu(node: gs.Node, model: Model) -> list[gs.Node]:
    """``com.microsoft.Gelu``: the exact ``Gelu``."""
    b = Builder(node, model)
    b.op("Gelu", [node.inputs[0]], outputs=[node.outputs[0]])
    return b.nodes


def quick_gelu(node: gs.Node, model: Model) -> list[gs.Node]:
    """``QuickGelu(X) = X · Sigmoid(alpha · X)``."""
    b = Builder(node, model)
    x = node.inputs[0]
    alpha = float(node.attrs.get("alpha", 1.702))
    z = x if alpha == 1.0 else b.op("Mul", [x, b.const(alpha, _float_dtype(x))], dtype=x.dtype)
    b.op("Mul", [x, b.op("Sigmoid", [z], dtype=x.dtype)], outputs=[node.outputs[0]])
    return b.nodes


# --------------------------------------------------------------- rotary
def _positions(b: Builder, pos: Tensor, x: Tensor, seq_axis: int) -> Tensor:
    """Position ids of shape (batch, seq): as given, or ``offset + arange(seq)`` for the 1-element form."""
    if _rank(pos) == 2:
        return pos if onnx_dtype(pos) == TensorProto.INT64 else b.cast(pos, TensorProto.INT64)
    _refuse_if(_rank(pos) != 1, "position_ids must be 1-D (an offset) or 2-D (batch, sequence)")
    offset = b.cast(b.op("Gather", [pos, b.const(0, np.int64)], {"axis": 0}), TensorProto.INT64)
    seq = b.squeeze(b.dim(x, seq_axis), [0])
    ids = b.op("Add", [b.op("Range", [b.const(0, np.int64), seq, b.const(1, np.int64)]), offset])
    shape = b.op("Concat", [b.dim(x, 0), b.unsqueeze(seq, [0])], {"axis": 0})
    return b.op("Expand", [b.unsqueeze(ids, [0]), shape], dtype=np.int64)


def ms_rotary_embedding(node: gs.Node, model: Model) -> list[gs.Node]:
    """``com.microsoft.RotaryEmbedding`` → ``RotaryEmbedding``-23 (same layouts; a 1-element
    position_ids is an offset and becomes explicit (batch, sequence) ids)."""
    attrs = node.attrs
    _refuse_if(int(attrs.get("is_packed_batching", 0)) != 0, "is_packed_batching=1 is not supported")
    _refuse_if(float(attrs.get("scale", 1.0)) != 1.0, f"scale={attrs.get('scale')} is not supported")
    x, pos, cos, sin = node.inputs[:4]
    rank = _rank(x)
    _refuse_if(rank not in (3, 4), "the rank of the input must be known (3 or 4)")
    b = Builder(node, model)
    new_attrs = {"interleaved": int(attrs.get("interleaved", 0))}
    rotary_dim = int(attrs.get("rotary_embedding_dim", 0))
    if rotary_dim:
        new_attrs["rotary_embedding_dim"] = rotary_dim
    if rank == 3:
        heads = int(attrs.get("num_heads", 0))
        if not heads:
            hidden, half = _static(x, 2), _static(cos, 1)
            _refuse_if(hidden is None or not half, "num_heads is not given and the hidden size or the cache "
                                                   "width is not static")
            heads = hidden // (2 * half)
        new_attrs["num_heads"] = heads
    ids = _positions(b, pos, x, 1 if rank == 3 else 2)
    b.op("RotaryEmbedding", [x, cos, sin, ids], new_attrs, outputs=[node.outputs[0]])
    return b.nodes


# ------------------------------------------------------------- attention
def _heads_first(b: Builder, x: Tensor, heads: int) -> Tensor:
    """(batch, seq, heads·head) → (batch, heads, seq, head)."""
    r = b.op("Reshape", [x, b.ints(0, 0, heads, -1)], dtype=x.dtype)
    return b.op("Transpose", [r], {"perm": [0, 2, 1, 3]}, dtype=x.dtype)


def _heads_last(b: Builder, y: Tensor, out: Tensor) -> None:
    """(batch, heads, seq, head) → (batch, seq, heads·head) into ``out``."""
    t = b.op("Transpose", [y], {"perm": [0, 2, 1, 3]}, dtype=y.dtype)
    b.op("Reshape", [t, b.ints(0, 0, -1)], outputs=[out])


def _row_col(b: Builder, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """``arange(rows)`` as a column (rows, 1) and ``arange(cols)`` as a row (1, cols), int64 scalars in."""
    zero, one = b.const(0, np.int64), b.const(1, np.int64)
    i = b.unsqueeze(b.op("Range", [zero, rows, one], dtype=np.int64), [1])
    j = b.unsqueeze(b.op("Range", [zero, cols, one], dtype=np.int64), [0])
    return i, j


def _scalar(b: Builder, t: Tensor) -> Tensor:
    """A 1-element tensor as an int64 scalar."""
    return b.squeeze(b.cast(t, TensorProto.INT64), [0]) if _rank(t) == 1 else b.cast(t, TensorProto.INT64)


def group_query_attention(node: gs.Node, model: Model) -> list[gs.Node]:
    """``GroupQueryAttention`` → (``RotaryEmbedding``-23 →) ``Attention``-23 with an explicit mask.

    The present KV cache is the past one with the new keys written at each batch
    entry's own past length (``seqlens_k + 1 - sequence_length``), as onnxruntime does,
    so ragged batches are exact too; the mask allows key j for query i of entry b
    when j < seqlens_k[b] + 1, and (causal) j ≤ past_b + i, and (local window W)
    j > past_b + i - W.
    """
    a = node.attrs
    n_in = len(node.inputs)
    for i, what in ((11, "head_sink"), (12, "k_scale"), (13, "v_scale"), (14, "q_norm_weight"),
                    (15, "k_norm_weight"), (16, "query_seqlens")):
        _refuse_if(i < n_in and _input(node, i) is not None, f"the {what} input is not supported")
    for key, default in (("smooth_softmax", -1), ("qk_output", 0), ("sliding_window_cache", 0)):
        _refuse_if(int(a.get(key, default)) not in (default, 0), f"{key}={a.get(key)} is not supported")
    for key in ("k_quant_type", "v_quant_type"):
        value = a.get(key, "NONE")
        value = value.decode() if isinstance(value, bytes) else value
        _refuse_if(value != "NONE", f"{key}={value} (a quantized KV cache) is not supported")
    _refuse_if(_used(node, 3), "the output_qk output is not supported")
    q, k, v = node.inputs[0], _input(node, 1), _input(node, 2)
    past_k, past_v = _input(node, 3), _input(node, 4)
    seqlens_k, total = node.inputs[5], node.inputs[6]
    cos, sin, position_ids, bias = _input(node, 7), _input(node, 8), _input(node, 9), _input(node, 10)
    heads, kv_heads = int(a["num_heads"]), int(a["kv_num_heads"])
    causal = int(a.get("causal", 1))
    window = int(a.get("local_window_size", -1))
    softcap = float(a.get("softcap", 0.0))
    b = Builder(node, model)
    if k is None:  # packed QKV
        width = _static(q, 2)
        _refuse_if(width is None, "packed QKV needs a static hidden size")
        head = width // (heads + 2 * kv_heads)
        q, k, v = b.split(q, [heads * head, kv_heads * head, kv_heads * head], 2)
    seq = _scalar(b, b.dim(q, 1))
    total_len = b.op("Add", [_scalar(b, seqlens_k), b.const(1, np.int64)])  # (batch,), int64
    past_len = b.op("Sub", [total_len, seq], dtype=np.int64)  # (batch,)
    if int(a.get("do_rotary", 0)):
        _refuse_if(cos is None or sin is None, "do_rotary=1 needs cos_cache and sin_cache")
        if position_ids is None:
            i = b.op("Range", [b.const(0, np.int64), seq, b.const(1, np.int64)], dtype=np.int64)
            position_ids = b.op("Add", [b.unsqueeze(past_len, [1]), b.unsqueeze(i, [0])], dtype=np.int64)
        rot = {"interleaved": int(a.get("rotary_interleaved", 0))}
        half = _static(cos, 1)
        if half:
            rot["rotary_embedding_dim"] = 2 * half
        q = b.op("RotaryEmbedding", [q, cos, sin, position_ids], dict(rot, num_heads=heads), dtype=q.dtype)
        k = b.op("RotaryEmbedding", [k, cos, sin, position_ids], dict(rot, num_heads=kv_heads), dtype=k.dtype)
    q4, k4, v4 = _heads_first(b, q, heads), _heads_first(b, k, kv_heads), _heads_first(b, v, kv_heads)

    # present: row j of entry b is past[j] below past_b, else new[j - past_b]
    if past_k is not None:
        _refuse_if(past_v is None, "past_key without past_value")
        p = _scalar(b, b.dim(past_k, 2))
        present_len = b.op("Max", [_scalar(b, total), p], dtype=np.int64)
        last = b.op("Sub", [b.op("Add", [p, seq]), b.const(1, np.int64)])
        j = b.unsqueeze(b.op("Range", [b.const(0, np.int64), present_len, b.const(1, np.int64)]), [0])  # (1, L)
        pb = b.unsqueeze(past_len, [1])  # (batch, 1)
        from_new = b.op("Min", [b.op("Add", [p, b.op("Sub", [j, pb])]), last])
        index = b.op("Where", [b.op("Less", [j, pb]), j, from_new], dtype=np.int64)  # (batch, L)
        index = b.unsqueeze(index, [1, 3])  # (batch, 1, L, 1)
        presents = []
        for past, new in ((past_k, k4), (past_v, v4)):
            both = b.op("Concat", [past, new], {"axis": 2}, dtype=new.dtype)
            full = b.op("Expand", [index, b.op("Concat", [b.dim(both, 0), b.dim(both, 1), b.ints(1),
                                                        b.dim(both, 3)], {"axis": 0})], dtype=np.int64)
            presents.append((both, full))
        key_len = present_len
        outs = [_output(node, 1), _output(node, 2)]
        k_all = b.op("GatherElements", [presents[0][0], presents[0][1]], {"axis": 2},
                     outputs=[outs[0]] if outs[0] is not None else 1)
        v_all = b.op("GatherElements", [presents[1][0], presents[1][1]], {"axis": 2},
                     outputs=[outs[1]] if outs[1] is not None else 1)
    else:
        k_all, v_all = k4, v4
        key_len = _scalar(b, b.dim(k4, 2))
        for i, t in ((1, k4), (2, v4)):
            if _output(node, i) is not None:
                b.op("Identity", [t], outputs=[node.outputs[i]])

    # mask (batch, 1, seq, L): key j allowed for query i of entry b
    i, j = _row_col(b, seq, key_len)  # (S, 1), (1, L)
    i3, j3 = b.unsqueeze(i, [0]), b.unsqueeze(j, [0])  # (1, S, 1), (1, 1, L)
    tb = b.unsqueeze(total_len, [1, 2])  # (batch, 1, 1)
    allowed = b.op("Less", [j3, tb])
    pos = b.op("Add", [b.unsqueeze(past_len, [1, 2]), i3])  # absolute position of query i, (batch, S, 1)
    if causal:
        allowed = b.op("And", [allowed, b.op("LessOrEqual", [j3, pos])])
    if window > 0:
        allowed = b.op("And", [allowed, b.op("Greater", [j3, b.op("Sub", [pos, b.const(window, np.int64)])])])
    mask = b.unsqueeze(allowed, [1])  # (batch, 1, S, L)
    if bias is not None:
        neg = b.const(-np.inf, _float_dtype(q))
        mask = b.op("Where", [mask, bias, neg], dtype=q.dtype)
    attn = {"q_num_heads": heads, "kv_num_heads": kv_heads}
    if "scale" in a and float(a["scale"]) != 0.0:
        attn["scale"] = float(a["scale"])
    if softcap:
        attn["softcap"] = softcap
    y = b.op("Attention", [q4, k_all, v_all, mask], attn, dtype=q.dtype)
    _heads_last(b, y, node.outputs[0])
    return b.nodes


def multi_head_attention(node: gs.Node, model: Model) -> list[gs.Node]:
    """``MultiHeadAttention`` (3-D query, 3-D or 4-D key/value) → ``Attention``-23.

    Padding and causal masks add ``mask_filter_value`` (as onnxruntime does, so even a
    fully masked row matches); causal attention is aligned bottom-right with the past.
    """
    a = node.attrs
    heads = int(a["num_heads"])
    filter_value = float(a.get("mask_filter_value", -10000.0))
    q, k, v = node.inputs[0], _input(node, 1), _input(node, 2)
    bias, pad_mask, attn_bias = _input(node, 3), _input(node, 4), _input(node, 5)
    past_k, past_v = _input(node, 6), _input(node, 7)
    _refuse_if(_rank(q) != 3, "only a 3-D query (batch, sequence, hidden) is supported, not packed QKV")
    _refuse_if(k is None or v is None, "key and value must be given (packed QKV is not supported)")
    _refuse_if(_input(node, 8) is not None or _input(node, 9) is not None,
               "past_sequence_length / cache_indirection (buffer sharing, beam search) are not supported")
    _refuse_if(_used(node, 3), "the qk output is not supported")
    kv_rank = _rank(k)
    _refuse_if(kv_rank not in (3, 4) or _rank(v) != kv_rank, "key and value must both be 3-D or 4-D")
    b = Builder(node, model)
    if bias is not None:
        _refuse_if(kv_rank == 4, "a bias with 4-D key/value is not supported")
        width = _static(bias, 0)
        _refuse_if(width is None or width % 3, "the bias width must be static (3 × hidden)")
        bq, bk, bv = b.split(bias, [width // 3] * 3, 0)
        q, k, v = (b.op("Add", [t, c], dtype=t.dtype) for t, c in ((q, bq), (k, bk), (v, bv)))
    q4 = _heads_first(b, q, heads)
    k4, v4 = (_heads_first(b, k, heads), _heads_first(b, v, heads)) if kv_rank == 3 else (k, v)
    if past_k is not None:
        _refuse_if(kv_rank == 4, "past key/value with 4-D key/value is not supported")
        k4 = b.op("Concat", [past_k, k4], {"axis": 2}, outputs=[_output(node, 1)] if _output(node, 1) else 1)
        v4 = b.op("Concat", [past_v, v4], {"axis": 2}, outputs=[_output(node, 2)] if _output(node, 2) else 1)
    else:
        for i, t in ((1, k4), (2, v4)):
            if _output(node, i) is not None:
                b.op("Identity", [t], outputs=[node.outputs[i]])
    dtype = _float_dtype(q)
    terms = []
    causal = int(a.get("unidirectional", 0))
    if pad_mask is not None:
        rank = _rank(pad_mask)
        _refuse_if(rank not in (2, 3), "key_padding_mask must be 2-D (batch, total) or 3-D (batch, seq, total); "
                                       "the lengths forms are not supported")
        keep = b.op("Greater", [pad_mask, b.const(0, helper.tensor_dtype_to_np_dtype(onnx_dtype(pad_mask) or 6))])
        keep = b.unsqueeze(keep, [1, 2] if rank == 2 else [1])  # (batch, 1, S|1, T)
        terms.append(keep)
    if causal:
        seq, total = _scalar(b, b.dim(q4, 2)), _scalar(b, b.dim(k4, 2))
        i, j = _row_col(b, seq, total)
        offset = b.op("Sub", [total, seq])
        terms.append(b.op("LessOrEqual", [j, b.op("Add", [i, offset])]))  # (S, T)
    mask = None
    if terms:
        keep = terms[0] if len(terms) == 1 else b.op("And", terms)
        mask = b.op("Where", [keep, b.const(0.0, dtype), b.const(filter_value, dtype)], dtype=dtype)
    if attn_bias is not None:
        mask = attn_bias if mask is None else b.op("Add", [mask, attn_bias], dtype=dtype)
    attrs = {"scale": float(a["scale"])} if "scale" in a and float(a["scale"]) != 0.0 else {}
    y = b.op("Attention", [q4, k4, v4] + ([mask] if mask is not None else []), attrs, dtype=q.dtype)
    _heads_last(b, y, node.outputs[0])
    return b.nodes


# ------------------------------------------------------------ quantization
def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 bytes holding ``8 // bits`` values each, low bits first → the first ``count`` values."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).reshape((1,) * packed.ndim + (per,))
    values = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return values.reshape(packed.shape[:-1] + (-1,))[..., :count]


def matmul_nbits(node: gs.Node, model: Model) -> list[gs.Node]:
    """``MatMulNBits`` → ``DequantizeLinear``-21 (blocked, UINT4/UINT8 weight stored (K, N)) → ``MatMul``.

    The weight is repacked once, at legalization. Below opset 21, for 2-bit weights and
    for float zero points it is stored unpacked as uint8 (K, N) and dequantized with
    Cast/Sub/Mul per block instead.
    """
    a = node.attrs
    bits, block = int(a.get("bits", 4)), int(a["block_size"])
    big_k, big_n = int(a["K"]), int(a["N"])
    _refuse_if(bits not in (2, 4, 8), f"bits={bits} is not supported")
    _refuse_if(int(a.get("weight_prepacked", 0)) != 0, "prepacked weights are not supported")
    _refuse_if(_input(node, 4) is not None, "the g_idx input (act-order) is not supported")
    qb = _values(node.inputs[1])
    _refuse_if(qb is None, "the quantized weight B must be a constant")
    blocks = -(-big_k // block)
    _refuse_if(qb.size != big_n * blocks * (block * bits // 8),
               f"B has {qb.size} bytes, expected N·ceil(K/block)·block·bits/8 = {big_n * blocks * block * bits // 8}")
    b = Builder(node, model)
    x, scales, zp_t, bias = node.inputs[0], node.inputs[2], _input(node, 3), _input(node, 5)
    fdt = _float_dtype(x)
    q = _unpack(qb.reshape(big_n, blocks, block * bits // 8).astype(np.uint8), bits, block)  # (N, blocks, block)
    q = q.reshape(big_n, blocks * block).T  # (blocks·block, N)
    s = b.op("Transpose", [b.op("Reshape", [scales, b.ints(big_n, blocks)])], {"perm": [1, 0]}, dtype=fdt)
    zp = _values(zp_t)
    float_zp = zp_t is not None and onnx_dtype(zp_t) != TensorProto.UINT8
    _refuse_if(zp_t is not None and zp is None and not float_zp, "packed zero points must be a constant")
    if zp is not None and not float_zp:
        zp = _unpack(zp.reshape(big_n, -1).astype(np.uint8), bits, blocks).T  # (blocks, N)
    elif zp_t is None:
        zp = np.full((blocks, big_n), 1 << (bits - 1), np.uint8)
    if b.opset >= 21 and bits in (4, 8) and not float_zp:
        import ml_dtypes

        qtype = ml_dtypes.uint4 if bits == 4 else np.uint8
        w = b.const(q[:big_k].astype(qtype), hint="weight")
        z = b.const(zp.astype(qtype), hint="zero_point")
        deq = b.op("DequantizeLinear", [w, s, z], {"axis": 0, "block_size": block}, dtype=fdt)
    else:
        w = b.const(q.astype(np.uint8), hint="weight")  # (blocks·block, N), unpacked
        wf = b.op("Reshape", [b.cast(w, onnx_dtype(x) or TensorProto.FLOAT), b.ints(blocks, block, big_n)])
        if float_zp:
            z = b.op("Transpose", [b.op("Reshape", [zp_t, b.ints(big_n, blocks)])], {"perm": [1, 0]})
        else:
            z = b.const(zp.astype(np.dtype(fdt)), hint="zero_point")
        centered = b.op("Sub", [wf, b.unsqueeze(z, [1])])
        deq = b.op("Reshape", [b.op("Mul", [centered, b.unsqueeze(s, [1])]), b.ints(blocks * block, big_n)])
        if blocks * block != big_k:
            deq = b.op("Slice", [deq, b.ints(0), b.ints(big_k), b.ints(0)])
    if bias is None:
        b.op("MatMul", [x, deq], outputs=[node.outputs[0]])
    else:
        b.op("Add", [b.op("MatMul", [x, deq], dtype=fdt), bias], outputs=[node.outputs[0]])
    return b.nodes


# ------------------------------------------- standard fused ops graphopt emits
# The ONNX function bodies of RotaryEmbedding and Attention are general (interleaving,
# partial rotation, softcap, causal masks, any GQA layout) and cost more nodes than the
# exporter's own graph. These two cover what graphopt's fusions emit with the graph the
# exporters write; every other configuration returns None and gets the function body.
def rotary_embedding(node: gs.Node, model: Model) -> list[gs.Node] | None:
    """``RotaryEmbedding``-23, not interleaved: ``x·cos + rotate_half(x)·sin`` with full-width tables."""
    a = node.attrs
    x, cos, sin, pos = node.inputs[0], node.inputs[1], node.inputs[2], _input(node, 3)
    rank = _rank(x)
    if int(a.get("interleaved", 0)) or rank not in (3, 4):
        return None
    heads = int(a.get("num_heads", 0))
    if rank == 3 and not heads:
        return None
    b = Builder(node, model)
    hidden = _static(x, -1)
    head = hidden // heads if rank == 3 and hidden else (hidden if rank == 4 else None)
    rot = int(a.get("rotary_embedding_dim", 0)) or head
    if rot is None or head is None:
        return None
    if pos is not None:
        cos = b.op("Gather", [cos, pos], {"axis": 0}, dtype=cos.dtype)
        sin = b.op("Gather", [sin, pos], {"axis": 0}, dtype=sin.dtype)
    x4 = b.op("Reshape", [x, b.ints(0, 0, heads, head)], dtype=x.dtype) if rank == 3 else x
    axis = 2 if rank == 3 else 1  # tables are (batch, seq, rot/2): broadcast over the heads axis
    tables = []
    for t in (cos, sin):
        u = b.unsqueeze(t, [axis])
        tables.append(b.op("Concat", [u, u], {"axis": -1}, dtype=t.dtype))
    part, rest = (x4, None) if rot == head else b.split(x4, [rot, head - rot], -1)
    x1, x2 = b.split(part, [rot // 2, rot // 2], -1)
    rotated = b.op("Concat", [b.op("Neg", [x2], dtype=x.dtype), x1], {"axis": -1}, dtype=x.dtype)
    done = b.op("Add", [b.op("Mul", [part, tables[0]], dtype=x.dtype), b.op("Mul", [rotated, tables[1]],
                                                                               dtype=x.dtype)],
                outputs=[node.outputs[0]] if rank == 4 and rest is None else 1, dtype=x.dtype)
    if rest is not None:
        done = b.op("Concat", [done, rest], {"axis": -1}, outputs=[node.outputs[0]] if rank == 4 else 1,
                    dtype=x.dtype)
    if rank == 3:
        b.op("Reshape", [done, b.ints(0, 0, -1)], outputs=[node.outputs[0]])
    return b.nodes


_SHAPE_OPS = {"Reshape", "Expand", "Unsqueeze", "Squeeze", "Transpose", "Slice", "Gather", "Concat", "Identity",
              "Tile", "Flatten"}


def never_minus_inf(t: gs.Tensor, depth: int = 8) -> bool:
    """Whether no element of ``t`` can be -inf (so no softmax row over it is entirely masked):
    a constant without -inf, ``Max`` with such a constant, a cast from an integer, a ``Where``
    or shape op over such tensors."""
    if isinstance(t, gs.Constant):
        v = np.asarray(t.values)
        return v.dtype.kind in "biu" or not np.isneginf(v).any()
    if depth == 0 or len(t.inputs) != 1:
        return False
    node = t.inputs[0]
    if node.op == "Max":
        return any(isinstance(i, gs.Constant) and never_minus_inf(i) for i in node.inputs) or \
            all(never_minus_inf(i, depth - 1) for i in node.inputs)
    if node.op == "Cast":
        return onnx_dtype(node.inputs[0]) in (TensorProto.BOOL, TensorProto.INT8, TensorProto.UINT8,
                                              TensorProto.INT16, TensorProto.INT32, TensorProto.INT64)
    if node.op == "Where":
        return never_minus_inf(node.inputs[1], depth - 1) and never_minus_inf(node.inputs[2], depth - 1)
    if node.op == "ConstantOfShape":
        value = node.attrs.get("value")
        return value is None or not np.isneginf(np.asarray(value.values)).any()
    if node.op in _SHAPE_OPS:
        data = node.inputs if node.op == "Concat" else node.inputs[:1]
        return all(never_minus_inf(i, depth - 1) for i in data)
    return False


def attention(node: gs.Node, model: Model) -> list[gs.Node] | None:
    """``Attention``-23/24 without causal flag, softcap or extra outputs, in float32/float64:
    ``softmax(Q·Kᵀ·scale + mask)·V`` with grouped-query heads handled by reshaping Q to the
    KV heads' groups (no expanded K/V copies)."""
    a = node.attrs
    q, k, v = node.inputs[:3]
    mask, past_k, past_v = _input(node, 3), _input(node, 4), _input(node, 5)
    if int(a.get("is_causal", 0)) or float(a.get("softcap", 0.0)) or int(a.get("qk_matmul_output_mode", 0)) \
            or _input(node, 6) is not None or _output(node, 3) is not None:
        return None
    dtype = onnx_dtype(q)
    if dtype not in (TensorProto.FLOAT, TensorProto.DOUBLE) or int(a.get("softmax_precision", dtype)) != dtype:
        return None
    ranks = {_rank(q), _rank(k), _rank(v)}
    if len(ranks) != 1 or ranks - {3, 4}:
        return None
    three_d = ranks == {3}
    if three_d:
        heads, kv_heads = int(a.get("q_num_heads", 0)), int(a.get("kv_num_heads", 0))
        hidden = _static(q, 2)
        if not heads or not kv_heads or not hidden:
            return None
        head = hidden // heads
    else:
        heads, kv_heads, head = _static(q, 1), _static(k, 1), _static(q, 3)
        if not heads or not kv_heads or not head:
            return None
    if heads % kv_heads:
        return None
    b = Builder(node, model)
    fdt = helper.tensor_dtype_to_np_dtype(dtype)
    if three_d:
        q, k, v = _heads_first(b, q, heads), _heads_first(b, k, kv_heads), _heads_first(b, v, kv_heads)
    outs = [_output(node, 1), _output(node, 2)]
    if past_k is not None and past_v is not None:
        k = b.op("Concat", [past_k, k], {"axis": 2}, outputs=[outs[0]] if outs[0] is not None else 1, dtype=fdt)
        v = b.op("Concat", [past_v, v], {"axis": 2}, outputs=[outs[1]] if outs[1] is not None else 1, dtype=fdt)
    elif past_k is not None or past_v is not None:
        return None
    else:
        for t, out in ((k, outs[0]), (v, outs[1])):
            if out is not None:
                b.op("Identity", [t], outputs=[out])
    scale = float(a["scale"]) if "scale" in a else 1.0 / math.sqrt(head)
    grouped = heads != kv_heads
    qg = b.op("Reshape", [q, b.ints(0, kv_heads, -1, head)], dtype=fdt) if grouped else q
    kt = b.op("Transpose", [k], {"perm": [0, 1, 3, 2]}, dtype=fdt)
    scores = b.op("Mul", [b.op("MatMul", [qg, kt], dtype=fdt), b.const(scale, fdt)], dtype=fdt)
    if grouped:
        scores = b.op("Reshape", [scores, b.ints(0, heads, -1, 0)], dtype=fdt)
    guard = None
    if mask is not None:
        if onnx_dtype(mask) == TensorProto.BOOL:
            mask = b.op("Where", [mask, b.const(0.0, fdt), b.const(-np.inf, fdt)], dtype=fdt)
        scores = b.op("Add", [scores, mask], dtype=fdt)
        if not never_minus_inf(mask):  # the spec gives 0, not NaN, for a row with every key masked
            row_max = b.op("ReduceMax", [mask, b.ints(-1)], {"keepdims": 1}, dtype=fdt) if b.opset >= 18 \
                else b.op("ReduceMax", [mask], {"axes": [-1], "keepdims": 1}, dtype=fdt)
            guard = b.op("Equal", [row_max, b.const(-np.inf, fdt)])
    probs = b.op("Softmax", [scores], {"axis": -1}, dtype=fdt)
    if guard is not None:
        probs = b.op("Where", [guard, b.const(0.0, fdt), probs], dtype=fdt)
    if grouped:
        probs = b.op("Reshape", [probs, b.ints(0, kv_heads, -1, 0)], dtype=fdt)
    y = b.op("MatMul", [probs, v], dtype=fdt, outputs=[node.outputs[0]] if not grouped and not three_d else 1)
    if grouped:
        y = b.op("Reshape", [y, b.ints(0, heads, -1, 0)], dtype=fdt,
                 outputs=[node.outputs[0]] if not three_d else 1)
    if three_d:
        _heads_last(b, y, node.outputs[0])
    return b.nodes


#: (domain, op type) → decomposition. Registered by ``graphopt.passes`` through the
#: ``graphopt_register_decompositions`` hook, exactly as a third-party plugin would.
DECOMPOSITIONS: dict[tuple[str, str], Callable[[gs.Node, Model], list[gs.Node] | None]] = {
    ("", "RotaryEmbedding"): rotary_embedding,
    ("", "Attention"): attention,
    ("", "SimplifiedLayerNormalization"): simplified_layer_norm,
    (MS, "SimplifiedLayerNormalization"): simplified_layer_norm,
    (MS, "SkipSimplifiedLayerNormalization"): skip_simplified_layer_norm,
    (MS, "SkipLayerNormalization"): skip_layer_norm,
    (MS, "RotaryEmbedding"): ms_rotary_embedding,
    (MS, "GroupQueryAttention"): group_query_attention,
    (MS, "MultiHeadAttention"): multi_head_attention,
    (MS, "MatMulNBits"): matmul_nbits,
    (MS, "FastGelu"): fast_gelu,
    (MS, "BiasGelu"): bias_gelu,
    (MS, "QuickGelu"): quick_gelu,
    (MS, "Gelu"): ms_gelu,
}
