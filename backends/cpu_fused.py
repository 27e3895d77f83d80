"""Fused and quantized kernels of the ``cpu`` backend (norms, rotary, attention, dequantization).

Standard ops (declared, so the ONNX node tests run against them):

* ``LayerNormalization``-17, ``RMSNormalization``-23, ``RotaryEmbedding``-23;
* ``Attention``-23/24/25 (3-D and 4-D inputs, GQA/MQA, bool and additive masks
  shorter than the total length, internal KV cache, ``nonpad_kv_seqlen``,
  bottom-right causal alignment, softcap, the ``qk_matmul_output`` modes,
  ``softmax_precision`` and the opset-25 sliding window);
* ``DequantizeLinear``-10 … 28 for integer inputs (2/4/8/16/32-bit),
  per-tensor, per-axis and blocked scales.

Internal (``graphopt.cpu`` domain, created by :func:`fuse_dequant_matmul` at
compile time, never declared):

* ``DequantMatMul``: ``X @ dequant(W)`` for a constant 2-D quantized weight; 4-bit
  weights stay packed two to a byte and are decoded through a 256-entry table (one
  byte → two float32). With a few rows of X (a decode step) it works tile by tile in
  cache on a thread pool, each tile decoded, scaled and multiplied while it is hot;
  with more rows (a prefill) it dequantizes a bounded chunk of output columns at a
  time for one big product.
* ``DequantGather``: ``Gather(dequant(W), ids, axis=0)`` dequantizing only the
  gathered rows.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt._backend import op_version
from graphopt._ir import Model
from graphopt.backends.cpu import COMPILE_REWRITES, INTERNAL_DOMAIN
from graphopt.backends.cpu import const_values
from graphopt.backends.cpu_kernels import Kernel, KNode, _type_name, kernel, std_dtypes

F32 = np.dtype(np.float32)


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    """float32 for float16/float32 inputs, float64 for float64 (never below float32)."""
    return np.result_type(np.dtype(dtype), F32)


def _np_dtype(onnx_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(onnx_type)))


def _with(pred, *more):
    """Predicate: ``pred`` and then each of ``more``; the first reason wins."""
    def check(node, model):
        for p in (pred, *more):
            reason = p(node, model)
            if reason is not None:
                return reason
        return None
    return check


def _stash_in(*allowed: int):
    def check(node, model):
        st = int(node.attrs.get("stash_type", 1))
        if st not in allowed:
            return f"stash_type={st} ({_type_name(st)}) is not supported"
        return None
    return check


# -------------------------------------------------------------------- norms
@kernel("LayerNormalization", since=17, predicate=_with(std_dtypes, _stash_in(1)))
def _layer_norm(n: KNode) -> Kernel:
    axis, eps = int(n.attr("axis", -1)), float(n.attr("epsilon", 1e-5))
    stat_dtypes = [d if d is not None else F32 for d in (n.output_dtypes + [None, None, None])[1:3]]

    def run(x, scale, bias=None):
        ax = axis % x.ndim
        red = tuple(range(ax, x.ndim))
        cd = _compute_dtype(x.dtype)
        xc = x.astype(cd, copy=False)
        mean = np.mean(xc, axis=red, keepdims=True)
        d = xc - mean
        inv = 1.0 / np.sqrt(np.mean(d * d, axis=red, keepdims=True) + cd.type(eps))
        y = d * inv
        y *= scale.astype(cd, copy=False)
        if bias is not None:
            y += bias.astype(cd, copy=False)
        return y.astype(x.dtype, copy=False), mean.astype(stat_dtypes[0]), inv.astype(stat_dtypes[1])
    return run


@kernel("RMSNormalization", since=23, predicate=_with(std_dtypes, _stash_in(1, 10, 11)))
def _rms_norm(n: KNode) -> Kernel:
    return rms_norm_kernel(n, np)


def rms_norm_kernel(n: KNode, xp) -> Kernel:
    """``RMSNormalization``-23 over the array module ``xp`` (numpy here, CuPy on the cuda backend)."""
    axis, eps = int(n.attr("axis", -1)), float(n.attr("epsilon", 1e-5))
    stash = _np_dtype(n.attr("stash_type", 1))
    # Y has the type of Scale (V in the schema), which is usually X's
    out_dtype = n.output_dtypes[0] if n.output_dtypes and n.output_dtypes[0] is not None else None

    def run(x, scale):
        ax = axis % x.ndim
        red = tuple(range(ax, x.ndim))
        cd = np.result_type(stash, x.dtype) if x.dtype.kind == "f" else stash
        xc = x.astype(cd, copy=False)
        inv = 1.0 / xp.sqrt(xp.mean(xc * xc, axis=red, keepdims=True) + cd.type(eps))
        y = xc * inv
        y *= scale.astype(cd, copy=False)
        return y.astype(out_dtype or scale.dtype, copy=False)
    return run


# ------------------------------------------------------------------- rotary
@kernel("RotaryEmbedding", since=23)
def _rotary(n: KNode) -> Kernel:
    return rotary_kernel(n, np)


def rotary_kernel(n: KNode, xp) -> Kernel:
    """``RotaryEmbedding``-23 over the array module ``xp`` (numpy here, CuPy on the cuda backend)."""
    interleaved = bool(n.attr("interleaved", 0))
    rot_dim = int(n.attr("rotary_embedding_dim", 0))
    num_heads = int(n.attr("num_heads", 0))

    def run(x, cos, sin, position_ids=None):
        if x.ndim == 4:  # (B, H, S, D)
            xv = x
        elif x.ndim == 3:  # (B, S, H*D)
            if num_heads <= 0:
                raise ValueError("RotaryEmbedding: num_heads must be given for a 3-D input")
            if x.shape[2] % num_heads:
                raise ValueError(f"RotaryEmbedding: hidden size {x.shape[2]} is not a multiple of "
                                 f"num_heads={num_heads}")
            xv = x.reshape(x.shape[0], x.shape[1], num_heads, x.shape[2] // num_heads)
        else:
            raise ValueError(f"RotaryEmbedding: input must be 3-D or 4-D, got rank {x.ndim}")
        head = xv.shape[-1]
        r = rot_dim or head
        if r % 2 or r > head:
            raise ValueError(f"RotaryEmbedding: rotary dim {r} must be even and at most head size {head}")
        half = r // 2
        if position_ids is not None:
            pid = position_ids.astype(np.int64, copy=False)
            cos, sin = cos[pid], sin[pid]  # (B, S, r/2)
        for name, c in (("cos_cache", cos), ("sin_cache", sin)):
            if c.ndim != 3 or c.shape[-1] != half:
                raise ValueError(f"RotaryEmbedding: {name} gives shape {c.shape}, expected (batch, seq, {half})")
        cd = _compute_dtype(x.dtype)
        cos = cos.astype(cd, copy=False)
        sin = sin.astype(cd, copy=False)
        # caches (B|1, S, r/2) -> broadcast against (B, H, S, r/2) or (B, S, H, r/2)
        cos, sin = (cos[:, None], sin[:, None]) if x.ndim == 4 else (cos[:, :, None], sin[:, :, None])
        xr = xv[..., :r].astype(cd, copy=False)
        x1, x2 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., :half], xr[..., half:])
        real = cos * x1 - sin * x2
        imag = sin * x1 + cos * x2
        out_shape = np.broadcast_shapes(xv.shape[:-1] + (half,), real.shape)
        if out_shape != xv.shape[:-1] + (half,):
            raise ValueError(f"RotaryEmbedding: caches of shape {cos.shape} do not broadcast to input {x.shape}")
        out = xp.empty(xv.shape, dtype=x.dtype)
        if interleaved:
            out[..., 0:r:2] = real
            out[..., 1:r:2] = imag
        else:
            out[..., :half] = real
            out[..., half:r] = imag
        out[..., r:] = xv[..., r:]
        return out.reshape(x.shape)
    return run


# ---------------------------------------------------------------- attention
_SOFTMAX_PRECISIONS = {1: np.float32, 10: np.float16, 11: np.float64}


def _attention_check(node: gs.Node, model) -> str | None:
    sp = node.attrs.get("softmax_precision")
    if sp is not None and int(sp) not in _SOFTMAX_PRECISIONS:
        return f"softmax_precision={int(sp)} ({_type_name(int(sp))}) is not supported"
    return None


def _softmax_rows(x, xp=np):
    """Softmax over the last axis; an all ``-inf`` row gives zeros, never NaN."""
    m = xp.max(x, axis=-1, keepdims=True)
    m = xp.where(m == -np.inf, x.dtype.type(0), m)
    e = xp.exp(x - m)
    s = xp.sum(e, axis=-1, keepdims=True)
    s = xp.where(s == 0, x.dtype.type(1), s)
    e /= s
    return e


@kernel("Attention", since=23, until=25, predicate=_with(std_dtypes, _attention_check))
def _attention(n: KNode) -> Kernel:
    return attention_kernel(n, np)


def plain_concat(xp) -> Callable:
    """``concat(past, new, which)``: a KV cache appended by concatenation along the sequence axis."""
    return lambda past, new, which: xp.concatenate((past, new), axis=2)


def mask_bias(mask, t: int, dtype: np.dtype, xp):
    """``Attention``'s ``attn_mask`` as an additive bias over ``t`` keys: a bool mask → 0 / −inf; a
    mask shorter than the keys masks the rest (−inf); a longer one is an error."""
    pad = t - mask.shape[-1]
    if pad < 0:
        raise ValueError(f"Attention: attn_mask's last dimension {mask.shape[-1]} exceeds the total "
                         f"sequence length {t}")
    bias = xp.where(mask, dtype.type(0), dtype.type(-np.inf)) if mask.dtype == np.bool_ else \
        mask.astype(dtype, copy=False)
    if pad:
        bias = xp.concatenate([bias, xp.full(bias.shape[:-1] + (pad,), -np.inf, dtype=dtype)], axis=-1)
    return bias


def attention_kernel(n: KNode, xp, concat: Callable | None = None) -> Kernel:
    """``Attention``-23/24/25 over the array module ``xp`` (numpy here, CuPy on the cuda backend):
    never reads a value back to the host, so a CUDA graph can capture it. ``concat(past, new,
    which)`` appends new keys/values to the past ones along the sequence axis (a runtime may
    do it in place)."""
    cat = concat or plain_concat(xp)
    a = n.attrs
    scale_attr = a.get("scale")
    is_causal = bool(int(a.get("is_causal", 0)))
    q_heads_attr = a.get("q_num_heads")
    kv_heads_attr = a.get("kv_num_heads")
    softcap = float(a.get("softcap", 0.0))
    mode = int(a.get("qk_matmul_output_mode", 0))
    sp = a.get("softmax_precision")
    sp_dtype = np.dtype(_SOFTMAX_PRECISIONS[int(sp)]) if sp is not None else None
    left = int(a.get("left_window_size", -1)) if n.version >= 25 else -1
    right = int(a.get("right_window_size", -1)) if n.version >= 25 else -1
    want_qk = n.n_outputs >= 4
    if mode not in (0, 1, 2, 3):
        raise ValueError(f"Attention: qk_matmul_output_mode={mode} is not one of 0, 1, 2, 3")
    if left < -1 or right < -1:
        raise ValueError("Attention: window sizes must be -1 or nonnegative")

    def split_heads(t, heads, what):
        b, s, hidden = t.shape
        if heads is None or int(heads) <= 0:
            raise ValueError(f"Attention: 3-D inputs need q_num_heads and kv_num_heads ({what})")
        if hidden % int(heads):
            raise ValueError(f"Attention: {what} hidden size {hidden} is not a multiple of {int(heads)} heads")
        return t.reshape(b, s, int(heads), hidden // int(heads)).transpose(0, 2, 1, 3)

    def run(q, k, v, mask=None, past_k=None, past_v=None, nonpad=None):
        if not q.ndim == k.ndim == v.ndim or q.ndim not in (3, 4):
            raise ValueError(f"Attention: Q, K, V must all be 3-D or all 4-D, got ranks {q.ndim}, {k.ndim}, {v.ndim}")
        if (past_k is None) != (past_v is None):
            raise ValueError("Attention: past_key and past_value must be given together")
        if nonpad is not None and past_k is not None:
            raise ValueError("Attention: nonpad_kv_seqlen cannot be combined with past_key/past_value")
        three_d = q.ndim == 3
        if three_d:
            q = split_heads(q, q_heads_attr, "Q")
            k = split_heads(k, kv_heads_attr, "K")
            v = split_heads(v, kv_heads_attr, "V")
        elif n.version >= 25 and (q_heads_attr is not None or kv_heads_attr is not None):
            raise ValueError("Attention: q_num_heads and kv_num_heads must not be given for 4-D inputs")
        past_len = 0
        if past_k is not None:
            past_len = past_k.shape[2]
            k = cat(past_k, k, "key")
            v = cat(past_v, v, "value")
        present_k, present_v = k, v

        b, hq, sq, d = q.shape
        hkv, t = k.shape[1], k.shape[2]
        if hq % hkv or v.shape[1] != hkv:
            raise ValueError(f"Attention: {hq} query heads cannot share {hkv} key / {v.shape[1]} value heads")
        g = hq // hkv
        cd = _compute_dtype(q.dtype)
        s = math.sqrt(scale_attr if scale_attr is not None else 1.0 / math.sqrt(d))
        qs = q.astype(cd) * cd.type(s)
        ks = k.astype(cd) * cd.type(s)
        # GQA without copying K/V: query heads h = kv * g + i share KV head kv.
        scores = xp.matmul(qs.reshape(b, hkv, g * sq, d), xp.swapaxes(ks, -1, -2)).reshape(b, hq, sq, t)
        raw = scores
        if softcap > 0:
            scores = xp.tanh(scores / cd.type(softcap)) * cd.type(softcap)
        capped = scores
        bias = mask_bias(mask, t, cd, xp) if mask is not None else None  # additive, to (b, hq, sq, t)
        if is_causal or left >= 0 or right >= 0 or nonpad is not None:
            i = xp.arange(sq).reshape(sq, 1)
            j = xp.arange(t).reshape(1, t)
            if nonpad is not None:
                nonpad = nonpad.astype(np.int64, copy=False).reshape(-1)
                offset = (nonpad - sq).reshape(-1, 1, 1, 1)  # (b, 1, 1, 1)
            else:
                offset = past_len
            pos = i + offset  # absolute query position
            allowed = xp.ones(np.broadcast_shapes(tuple(pos.shape), j.shape), dtype=bool)
            if is_causal:
                allowed &= j <= pos
            if left >= 0:
                allowed &= pos - j <= left
            if right >= 0:
                allowed &= j - pos <= right
            if nonpad is not None:
                allowed &= j < nonpad.reshape(-1, 1, 1, 1)
            structural = xp.where(allowed, cd.type(0), cd.type(-np.inf))
            bias = structural if bias is None else bias + structural

        if bias is not None:
            scores = scores + bias
        qk_out = {0: raw, 1: capped, 2: scores}.get(mode) if want_qk else None

        probs = _softmax_rows(scores.astype(sp_dtype) if sp_dtype is not None else scores, xp)
        if bias is not None:  # fully-masked rows (bias all -inf) give zeros, whatever the scores
            dead = xp.max(bias, axis=-1, keepdims=True) == -np.inf
            if xp is not np or dead.any():  # on a device, no host read (a CUDA graph captures it)
                probs = xp.where(dead, probs.dtype.type(0), probs)
        if want_qk and mode == 3:
            qk_out = probs
        y = xp.matmul(probs.astype(cd, copy=False).reshape(b, hkv, g * sq, t),
                      v.astype(cd, copy=False)).reshape(b, hq, sq, v.shape[-1])
        if three_d:
            y = y.transpose(0, 2, 1, 3).reshape(b, sq, hq * v.shape[-1])
        y = y.astype(q.dtype, copy=False)
        if qk_out is not None:
            qk_out = xp.broadcast_to(qk_out, (b, hq, sq, t)).astype(q.dtype)
        return y, present_k, present_v, qk_out
    return run


# ----------------------------------------------------------- dequantization
#: Integer types DequantizeLinear runs here (numpy names; 2/4-bit are ml_dtypes arrays).
_DQ_INPUT_TYPES = {"int8", "uint8", "int16", "uint16", "int32", "int4", "uint4", "int2", "uint2"}
_DQ_SCALE_TYPES = {"float32", "float16"}
_SUBBYTE = {"int4": (4, True), "uint4": (4, False), "int2": (2, True), "uint2": (2, False)}


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    try:
        if isinstance(dtype, (int, np.integer)):
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(dtype))).name
        return np.dtype(dtype).name
    except (TypeError, KeyError, ValueError):
        return _type_name(dtype) if isinstance(dtype, (int, np.integer)) else str(dtype)


def _dq_check(node: gs.Node, model) -> str | None:
    ins = list(node.inputs) + [None, None, None]
    x, scale, zp = ins[0], ins[1], ins[2]
    for t in (x, scale, zp, *node.outputs):
        if t is not None and t.name and getattr(t, "type", "tensor_type") != "tensor_type":
            return f"{t.name!r} is not a tensor"
    xt = _dtype_name(x.dtype)
    if xt is not None and xt not in _DQ_INPUT_TYPES:
        return f"dtype {xt} of {x.name!r} is not supported (integer inputs only)"
    st = _dtype_name(scale.dtype) if scale is not None else None
    if st is not None and st not in _DQ_SCALE_TYPES:
        return f"scale dtype {st} of {scale.name!r} is not supported (float32, float16)"
    if zp is not None and zp.name:
        zt = _dtype_name(zp.dtype)
        if zt is not None and xt is not None and zt != xt:
            return f"zero point dtype {zt} differs from input dtype {xt}"
    out_t = node.attrs.get("output_dtype", 0)
    if out_t and int(out_t) not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
        return f"output_dtype={int(out_t)} ({_type_name(int(out_t))}) is not supported (float32, float16)"
    for t in node.outputs:
        ot = _dtype_name(t.dtype)
        if ot is not None and ot not in _DQ_SCALE_TYPES:
            return f"output dtype {ot} of {t.name!r} is not supported"
    return None


def _as_int(x: np.ndarray) -> np.ndarray:
    """2/4-bit ml_dtypes arrays as int8/uint8 (same values); numpy integer arrays unchanged."""
    name = x.dtype.name
    if name in _SUBBYTE:
        return x.astype(np.int8 if _SUBBYTE[name][1] else np.uint8)
    if x.dtype.kind not in "iu":
        raise TypeError(f"DequantizeLinear: input dtype {x.dtype} is not an integer type")
    return x


def _quant_param(p: np.ndarray, shape: tuple, axis: int, block: int, what: str) -> np.ndarray:
    """Scale or zero point made broadcastable to ``shape`` (per-tensor, per-axis or blocked)."""
    if p.ndim == 0:
        return p
    if block <= 0:
        if p.size == 1:
            return p.reshape(())
        if p.ndim != 1 or p.shape[0] != shape[axis]:
            raise ValueError(f"DequantizeLinear: {what} of shape {p.shape} is neither a scalar nor a 1-D tensor of "
                             f"length {shape[axis]} (axis {axis} of input shape {shape}); blocked quantization "
                             f"needs block_size > 0")
        dims = [1] * len(shape)
        dims[axis] = p.shape[0]
        return p.reshape(dims)
    expect = list(shape)
    expect[axis] = -(-shape[axis] // block)
    if list(p.shape) != expect:
        raise ValueError(f"DequantizeLinear: blocked {what} has shape {p.shape} but input {shape} with "
                         f"block_size={block} on axis {axis} needs {tuple(expect)} (ceil({shape[axis]}/{block}) "
                         f"blocks)")
    return np.repeat(p, block, axis=axis)[(slice(None),) * axis + (slice(0, shape[axis]),)]


def _dequantize(x, scale, zp, axis: int, block: int, out_dtype) -> np.ndarray:
    xi = _as_int(np.asarray(x))
    scale = np.asarray(scale)
    ax = axis % max(xi.ndim, 1) if xi.ndim else 0
    if block < 0:
        raise ValueError(f"DequantizeLinear: block_size must be positive, got {block}")
    if xi.ndim == 0 and scale.size != 1:
        raise ValueError("DequantizeLinear: a scalar input needs a scalar scale")
    s = _quant_param(scale.astype(F32, copy=False), xi.shape, ax, block, "scale")
    if xi.dtype.itemsize >= 4:  # int32: subtract exactly in int64
        d = xi.astype(np.int64)
        if zp is not None:
            d = d - _quant_param(_as_int(np.asarray(zp)).astype(np.int64), xi.shape, ax, block, "zero point")
        y = d.astype(F32)
    else:  # <= 16 bits: exact in float32
        y = xi.astype(F32)
        if zp is not None:
            y -= _quant_param(_as_int(np.asarray(zp)).astype(F32), xi.shape, ax, block, "zero point")
    y *= s
    return y.astype(out_dtype if out_dtype is not None else scale.dtype, copy=False)


@kernel("DequantizeLinear", since=10, until=28, predicate=_dq_check)
def _dequantize_linear(n: KNode) -> Kernel:
    axis = int(n.attr("axis", 1))
    block = int(n.attr("block_size", 0))
    out_t = int(n.attr("output_dtype", 0) or 0)
    out_dtype = _np_dtype(out_t) if out_t else None

    def run(x, scale, zp=None):
        return _dequantize(x, scale, zp, axis, block, out_dtype)
    return run


# ------------------------------------------------- dequant-matmul (compile rewrite)
#: Upper bound of the fp32 weight slice one DequantMatMul step materialises.
DEQUANT_CHUNK_BYTES = 8 * 2**20
#: X rows up to which DequantMatMul goes tile by tile in cache (a decode step).
GEMV_ROWS = 8
#: fp32 elements of one such tile (1 MiB: about one core's L2).
GEMV_TILE = 1 << 18


def _nibble_table(signed: bool) -> np.ndarray:
    """(256,) float64 whose 8 bytes are the two float32 values of a packed byte's nibbles
    (low nibble first): ``take`` through it decodes a byte into two floats in one pass."""
    v = np.arange(256)
    pair = np.stack([v & 0xF, v >> 4], axis=1)
    if signed:
        pair = np.where(pair >= 8, pair - 16, pair)
    return pair.astype(F32).view(np.float64).reshape(256)


_NIBBLES = {signed: _nibble_table(signed) for signed in (False, True)}
_POOL: tuple[ThreadPoolExecutor, int, int] | None = None  # the executor, its workers, the owning pid
_POOL_LOCK = threading.Lock()


def _threads() -> int:
    """Workers of the tile pool: the BLAS thread setting where one is given, else the cores."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
            return int(os.environ[var])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _pool() -> tuple[ThreadPoolExecutor, int]:
    """The tile pool of this process and its number of workers. A child forked after the pool
    started has the executor but not its threads (work submitted there would never run), so it
    gets a pool of its own."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[2] != os.getpid():
            workers = _threads()
            _POOL = (ThreadPoolExecutor(workers, thread_name_prefix="graphopt-dequant"), workers, os.getpid())
        return _POOL[0], _POOL[1]


def _pack4(w: np.ndarray) -> np.ndarray:
    """(K, N) 4-bit values -> (K, ceil(N/2)) uint8, column 2j in the low nibble of byte j."""
    wi = _as_int(w).astype(np.uint8) & 0xF
    if wi.shape[1] % 2:
        wi = np.concatenate([wi, np.zeros((wi.shape[0], 1), np.uint8)], axis=1)
    return wi[:, 0::2] | (wi[:, 1::2] << 4)


class _QuantWeight:
    """How to turn a slice of a stored quantized 2-D weight (K, N) into float32."""

    def __init__(self, axis: int, block: int, bits: int, signed: bool, n_cols: int):
        self.axis, self.block, self.bits, self.signed, self.n = axis, block, bits, signed, n_cols

    def raw(self, wq: np.ndarray, rows, c0: int, c1: int, out: np.ndarray | None = None) -> np.ndarray:
        """float32 values of rows ``rows`` (slice or index array), columns c0:c1, before scale/zero
        point; ``out``: a float64 buffer of at least (rows, ceil((c1 - c0) / 2)) for 4-bit weights."""
        if self.bits == 4:  # packed; c0 is even
            packed = wq[rows, c0 // 2:(c1 + 1) // 2]
            if out is not None:
                out = out[:packed.shape[0], :packed.shape[1]]
            # every uint8 is a valid index: "clip" skips the bounds check (and, with out, a buffered copy)
            vals = np.take(_NIBBLES[self.signed], packed, out=out, mode="clip").view(F32)
            return vals[:, :c1 - c0]
        return _as_int(wq[rows, c0:c1]).astype(F32)

    def apply(self, w: np.ndarray, scale: np.ndarray, zp, rows, c0: int, c1: int) -> np.ndarray:
        """(w - zp) * scale in place for the slice (rows, c0:c1); ``rows`` is a slice or int array."""
        def param(p):  # slice first, then convert: never a float copy of the whole parameter
            p = np.asarray(p)
            if p.size == 1:  # per-tensor
                return _as_f32(p).reshape(())
            if self.block <= 0:  # per-axis
                return _as_f32(p[rows])[:, None] if self.axis == 0 else _as_f32(p[c0:c1])[None, :]
            if self.axis == 0:  # blocks along rows
                if isinstance(rows, slice):  # rows.start % block == 0: expanded by the blocked view below
                    return _as_f32(p[rows.start // self.block:-(-rows.stop // self.block), c0:c1])
                return _as_f32(p[rows // self.block, c0:c1])
            blk = _as_f32(p[rows, c0 // self.block:-(-c1 // self.block)])  # blocks along columns
            return np.repeat(blk, self.block, axis=1)[:, :c1 - c0]  # c0 % block == 0

        if self.block > 0 and self.axis == 0 and isinstance(rows, slice) and np.asarray(scale).size > 1:
            _blocked_rows(w, param(scale), param(zp) if zp is not None else None, self.block)
            return w
        if zp is not None:
            w -= param(zp)
        w *= param(scale)
        return w


def _as_f32(p) -> np.ndarray:
    p = np.asarray(p)
    return (p if p.dtype.kind == "f" else _as_int(p)).astype(F32, copy=False)


def _blocked_rows(w: np.ndarray, s: np.ndarray, z: np.ndarray | None, block: int) -> None:
    """In place: w (K, c) -= z, *= s where s, z are (ceil(K/block), c), each row repeated block times."""
    k = w.shape[0]
    full = k // block
    if full:
        v = w[:full * block].reshape(full, block, -1)  # a view: w is C-contiguous
        if z is not None:
            v -= z[:full, None, :]
        v *= s[:full, None, :]
    if full * block < k:
        tail = w[full * block:]
        if z is not None:
            tail -= z[full]
        tail *= s[full]


def _quant_layout(w_shape: tuple, scale: np.ndarray, zp: np.ndarray | None, axis: int, block: int) -> str | None:
    """None when (scale, zp, axis, block) describe a valid quantization of a 2-D weight, else why not."""
    k, n = w_shape
    for p, what in ((scale, "scale"), (zp, "zero point")):
        if p is None:
            continue
        if p.size == 1 and (block <= 0 or p.ndim <= 1):
            continue
        if block <= 0:
            if p.shape != (w_shape[axis],):
                return f"{what} shape {p.shape} is not per-tensor or per-axis"
        else:
            expect = [k, n]
            expect[axis] = -(-w_shape[axis] // block)
            if list(p.shape) != expect:
                return f"blocked {what} shape {p.shape} does not match {tuple(expect)}"
    return None


def _is_const(t) -> bool:
    return isinstance(t, gs.Constant)


def fuse_dequant_matmul(model: Model, pack: bool = True) -> int:
    """``DequantizeLinear(W const) -> MatMul(X, .)`` / ``Gather(., ids)`` become DequantMatMul / DequantGather.

    ``pack``: 4-bit weights are stored two columns per byte (the cpu kernel's layout); without
    it they stay the raw constant (``bits`` 0), for a backend that lays them out itself.

    Only fires when every consumer of the dequantized weight is a MatMul reading it as
    its second input or a Gather (axis 0) reading it as data, and the weight is not a
    graph output. Returns the number of consumer nodes replaced.
    """
    graph = model.graph
    in_graph = {id(nd) for nd in graph.nodes}
    outputs = {id(t) for t in graph.outputs}
    count = 0
    packed_cache: dict[int, gs.Constant] = {}
    for dq in list(graph.nodes):
        if dq.op != "DequantizeLinear" or (dq.domain or "") not in ("", "ai.onnx") or len(dq.outputs) != 1:
            continue
        ins = list(dq.inputs)
        w, scale = ins[0], ins[1]
        zp = ins[2] if len(ins) > 2 and ins[2].name else None
        if not (_is_const(w) and _is_const(scale) and (zp is None or _is_const(zp))):
            continue
        out = dq.outputs[0]
        if id(out) in outputs or not out.outputs:
            continue
        consumers = list(out.outputs)
        ok = all(id(c) in in_graph and (c.domain or "") in ("", "ai.onnx") and (
            (c.op == "MatMul" and len(c.inputs) == 2 and c.inputs[1] is out and c.inputs[0] is not out) or
            (c.op == "Gather" and c.inputs[0] is out and c.inputs[1] is not out and int(c.attrs.get("axis", 0)) == 0))
            for c in consumers)
        if not ok or len(w.shape or ()) != 2:
            continue
        wv = const_values(w)
        name = wv.dtype.name
        if name not in _DQ_INPUT_TYPES or name == "int32":  # int32: float32 chunks would round
            continue
        sv = const_values(scale)
        if sv.dtype.name not in _DQ_SCALE_TYPES:
            continue
        zv = const_values(zp) if zp is not None else None
        axis = int(dq.attrs.get("axis", 1))
        if not -2 <= axis <= 1:
            continue
        axis %= 2
        version = op_version("DequantizeLinear", "", model.opset("")) or 21
        block = int(dq.attrs.get("block_size", 0)) if version >= 21 else 0
        if block < 0 or _quant_layout(wv.shape, sv, zv, axis, block) is not None:
            continue  # leave it to DequantizeLinear, which raises the precise error
        out_t = int(dq.attrs.get("output_dtype", 0) or 0)
        out_dtype = _np_dtype(out_t) if out_t else sv.dtype
        bits, signed = _SUBBYTE.get(name, (0, name.startswith("int")))
        if bits == 4 and pack:
            if id(w) not in packed_cache:
                packed_cache[id(w)] = gs.Constant(f"{w.name}__packed4", _pack4(wv))
            stored = packed_cache[id(w)]
        else:
            stored = w
            bits = 0
        attrs = {"axis": axis, "block_size": block, "bits": bits, "signed": int(signed),
                 "n": int(wv.shape[1]), "out_dtype": int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(out_dtype)))}
        qin = [stored, scale] + ([zp] if zp is not None else [gs.Variable.empty()])
        for c in consumers:
            if c.op == "MatMul":
                new = gs.Node("DequantMatMul", name=f"{c.name or 'matmul'}__dq", domain=INTERNAL_DOMAIN,
                              attrs=dict(attrs), inputs=[c.inputs[0]] + qin, outputs=list(c.outputs))
            else:
                new = gs.Node("DequantGather", name=f"{c.name or 'gather'}__dq", domain=INTERNAL_DOMAIN,
                              attrs=dict(attrs), inputs=qin + [c.inputs[1]], outputs=list(c.outputs))
            c.inputs.clear()
            c.outputs.clear()
            graph.nodes.remove(c)
            graph.nodes.append(new)
            count += 1
        dq.inputs.clear()
        dq.outputs.clear()
        graph.nodes.remove(dq)
    if count:
        model.opset_imports.setdefault(INTERNAL_DOMAIN, 1)
    return count


def _qweight(n: KNode) -> _QuantWeight:
    return _QuantWeight(int(n.attr("axis", 0)), int(n.attr("block_size", 0)), int(n.attr("bits", 0)),
                        bool(n.attr("signed", 1)), int(n.attr("n")))


def _chunk_cols(q: _QuantWeight, k: int) -> int:
    cols = max(1, DEQUANT_CHUNK_BYTES // (4 * max(k, 1)))
    align = 1
    if q.bits == 4:
        align = 2
    if q.block > 0 and q.axis == 1:
        align = align * q.block // math.gcd(align, q.block)
    cols = max(align, cols // align * align)
    return min(cols, q.n) if q.n else 1


def _gemv_tiles(q: _QuantWeight, k: int, workers: int) -> tuple[list[tuple[int, int]], int]:
    """Column strips (at least one per worker, ~1024 wide) and the rows of one tile for the
    decode path; strips and tiles respect the packing and block alignment."""
    col_align = 2 if q.bits == 4 else 1
    if q.block > 0 and q.axis == 1:
        col_align = col_align * q.block // math.gcd(col_align, q.block)
    row_align = q.block if q.block > 0 and q.axis == 0 else 8
    strips = max(workers, -(-q.n // 1024))
    cols = -(-q.n // strips)
    cols = max(col_align, -(-cols // col_align) * col_align)
    rows = max(row_align, (GEMV_TILE // cols) // row_align * row_align)
    return [(c0, min(q.n, c0 + cols)) for c0 in range(0, q.n, cols)], min(rows, -(-k // row_align) * row_align)


def _gemv_strips(q: _QuantWeight, xf, wq, scale, zp, out, strips, rows: int) -> None:
    """out[:, c0:c1] = xf @ dequant(W)[:, c0:c1] for each strip, one cache-sized tile at a time."""
    k = wq.shape[0]
    buf = np.empty((rows, -(-max(c1 - c0 for c0, c1 in strips) // 2)), np.float64) if q.bits == 4 else None
    for c0, c1 in strips:
        acc = np.zeros((xf.shape[0], c1 - c0), xf.dtype)
        for r0 in range(0, k, rows):
            r1 = min(k, r0 + rows)
            w = q.apply(q.raw(wq, slice(r0, r1), c0, c1, out=buf), scale, zp, slice(r0, r1), c0, c1)
            acc += xf[:, r0:r1] @ w
        out[:, c0:c1] = acc


@kernel("DequantMatMul", domain=INTERNAL_DOMAIN, predicate=None)
def _dequant_matmul(n: KNode) -> Kernel:
    q = _qweight(n)
    out_dtype = _np_dtype(n.attr("out_dtype", onnx.TensorProto.FLOAT))
    plans: dict[tuple[int, int], tuple[list, int]] = {}  # (rows of W, workers) -> strips per worker, tile rows

    def plan(k: int, workers: int) -> tuple[list, int]:
        if (k, workers) not in plans:
            strips, rows = _gemv_tiles(q, k, workers)
            plans[k, workers] = [strips[i::workers] for i in range(min(workers, len(strips)))], rows
        return plans[k, workers]

    def run(x, wq, scale, zp=None):
        k = wq.shape[0]
        if x.shape[-1] != k:
            raise ValueError(f"DequantMatMul: X has {x.shape[-1]} columns, the weight {k} rows")
        lead = x.shape[:-1]
        xf = x.reshape(-1, k).astype(_compute_dtype(x.dtype), copy=False)
        out = np.empty((xf.shape[0], q.n), dtype=xf.dtype)
        if 0 < xf.shape[0] <= GEMV_ROWS:
            # a weight of less than a tile per worker is not worth the pool's hand-off (tens of µs)
            pool, workers = _pool() if k * q.n >= 2 * GEMV_TILE else (None, 1)
            parts, rows = plan(k, workers)
            futures = [pool.submit(_gemv_strips, q, xf, wq, scale, zp, out, part, rows) for part in parts[1:]]
            _gemv_strips(q, xf, wq, scale, zp, out, parts[0], rows)
            for f in futures:
                f.result()
            return out.reshape(lead + (q.n,)).astype(out_dtype, copy=False)
        step = _chunk_cols(q, k)
        for c0 in range(0, q.n, step):
            c1 = min(q.n, c0 + step)
            w = q.apply(q.raw(wq, slice(0, k), c0, c1), scale, zp, slice(0, k), c0, c1)
            out[:, c0:c1] = xf @ w
            del w  # free this chunk before the next one is built
        return out.reshape(lead + (q.n,)).astype(out_dtype, copy=False)
    return run


@kernel("DequantGather", domain=INTERNAL_DOMAIN, predicate=None)
def _dequant_gather(n: KNode) -> Kernel:
    q = _qweight(n)
    out_dtype = _np_dtype(n.attr("out_dtype", onnx.TensorProto.FLOAT))

    def run(wq, scale, zp, ids):
        rows = wq.shape[0]
        ids = np.asarray(ids).astype(np.int64)
        flat = np.where(ids < 0, ids + rows, ids).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= rows):
            raise IndexError(f"DequantGather: index out of range for {rows} rows")
        w = q.apply(q.raw(wq, flat, 0, q.n), scale, zp, flat, 0, q.n)
        return w.reshape(ids.shape + (q.n,)).astype(out_dtype, copy=False)
    return run


COMPILE_REWRITES.append(fuse_dequant_matmul)
