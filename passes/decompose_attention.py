"""Decompositions of attention: onnxruntime's ``GroupQueryAttention`` and
``MultiHeadAttention``, and a lean one for standard ``Attention``.

The contrib ops become ``Attention``-23 with an explicit mask (their causal
alignment, padding and cache layout are not those of ``is_causal``), so a target
that runs ``Attention`` keeps one fused node; legalization splits it further for
targets that do not.

Standard ``Attention``'s ONNX function body is general (causal flags, softcap,
any GQA layout, scaling q and k separately) and costs more nodes than the
exporter's own graph. :func:`attention` covers what graphopt's attention fusion
emits, ``softmax(Q·Kᵀ·scale + mask)·V`` with a KV cache, in fewer nodes than the
export (grouped-query heads by reshaping Q into the KV heads' groups, not by
expanding K and V); every other configuration returns None and gets the
function body.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from graphopt._expand import onnx_dtype
from graphopt._ir import Model
from graphopt.passes.decompositions import (MS, Builder, Tensor, float_dtype, input_at, output_at, rank_of, refuse_if,
                                            static_dim, used_outputs)


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
    """A 1-element tensor (any rank) as an int64 scalar."""
    return b.op("Reshape", [b.cast(t, TensorProto.INT64), b.const(np.zeros(0, np.int64))], dtype=np.int64)


def _dim_scalar(b: Builder, x: Tensor, axis: int) -> Tensor:
    """``x.shape[axis]`` as an int64 scalar."""
    return b.squeeze(b.dim(x, axis), [0])


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
        refuse_if(i < n_in and input_at(node, i) is not None, f"the {what} input is not supported")
    for key, default in (("smooth_softmax", -1), ("qk_output", 0), ("sliding_window_cache", 0)):
        refuse_if(int(a.get(key, default)) not in (default, 0), f"{key}={a.get(key)} is not supported")
    for key in ("k_quant_type", "v_quant_type"):
        value = a.get(key, "NONE")
        value = value.decode() if isinstance(value, bytes) else value
        refuse_if(value != "NONE", f"{key}={value} (a quantized KV cache) is not supported")
    refuse_if(any(used_outputs(node, model)[3:]), "the output_qk output is not supported")
    q, k, v = node.inputs[0], input_at(node, 1), input_at(node, 2)
    past_k, past_v = input_at(node, 3), input_at(node, 4)
    seqlens_k, total = node.inputs[5], node.inputs[6]
    cos, sin, position_ids, bias = input_at(node, 7), input_at(node, 8), input_at(node, 9), input_at(node, 10)
    heads, kv_heads = int(a["num_heads"]), int(a["kv_num_heads"])
    causal = int(a.get("causal", 1))
    window = int(a.get("local_window_size", -1))
    softcap = float(a.get("softcap", 0.0))
    b = Builder(node, model)
    if k is None:  # packed QKV
        width = static_dim(q, 2)
        refuse_if(width is None, "packed QKV needs a static hidden size")
        head = width // (heads + 2 * kv_heads)
        q, k, v = b.split(q, [heads * head, kv_heads * head, kv_heads * head], 2)
    seq = _dim_scalar(b, q, 1)
    total_len = b.op("Add", [b.cast(seqlens_k, TensorProto.INT64), b.const(1, np.int64)])  # (batch,)
    past_len = b.op("Sub", [total_len, seq], dtype=np.int64)  # (batch,)
    if int(a.get("do_rotary", 0)):
        refuse_if(cos is None or sin is None, "do_rotary=1 needs cos_cache and sin_cache")
        if position_ids is None:
            i = b.op("Range", [b.const(0, np.int64), seq, b.const(1, np.int64)], dtype=np.int64)
            position_ids = b.op("Add", [b.unsqueeze(past_len, [1]), b.unsqueeze(i, [0])], dtype=np.int64)
        rot = {"interleaved": int(a.get("rotary_interleaved", 0))}
        half = static_dim(cos, 1)
        if half:
            rot["rotary_embedding_dim"] = 2 * half
        q = b.op("RotaryEmbedding", [q, cos, sin, position_ids], dict(rot, num_heads=heads), dtype=q.dtype)
        k = b.op("RotaryEmbedding", [k, cos, sin, position_ids], dict(rot, num_heads=kv_heads), dtype=k.dtype)
    q4, k4, v4 = _heads_first(b, q, heads), _heads_first(b, k, kv_heads), _heads_first(b, v, kv_heads)

    # present: row j of entry b is past[j] below past_b, else new[j - past_b]
    if past_k is not None:
        refuse_if(past_v is None, "past_key without past_value")
        p = _dim_scalar(b, past_k, 2)
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
        outs = [output_at(node, 1), output_at(node, 2)]
        k_all = b.op("GatherElements", [presents[0][0], presents[0][1]], {"axis": 2},
                     outputs=[outs[0]] if outs[0] is not None else 1)
        v_all = b.op("GatherElements", [presents[1][0], presents[1][1]], {"axis": 2},
                     outputs=[outs[1]] if outs[1] is not None else 1)
    else:
        k_all, v_all = k4, v4
        key_len = _dim_scalar(b, k4, 2)
        for i, t in ((1, k4), (2, v4)):
            if output_at(node, i) is not None:
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
        neg = b.const(-np.inf, float_dtype(q))
        mask = b.op("Where", [mask, bias, neg], dtype=q.dtype)
    attn = {}  # 4-D inputs: the head counts come from the shapes (the attributes mean 3-D inputs)
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
    q, k, v = node.inputs[0], input_at(node, 1), input_at(node, 2)
    bias, pad_mask, attn_bias = input_at(node, 3), input_at(node, 4), input_at(node, 5)
    past_k, past_v = input_at(node, 6), input_at(node, 7)
    refuse_if(rank_of(q) != 3, "only a 3-D query (batch, sequence, hidden) is supported, not packed QKV")
    refuse_if(k is None or v is None, "key and value must be given (packed QKV is not supported)")
    refuse_if(input_at(node, 8) is not None or input_at(node, 9) is not None,
               "past_sequence_length / cache_indirection (buffer sharing, beam search) are not supported")
    refuse_if(any(used_outputs(node, model)[3:]), "the qk output is not supported")
    kv_rank = rank_of(k)
    refuse_if(kv_rank not in (3, 4) or rank_of(v) != kv_rank, "key and value must both be 3-D or 4-D")
    b = Builder(node, model)
    if bias is not None:
        refuse_if(kv_rank == 4, "a bias with 4-D key/value is not supported")
        width = static_dim(bias, 0)
        refuse_if(width is None or width % 3, "the bias width must be static (3 × hidden)")
        bq, bk, bv = b.split(bias, [width // 3] * 3, 0)
        q, k, v = (b.op("Add", [t, c], dtype=t.dtype) for t, c in ((q, bq), (k, bk), (v, bv)))
    q4 = _heads_first(b, q, heads)
    k4, v4 = (_heads_first(b, k, heads), _heads_first(b, v, heads)) if kv_rank == 3 else (k, v)
    if past_k is not None:
        refuse_if(kv_rank == 4, "past key/value with 4-D key/value is not supported")
        k4 = b.op("Concat", [past_k, k4], {"axis": 2}, outputs=[output_at(node, 1)] if output_at(node, 1) else 1)
        v4 = b.op("Concat", [past_v, v4], {"axis": 2}, outputs=[output_at(node, 2)] if output_at(node, 2) else 1)
    else:
        for i, t in ((1, k4), (2, v4)):
            if output_at(node, i) is not None:
                b.op("Identity", [t], outputs=[node.outputs[i]])
    dtype = float_dtype(q)
    terms = []
    causal = int(a.get("unidirectional", 0))
    if pad_mask is not None:
        rank = rank_of(pad_mask)
        refuse_if(rank not in (2, 3), "key_padding_mask must be 2-D (batch, total) or 3-D (batch, seq, total); "
                                       "the lengths forms are not supported")
        keep = b.op("Greater", [pad_mask, b.const(0, helper.tensor_dtype_to_np_dtype(onnx_dtype(pad_mask) or 6))])
        keep = b.unsqueeze(keep, [1, 2] if rank == 2 else [1])  # (batch, 1, S|1, T)
        terms.append(keep)
    if causal:
        seq, total = _dim_scalar(b, q4, 2), _dim_scalar(b, k4, 2)
        i, j = _row_col(b, seq, total)
        offset = b.op("Sub", [total, seq])
        terms.append(b.op("LessOrEqual", [j, b.op("Add", [i, offset])]))  # (S, T)
    mask = None
    if terms:
        keep = terms[0] if len(terms) == 1 else b.op("And", terms)
        if pad_mask is not None and rank_of(pad_mask) == 2 and not causal:
            # (batch, 1, 1, T): give it the query axis (onnxruntime's Attention wants mask.shape[-2] == S)
            rows = b.op("Concat", [b.ints(1, 1), b.dim(q4, 2), b.ints(1)], {"axis": 0}, dtype=np.int64)
            keep = b.op("Expand", [keep, rows])
        mask = b.op("Where", [keep, b.const(0.0, dtype), b.const(filter_value, dtype)], dtype=dtype)
    if attn_bias is not None:
        mask = attn_bias if mask is None else b.op("Add", [mask, attn_bias], dtype=dtype)
    attrs = {"scale": float(a["scale"])} if "scale" in a and float(a["scale"]) != 0.0 else {}
    y = b.op("Attention", [q4, k4, v4] + ([mask] if mask is not None else []), attrs, dtype=q.dtype)
    _heads_last(b, y, node.outputs[0])
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
    mask, past_k, past_v = input_at(node, 3), input_at(node, 4), input_at(node, 5)
    if int(a.get("is_causal", 0)) or float(a.get("softcap", 0.0)) or int(a.get("qk_matmul_output_mode", 0)) \
            or input_at(node, 6) is not None or output_at(node, 3) is not None:
        return None
    dtype = onnx_dtype(q)
    if dtype not in (TensorProto.FLOAT, TensorProto.DOUBLE) or int(a.get("softmax_precision", dtype)) != dtype:
        return None
    ranks = {rank_of(q), rank_of(k), rank_of(v)}
    if len(ranks) != 1 or ranks - {3, 4}:
        return None
    three_d = ranks == {3}
    if three_d:
        heads, kv_heads = int(a.get("q_num_heads", 0)), int(a.get("kv_num_heads", 0))
        hidden = static_dim(q, 2)
        if not heads or not kv_heads or not hidden:
            return None
        head = hidden // heads
    else:
        heads, kv_heads, head = static_dim(q, 1), static_dim(k, 1), static_dim(q, 3)
        if not heads or not kv_heads or not head:
            return None
    if heads % kv_heads:
        return None
    b = Builder(node, model)
    fdt = helper.tensor_dtype_to_np_dtype(dtype)
    if three_d:
        q, k, v = _heads_first(b, q, heads), _heads_first(b, k, kv_heads), _heads_first(b, v, kv_heads)
    outs = [output_at(node, 1), output_at(node, 2)]
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


#: (domain, op type) → decomposition, registered by ``graphopt.passes``.
ATTENTION_DECOMPOSITIONS = {
    ("", "Attention"): attention,
    (MS, "GroupQueryAttention"): group_query_attention,
    (MS, "MultiHeadAttention"): multi_head_attention,
}
