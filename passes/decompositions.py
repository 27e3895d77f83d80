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
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt._expand import CannotDecompose, c_array, onnx_dtype
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
        return gs.Constant(self._name(hint), c_array(np.asarray(value, dtype=dtype)))

    def packed(self, value: np.ndarray, hint: str = "c") -> gs.Constant:
        """A constant of any ONNX type (4-bit included), stored as its TensorProto."""
        name = self._name(hint)
        return gs.Constant(name, LazyValues(onnx.numpy_helper.from_array(value, name)))

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
def input_at(node: gs.Node, i: int) -> Tensor | None:
    """The node's i-th input, None when absent (missing or empty name)."""
    return node.inputs[i] if i < len(node.inputs) and node.inputs[i].name else None


def output_at(node: gs.Node, i: int) -> Tensor | None:
    return node.outputs[i] if i < len(node.outputs) and node.outputs[i].name else None


def used_outputs(node: gs.Node, model: Model) -> list[bool]:
    """Per output: whether anything reads it (a node or the graph's outputs)."""
    graph_outputs = {id(t) for t in model.graph.outputs}
    return [t.name != "" and (bool(t.outputs) or id(t) in graph_outputs) for t in node.outputs]


def rank_of(t: Tensor) -> int | None:
    return len(t.shape) if t.shape is not None else None


def static_dim(t: Tensor, axis: int) -> int | None:
    if t.shape is None or not (-len(t.shape) <= axis < len(t.shape)):
        return None
    d = t.shape[axis]
    return int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None


def refuse_if(cond: bool, why: str) -> None:
    if cond:
        raise CannotDecompose(why)


def const_values(t: Tensor | None) -> np.ndarray | None:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def float_dtype(t: Tensor) -> Any:
    return t.dtype if t.dtype is not None else np.float32


# ----------------------------------------------------------------- norms
def _inv_std_var(b: Builder, x: Tensor, eps: float, axis: int, mean_of_squares: bool,
                 out: Tensor, stash: int = TensorProto.FLOAT, rank: int | None = None) -> None:
    """``1 / sqrt(var + eps)`` (or ``mean(x²)`` for RMS norms) over ``axis..rank-1`` into ``out``."""
    rank = rank if rank is not None else rank_of(x)
    refuse_if(rank is None, "the rank of the input is unknown, needed for the inv_std_var output")
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
    if used_outputs(node, model)[1:2] == [True]:
        _inv_std_var(b, x, eps, axis, True, node.outputs[1], stash)
    return b.nodes


def _skip_sum(b: Builder, node: gs.Node, bias_index: int) -> Tensor:
    """``input + skip (+ bias)``, written to the node's input_skip_bias_sum output when it is named."""
    x, skip, bias = node.inputs[0], node.inputs[1], input_at(node, bias_index)
    sum_out = output_at(node, 3)
    if bias is None:
        return b.op("Add", [x, skip], outputs=[sum_out] if sum_out is not None else 1, dtype=x.dtype)
    s = b.op("Add", [x, skip], dtype=x.dtype)
    return b.op("Add", [s, bias], outputs=[sum_out] if sum_out is not None else 1, dtype=x.dtype)


def skip_simplified_layer_norm(node: gs.Node, model: Model) -> list[gs.Node]:
    """``SkipSimplifiedLayerNormalization``: ``RMSNormalization(input + skip (+ bias), gamma)``."""
    used = used_outputs(node, model) + [False] * 4
    refuse_if(used[1], "its 'mean' output is used (an RMS norm has no mean)")
    b = Builder(node, model)
    eps = float(node.attrs.get("epsilon", 1e-12))
    s = _skip_sum(b, node, 3)
    b.op("RMSNormalization", [s, node.inputs[2]], {"axis": -1, "epsilon": eps}, outputs=[node.outputs[0]])
    if used[2]:
        _inv_std_var(b, s, eps, -1, True, node.outputs[2], rank=rank_of(node.inputs[0]))
    return b.nodes


def skip_layer_norm(node: gs.Node, model: Model) -> list[gs.Node]:
    """``SkipLayerNormalization``: ``LayerNormalization(input + skip (+ bias), gamma, beta)``."""
    b = Builder(node, model)
    eps = float(node.attrs.get("epsilon", 1e-12))
    s = _skip_sum(b, node, 4)
    beta = input_at(node, 3)
    outs = [node.outputs[0], output_at(node, 1), output_at(node, 2)]
    while outs and outs[-1] is None:
        outs.pop()
    b.op("LayerNormalization", [s, node.inputs[2]] + ([beta] if beta is not None else []),
         {"axis": -1, "epsilon": eps}, outputs=outs)
    return b.nodes


# ---------------------------------------------------------------- gelus
def _gelu(b: Builder, x: Tensor, out: Tensor, approximate: str = "none") -> None:
    """``Gelu``-20 into ``out``; below opset 20 its formula in primitives (onnx cannot convert
    the function body down: it uses ``Pow``-15)."""
    if b.opset >= 20:
        b.op("Gelu", [x], {"approximate": approximate} if approximate != "none" else {}, outputs=[out])
        return
    dt = float_dtype(x)
    if approximate == "tanh":  # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
        cube = b.op("Mul", [b.op("Mul", [x, x], dtype=dt), x], dtype=dt)
        inner = b.op("Add", [x, b.op("Mul", [cube, b.const(0.044715, dt)], dtype=dt)], dtype=dt)
        phi = b.op("Tanh", [b.op("Mul", [inner, b.const(math.sqrt(2.0 / math.pi), dt)], dtype=dt)], dtype=dt)
    else:  # 0.5·x·(1 + erf(x/√2))
        phi = b.op("Erf", [b.op("Mul", [x, b.const(1.0 / math.sqrt(2.0), dt)], dtype=dt)], dtype=dt)
    half_x = b.op("Mul", [x, b.const(0.5, dt)], dtype=dt)
    b.op("Mul", [half_x, b.op("Add", [phi, b.const(1.0, dt)], dtype=dt)], outputs=[out])


def fast_gelu(node: gs.Node, model: Model) -> list[gs.Node]:
    """``FastGelu(X, bias)``: the tanh approximation, ``Gelu(X + bias, approximate="tanh")``."""
    b = Builder(node, model)
    x, bias = node.inputs[0], input_at(node, 1)
    if bias is not None:
        x = b.op("Add", [x, bias], dtype=x.dtype)
    _gelu(b, x, node.outputs[0], "tanh")
    return b.nodes


def bias_gelu(node: gs.Node, model: Model) -> list[gs.Node]:
    """``BiasGelu(A, B)``: ``Gelu(A + B)`` (exact, erf)."""
    b = Builder(node, model)
    _gelu(b, b.op("Add", [node.inputs[0], node.inputs[1]], dtype=node.inputs[0].dtype), node.outputs[0])
    return b.nodes


def ms_gelu(node: gs.Node, model: Model) -> list[gs.Node]:
    """``com.microsoft.Gelu``: the exact ``Gelu``."""
    b = Builder(node, model)
    _gelu(b, node.inputs[0], node.outputs[0])
    return b.nodes


def quick_gelu(node: gs.Node, model: Model) -> list[gs.Node]:
    """``QuickGelu(X) = X · Sigmoid(alpha · X)``."""
    b = Builder(node, model)
    x = node.inputs[0]
    alpha = float(node.attrs.get("alpha", 1.702))
    z = x if alpha == 1.0 else b.op("Mul", [x, b.const(alpha, float_dtype(x))], dtype=x.dtype)
    b.op("Mul", [x, b.op("Sigmoid", [z], dtype=x.dtype)], outputs=[node.outputs[0]])
    return b.nodes


# --------------------------------------------------------------- rotary
def _positions(b: Builder, pos: Tensor, x: Tensor, seq_axis: int) -> Tensor:
    """Position ids of shape (batch, seq): as given, or ``offset + arange(seq)`` for the 1-element form."""
    if rank_of(pos) == 2:
        return pos if onnx_dtype(pos) == TensorProto.INT64 else b.cast(pos, TensorProto.INT64)
    refuse_if(rank_of(pos) != 1, "position_ids must be 1-D (an offset) or 2-D (batch, sequence)")
    offset = b.cast(b.op("Gather", [pos, b.const(0, np.int64)], {"axis": 0}), TensorProto.INT64)
    seq = b.squeeze(b.dim(x, seq_axis), [0])
    ids = b.op("Add", [b.op("Range", [b.const(0, np.int64), seq, b.const(1, np.int64)]), offset])
    shape = b.op("Concat", [b.dim(x, 0), b.unsqueeze(seq, [0])], {"axis": 0})
    return b.op("Expand", [b.unsqueeze(ids, [0]), shape], dtype=np.int64)


def ms_rotary_embedding(node: gs.Node, model: Model) -> list[gs.Node]:
    """``com.microsoft.RotaryEmbedding`` → ``RotaryEmbedding``-23 (same layouts; a 1-element
    position_ids is an offset and becomes explicit (batch, sequence) ids)."""
    attrs = node.attrs
    refuse_if(int(attrs.get("is_packed_batching", 0)) != 0, "is_packed_batching=1 is not supported")
    refuse_if(float(attrs.get("scale", 1.0)) != 1.0, f"scale={attrs.get('scale')} is not supported")
    x, pos, cos, sin = node.inputs[:4]
    rank = rank_of(x)
    refuse_if(rank not in (3, 4), "the rank of the input must be known (3 or 4)")
    b = Builder(node, model)
    new_attrs = {"interleaved": int(attrs.get("interleaved", 0))}
    rotary_dim = int(attrs.get("rotary_embedding_dim", 0))
    if rotary_dim:
        new_attrs["rotary_embedding_dim"] = rotary_dim
    if rank == 3:
        heads = int(attrs.get("num_heads", 0))
        if not heads:
            hidden, half = static_dim(x, 2), static_dim(cos, 1)
            refuse_if(hidden is None or not half, "num_heads is not given and the hidden size or the cache "
                                                   "width is not static")
            heads = hidden // (2 * half)
        new_attrs["num_heads"] = heads
    ids = _positions(b, pos, x, 1 if rank == 3 else 2)
    b.op("RotaryEmbedding", [x, cos, sin, ids], new_attrs, outputs=[node.outputs[0]])
    return b.nodes


# Standard RotaryEmbedding's ONNX function body is general (interleaving, positions,
# partial rotation in a complex-multiply form) and costs more nodes than the exporter's
# own rotate-half graph. This covers what graphopt's fusion emits; other configurations
# return None and get the function body.
def rotary_embedding(node: gs.Node, model: Model) -> list[gs.Node] | None:
    """``RotaryEmbedding``-23, not interleaved: ``x·cos + rotate_half(x)·sin`` with full-width tables."""
    a = node.attrs
    x, cos, sin, pos = node.inputs[0], node.inputs[1], node.inputs[2], input_at(node, 3)
    rank = rank_of(x)
    if int(a.get("interleaved", 0)) or rank not in (3, 4):
        return None
    heads = int(a.get("num_heads", 0))
    if rank == 3 and not heads:
        return None
    b = Builder(node, model)
    hidden = static_dim(x, -1)
    head = hidden // heads if rank == 3 and hidden else (hidden if rank == 4 else None)
    rot = int(a.get("rotary_embedding_dim", 0)) or head
    if rot is None or head is None or rot % 2 or rot > head:
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
    refuse_if(bits not in (2, 4, 8), f"bits={bits} is not supported")
    refuse_if(int(a.get("weight_prepacked", 0)) != 0, "prepacked weights are not supported")
    refuse_if(input_at(node, 4) is not None, "the g_idx input (act-order) is not supported")
    qb = const_values(node.inputs[1])
    refuse_if(qb is None, "the quantized weight B must be a constant")
    blocks = -(-big_k // block)
    refuse_if(qb.size != big_n * blocks * (block * bits // 8),
               f"B has {qb.size} bytes, expected N·ceil(K/block)·block·bits/8 = {big_n * blocks * block * bits // 8}")
    b = Builder(node, model)
    x, scales, zp_t, bias = node.inputs[0], node.inputs[2], input_at(node, 3), input_at(node, 5)
    fdt = float_dtype(x)
    q = _unpack(qb.reshape(big_n, blocks, block * bits // 8).astype(np.uint8), bits, block)  # (N, blocks, block)
    q = q.reshape(big_n, blocks * block).T  # (blocks·block, N)
    if isinstance(scales, gs.Constant):  # (N·blocks,) or (N, blocks) → (blocks, N), once
        s = b.const(np.asarray(scales.values).reshape(big_n, blocks).T, hint="scale")
    else:
        s = b.op("Transpose", [b.op("Reshape", [scales, b.ints(big_n, blocks)])], {"perm": [1, 0]}, dtype=fdt)
    zp = const_values(zp_t)
    float_zp = zp_t is not None and onnx_dtype(zp_t) != TensorProto.UINT8
    refuse_if(zp_t is not None and zp is None and not float_zp, "packed zero points must be a constant")
    if zp is not None and not float_zp:
        zp = _unpack(zp.reshape(big_n, -1).astype(np.uint8), bits, blocks).T  # (blocks, N)
    elif zp_t is None:
        zp = np.full((blocks, big_n), 1 << (bits - 1), np.uint8)
    if b.opset >= 21 and bits in (4, 8) and not float_zp:
        import ml_dtypes

        qtype = ml_dtypes.uint4 if bits == 4 else np.uint8
        w = b.packed(q[:big_k].astype(qtype), hint="weight")
        z = b.packed(zp.astype(qtype), hint="zero_point")
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


#: Codes a blocked ``DequantizeLinear`` widens to float32 with a per-tensor ``DequantizeLinear`` (scale 1)
#: (2/4-bit types: the cpu backend has no ``Cast`` from them), or with ``Cast`` (exact in float32).
_WIDEN_BY_DQ = {TensorProto.INT4, TensorProto.UINT4, TensorProto.INT2, TensorProto.UINT2}
_WIDEN_BY_CAST = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16}


def dequantize_linear(node: gs.Node, model: Model) -> list[gs.Node]:
    """Blocked ``DequantizeLinear`` (``block_size`` > 0) → the codes (and zero points) widened to
    float32, ``(codes − zero point) · scale`` on a ``[…, blocks, block, …]`` view, cast to the
    output type; for targets that run only per-tensor / per-axis ``DequantizeLinear``.

    Needs the input's static shape (weights are constants); a partial last block is filled
    up with zeros (``Concat``) and sliced off again.
    """
    a = node.attrs
    block = int(a.get("block_size", 0))
    refuse_if(block <= 0, "only a blocked DequantizeLinear (block_size > 0) is split back")
    x, scale, zp = node.inputs[0], node.inputs[1], input_at(node, 2)
    qtype = onnx_dtype(x)
    refuse_if(qtype not in _WIDEN_BY_DQ | _WIDEN_BY_CAST,
              f"input type {TensorProto.DataType.Name(qtype) if qtype else 'unknown'} is not supported")
    shape = [static_dim(x, i) for i in range(rank_of(x) or 0)]
    refuse_if(not shape or None in shape, "the input's shape must be static")
    axis = int(a.get("axis", 1)) % len(shape)
    k, blocks = shape[axis], -(-shape[axis] // block)
    out_type = int(a.get("output_dtype", 0) or 0) or onnx_dtype(scale) or TensorProto.FLOAT
    b = Builder(node, model)

    def widen(t: Tensor, padded: bool) -> Tensor:
        if qtype in _WIDEN_BY_DQ:
            wide = b.op("DequantizeLinear", [t, b.const(np.float32(1.0), hint="one")], dtype=np.float32)
        else:
            wide = b.op("Cast", [t], {"to": TensorProto.FLOAT}, dtype=np.float32)
        if padded and blocks * block != k:  # zeros up to whole blocks
            zeros = np.zeros([*shape[:axis], blocks * block - k, *shape[axis + 1:]], np.float32)
            wide = b.op("Concat", [wide, b.const(zeros, hint="pad")], {"axis": axis}, dtype=np.float32)
        return wide

    view = b.op("Reshape", [widen(x, True), b.ints(*shape[:axis], blocks, block, *shape[axis + 1:])],
                dtype=np.float32)
    if zp is not None:
        view = b.op("Sub", [view, b.unsqueeze(widen(zp, False), [axis + 1])], dtype=np.float32)
    s = scale if onnx_dtype(scale) == TensorProto.FLOAT else b.cast(scale, TensorProto.FLOAT)
    y = b.op("Mul", [view, b.unsqueeze(s, [axis + 1])], dtype=np.float32)
    last = out_type == TensorProto.FLOAT and blocks * block == k
    y = b.op("Reshape", [y, b.ints(*shape[:axis], blocks * block, *shape[axis + 1:])],
             outputs=[node.outputs[0]] if last else 1, dtype=np.float32)
    if blocks * block != k:
        last = out_type == TensorProto.FLOAT
        y = b.op("Slice", [y, b.ints(0), b.ints(k), b.ints(axis)], outputs=[node.outputs[0]] if last else 1,
                 dtype=np.float32)
    if not last:
        b.op("Cast", [y], {"to": out_type}, outputs=[node.outputs[0]])
    return b.nodes


#: (domain, op type) → decomposition. Registered by ``graphopt.passes`` through the
#: ``graphopt_register_decompositions`` hook, exactly as a third-party plugin would
#: (with :data:`graphopt.passes.decompose_attention.ATTENTION_DECOMPOSITIONS`).
DECOMPOSITIONS: dict[tuple[str, str], Callable[[gs.Node, Model], list[gs.Node] | None]] = {
    ("", "SimplifiedLayerNormalization"): simplified_layer_norm,
    (MS, "SimplifiedLayerNormalization"): simplified_layer_norm,
    (MS, "SkipSimplifiedLayerNormalization"): skip_simplified_layer_norm,
    (MS, "SkipLayerNormalization"): skip_layer_norm,
    ("", "RotaryEmbedding"): rotary_embedding,
    (MS, "RotaryEmbedding"): ms_rotary_embedding,
    ("", "DequantizeLinear"): dequantize_linear,
    (MS, "MatMulNBits"): matmul_nbits,
    (MS, "FastGelu"): fast_gelu,
    (MS, "BiasGelu"): bias_gelu,
    (MS, "QuickGelu"): quick_gelu,
    (MS, "Gelu"): ms_gelu,
}
