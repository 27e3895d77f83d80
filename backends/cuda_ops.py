"""Device-side op implementations of the ``cuda`` backend, written against an array module.

A factory takes ``(KNode, Device)`` and returns ``fn(*inputs)``. ``Device.xp`` is CuPy on
a GPU, or numpy when the backend emulates the device (tests without a GPU run the same
code). Inputs listed in :data:`PARAMS` (shapes, axes, starts/ends, ...) always arrive
as host numpy arrays: the runtime computes them on the host or downloads them first.
Everything else arrives in device memory.

This table *is* the backend's declaration: an op is declared exactly when it has a
device implementation here (``backends/cuda.py`` builds the table from it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.backends import cuda_kernels as ck
from graphopt.backends.cpu import INTERNAL_DOMAIN
from graphopt.backends.cpu_kernels import KNode, _axes_from, _identity_of, clip_kernel, cumsum_kernel, slice_index
from graphopt.backends.cpu_fused import (_as_int, _np_dtype, attention_kernel, mask_bias, plain_concat, rms_norm_kernel,
                                         rotary_kernel)

Factory = Callable[[KNode, "Device"], Callable[..., Any]]

#: op -> indices of inputs that are parameters (read on the host as Python ints).
PARAMS: dict[str, frozenset[int]] = {
    "Reshape": frozenset({1}), "Expand": frozenset({1}), "Tile": frozenset({1}), "Split": frozenset({1}),
    "Slice": frozenset({1, 2, 3, 4}), "Squeeze": frozenset({1}), "Unsqueeze": frozenset({1}),
    "ReduceMean": frozenset({1}), "ReduceSum": frozenset({1}), "ReduceMax": frozenset({1}),
    "ReduceMin": frozenset({1}), "ConstantOfShape": frozenset({0}), "Range": frozenset({0, 1, 2}),
    "CumSum": frozenset({1}), "Trilu": frozenset({1}),
}


@dataclass
class Device:
    """The array module and the compiled kernels (None when emulating with numpy)."""

    xp: Any
    kernels: ck.Kernels | None = None

    @property
    def emulated(self) -> bool:
        return self.kernels is None


@dataclass(frozen=True)
class DeviceOp:
    op: str
    domain: str
    since: int
    factory: Factory


DEVICE_OPS: dict[tuple[str, str], DeviceOp] = {}


def device_op(*ops: str, domain: str = "", since: int = 1) -> Callable[[Factory], Factory]:
    def register(factory: Factory) -> Factory:
        for op in ops:
            DEVICE_OPS[(domain, op)] = DeviceOp(op, domain, since, factory)
        return factory
    return register


def _ints(v) -> list[int]:
    return [int(i) for i in np.asarray(v).reshape(-1)]


# ------------------------------------------------------------------ elementwise
def _erf(xp) -> Callable[[Any], Any]:
    if xp is np:  # numpy has no erf: Abramowitz-Stegun 7.1.26 is too coarse; use the cpu kernel's fit
        from graphopt.backends.cpu_kernels import _erf as cpu_erf
        return cpu_erf
    from cupyx.scipy.special import erf
    return lambda x: erf(x).astype(x.dtype, copy=False)


_UNARY = {"Neg": "negative", "Abs": "abs", "Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Sin": "sin", "Cos": "cos",
          "Tanh": "tanh", "Floor": "floor", "Ceil": "ceil", "Reciprocal": "reciprocal"}


def _unary(name: str) -> Factory:
    def factory(n: KNode, d: Device):
        fn = getattr(d.xp, name)
        return lambda x: fn(x).astype(x.dtype, copy=False)
    return factory


for _op, _name in _UNARY.items():
    device_op(_op)(_unary(_name))


@device_op("Erf")
def _erf_op(n: KNode, d: Device):
    return _erf(d.xp)


@device_op("Sigmoid")
def _sigmoid(n: KNode, d: Device):
    xp = d.xp
    return lambda x: (1.0 / (1.0 + xp.exp(-x))).astype(x.dtype, copy=False)


@device_op("Relu")
def _relu(n: KNode, d: Device):
    return lambda x: d.xp.maximum(x, x.dtype.type(0))


@device_op("IsNaN")
def _isnan(n: KNode, d: Device):
    return d.xp.isnan


@device_op("IsInf")
def _isinf(n: KNode, d: Device):
    pos, neg = bool(int(n.attr("detect_positive", 1))), bool(int(n.attr("detect_negative", 1)))
    xp = d.xp
    return lambda x: xp.isinf(x) & (((x > 0) & pos) | ((x < 0) & neg))


@device_op("Not")
def _not(n: KNode, d: Device):
    return d.xp.logical_not


def _binary(name: str, keep_dtype: bool = True) -> Factory:
    def factory(n: KNode, d: Device):
        fn = getattr(d.xp, name)
        if keep_dtype:
            return lambda a, b: fn(a, b).astype(a.dtype, copy=False)
        return fn
    return factory


for _op, _name in {"Add": "add", "Sub": "subtract", "Mul": "multiply"}.items():
    device_op(_op, since=7)(_binary(_name))
for _op, _name in {"Equal": "equal", "Less": "less", "LessOrEqual": "less_equal", "Greater": "greater",
                   "GreaterOrEqual": "greater_equal", "And": "logical_and", "Or": "logical_or"}.items():
    device_op(_op, since=7)(_binary(_name, keep_dtype=False))


@device_op("Div", since=7)
def _div(n: KNode, d: Device):
    xp = d.xp

    def run(a, b):
        if a.dtype.kind in "iu":  # truncation toward zero, as C and the spec do
            return xp.trunc(a.astype(xp.float64) / b.astype(xp.float64)).astype(a.dtype)
        return xp.divide(a, b).astype(a.dtype, copy=False)
    return run


@device_op("Pow", since=7)
def _pow(n: KNode, d: Device):
    xp = d.xp

    def run(a, b):
        if a.dtype.kind in "iu":
            return xp.power(a.astype(xp.float64), b.astype(xp.float64)).astype(a.dtype)
        if b.ndim == 0 or b.size == 1:
            e = float(b.reshape(-1)[0]) if not hasattr(b, "get") else None
            if e == 2.0:
                return a * a
        return xp.power(a, b.astype(a.dtype, copy=False))
    return run


@device_op("Mod", since=10)
def _mod(n: KNode, d: Device):
    xp = d.xp
    if int(n.attr("fmod", 0)):
        return lambda a, b: xp.fmod(a, b).astype(a.dtype, copy=False)

    def run(a, b):
        if a.dtype.kind != "f":
            return xp.mod(a, b).astype(a.dtype, copy=False)
        return floor_mod(xp, a, b).astype(a.dtype, copy=False)
    return run


def floor_mod(xp, a, b):
    """Python's (and numpy's) float ``a mod b``, the sign of ``b``, built on C ``fmod`` as numpy's
    ``npy_divmod`` is: CuPy's ``mod`` takes ``a - floor(a / b) * b``, which differs at the edges
    (``-5 mod inf`` is ``inf``, not ``nan``; ``-0.0``'s sign follows ``b``)."""
    m = xp.fmod(a, b)
    m = xp.where((m != 0) & ((m < 0) != (b < 0)), m + b, m)
    return xp.where(m == 0, xp.copysign(xp.zeros_like(m), b), m)


def _variadic(name: str) -> Factory:
    def factory(n: KNode, d: Device):
        fn = getattr(d.xp, name)

        def run(*xs):
            out = xs[0]
            for x in xs[1:]:
                out = fn(out, x)
            return out.astype(xs[0].dtype, copy=False)
        return run
    return factory


device_op("Sum", since=8)(_variadic("add"))
device_op("Max", since=8)(_variadic("maximum"))
device_op("Min", since=8)(_variadic("minimum"))


@device_op("Where", since=9)
def _where(n: KNode, d: Device):
    return d.xp.where


@device_op("Clip", since=11)
def _clip(n: KNode, d: Device):
    return clip_kernel(d.xp)


@device_op("Cast", since=6)
def _cast(n: KNode, d: Device):
    dtype = _np_dtype(n.attr("to"))
    xp = d.xp

    def run(x):
        if x.dtype.kind == "f" and dtype.kind in "iu":
            return xp.trunc(x).astype(dtype)
        if dtype == np.bool_:
            return x != 0
        return x.astype(dtype, copy=False)
    return run


# ------------------------------------------------------------------ reductions
def _reduce(name: str, axes_input_since: int) -> Factory:
    def factory(n: KNode, d: Device):
        fn = getattr(d.xp, name)
        resolve = _axes_from(n, axes_input_since)  # the cpu kernels' reading of axes/keepdims

        def run(x, axes=None):
            ax, keep = resolve(x, axes)
            if ax == ():  # noop_with_empty_axes
                return x
            if x.size == 0 and name in ("max", "min"):  # the spec: the lowest/highest value of the type
                return _empty_extreme(d.xp, x, ax, keep, name == "max")
            return fn(x, axis=ax, keepdims=keep).astype(x.dtype, copy=False)
        return run
    return factory


def _empty_extreme(xp, x, ax, keep: bool, is_max: bool):
    axes = range(x.ndim) if ax is None else [a % x.ndim for a in ax]
    shape = [1 if i in axes else s for i, s in enumerate(x.shape)] if keep else \
        [s for i, s in enumerate(x.shape) if i not in axes]
    return xp.full(shape, _identity_of(np.max if is_max else np.min, x.dtype), dtype=x.dtype)


device_op("ReduceSum", since=13)(_reduce("sum", 13))
device_op("ReduceMean", since=13)(_reduce("mean", 18))
device_op("ReduceMax", since=13)(_reduce("max", 18))
device_op("ReduceMin", since=13)(_reduce("min", 18))


@device_op("ArgMax", since=13)
def _argmax(n: KNode, d: Device):
    axis, keep = int(n.attr("axis", 0)), bool(n.attr("keepdims", 1))
    last = bool(int(n.attr("select_last_index", 0)))
    xp = d.xp

    def run(x):
        if last:  # the last of equal maxima: search the flipped axis
            idx = (x.shape[axis] - 1 - xp.argmax(xp.flip(x, axis), axis=axis)).astype(xp.int64)
        else:
            idx = xp.argmax(x, axis=axis).astype(xp.int64)
        return xp.expand_dims(idx, axis) if keep else idx
    return run


@device_op("Softmax", since=13)
@device_op("LogSoftmax", since=13)
def _softmax(n: KNode, d: Device):
    axis = int(n.attr("axis", -1))
    log = n.op == "LogSoftmax"
    xp = d.xp

    def run(x):
        ax = axis % x.ndim
        if not log and ax == x.ndim - 1 and x.dtype == np.float32 and d.kernels is not None:
            return d.kernels.softmax_rows(x)
        m = xp.max(x, axis=ax, keepdims=True)
        if log:
            return (x - m - xp.log(xp.sum(xp.exp(x - m), axis=ax, keepdims=True))).astype(x.dtype, copy=False)
        e = xp.exp(x - m)
        return (e / xp.sum(e, axis=ax, keepdims=True)).astype(x.dtype, copy=False)
    return run


# ------------------------------------------------------------------ linear algebra
@device_op("MatMul", since=13)
def _matmul(n: KNode, d: Device):
    """cuBLAS, except where a kernel of ours fits: a float32 GEMV (<= 8 rows) on a k-contiguous weight
    (the runtime stores constant MatMul weights so) and small batched products. Those are what a
    decode step runs, and CuPy refuses cuBLAS inside a CUDA-graph capture."""
    xp = d.xp

    def run(a, b):
        k = d.kernels
        if k is None or a.dtype != np.float32 or b.dtype != np.float32 or a.ndim < 2 or b.ndim < 2:
            return xp.matmul(a, b)
        y = _gemv_f32(a, b, d)
        if y is not None:
            return y
        batch = math.prod(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
        if batch * a.shape[-2] * a.shape[-1] * b.shape[-1] <= ck.MM_SMALL_MACS:
            return k.mm_small(a, b)
        return xp.matmul(a, b)
    return run


def _gemv_f32(x: Any, w: Any, d: Device, bias: Any = None, resid: Any = None) -> Any | None:
    """``x @ w (+ bias [n]) (+ resid)`` by the float32 GEMV kernel when it applies (a GPU, float32,
    <= GEMV_MAX_ROWS rows, ``w`` 2-D and k-contiguous), else None."""
    rows = math.prod(x.shape[:-1])
    if not (d.kernels is not None and x.dtype == w.dtype == np.float32 and w.ndim == 2 and w.strides[0] == 4
            and 0 < rows <= ck.GEMV_MAX_ROWS and w.shape[0] > 0):
        return None
    xp, n = d.xp, w.shape[1]
    x2 = xp.ascontiguousarray(x.reshape(rows, x.shape[-1]))
    r2 = xp.ascontiguousarray(resid.reshape(rows, n), dtype=xp.float32) if resid is not None else None
    return d.kernels.gemv_f32(x2, w, w.strides[1] // 4, n, bias, r2).reshape(x.shape[:-1] + (n,))


@device_op("Gemm", since=13)
def _gemm(n: KNode, d: Device):
    alpha, beta = float(n.attr("alpha", 1.0)), float(n.attr("beta", 1.0))
    ta, tb = int(n.attr("transA", 0)), int(n.attr("transB", 0))

    def run(a, b, c=None):
        y = (a.T if ta else a) @ (b.T if tb else b)
        if alpha != 1.0:
            y = y * a.dtype.type(alpha)
        if c is not None:
            y = y + (c * c.dtype.type(beta) if beta != 1.0 else c)
        return y.astype(a.dtype, copy=False)
    return run


@device_op("RMSNormalization", since=23)
def _rms_norm(n: KNode, d: Device):
    axis, eps = int(n.attr("axis", -1)), float(n.attr("epsilon", 1e-5))
    general = rms_norm_kernel(n, d.xp)  # the cpu kernel's code over the array module

    def run(x, scale):
        if axis % x.ndim == x.ndim - 1 and x.dtype == scale.dtype == np.float32 and scale.shape == x.shape[-1:]:
            if d.kernels is not None:
                return d.kernels.rms_norm(x, scale, eps)
            return ck.rms_norm_twin(x, scale, eps, d.xp)
        return general(x, scale)
    return run


@device_op("RotaryEmbedding", since=23)
def _rotary(n: KNode, d: Device):
    return rotary_op(n, d)


def rotary_op(n: KNode, d: Device) -> Callable[..., Any]:
    """``RotaryEmbedding``: the ``rotary`` kernel (one launch) for float32 inputs whose caches match
    the spec's shapes; otherwise the cpu kernel's code over the array module (which also raises
    the precise errors)."""
    general = rotary_kernel(n, d.xp)
    if d.kernels is None:
        return general
    xp = d.xp
    interleaved = bool(int(n.attr("interleaved", 0)))
    rot_attr = int(n.attr("rotary_embedding_dim", 0))
    num_heads = int(n.attr("num_heads", 0))

    def run(x, cos, sin, position_ids=None):
        if x.dtype != np.float32 or cos.dtype != np.float32 or sin.dtype != np.float32 or x.ndim not in (3, 4) \
                or (x.ndim == 3 and (num_heads <= 0 or x.shape[2] % num_heads)):
            return general(x, cos, sin, position_ids)
        if x.ndim == 3:
            b, s = x.shape[:2]
            view = (lambda a: a.reshape(b, s, num_heads, a.shape[2] // num_heads))
        else:
            b, s = x.shape[0], x.shape[2]
            view = (lambda a: a.transpose(0, 2, 1, 3))
        x4 = view(x)
        head = x4.shape[3]
        rot = rot_attr or head
        half = rot // 2
        if rot % 2 or rot > head or cos.shape != sin.shape or cos.shape[-1] != half:
            return general(x, cos, sin, position_ids)
        if position_ids is not None:
            ok = cos.ndim == 2 and position_ids.ndim == 2 and position_ids.shape[1] == s \
                and position_ids.shape[0] in (1, b)
        else:
            ok = cos.ndim == 3 and cos.shape[1] == s and cos.shape[0] in (1, b)
        if not ok or x4.strides[-1] != 4:
            return general(x, cos, sin, position_ids)
        y = xp.empty(x.shape, xp.float32)
        pid = position_ids.astype(xp.int64, copy=False) if position_ids is not None else None
        d.kernels.rotary(x4, xp.ascontiguousarray(cos), xp.ascontiguousarray(sin), pid, view(y), half, interleaved)
        return y
    return run


@device_op("Attention", since=23)
def _attention(n: KNode, d: Device):
    return attention_op(n, d)


def attention_op(n: KNode, d: Device, concat: Callable | None = None) -> Callable[..., Any]:
    """``Attention``: the ``attn_decode`` kernel for few query rows (a decode step: one launch per
    layer instead of ~25 array operations), the cpu kernel's code over CuPy (cuBLAS batched
    matmuls) for everything else. ``concat(past, new, which)`` appends to the KV cache."""
    general = attention_kernel(n, d.xp, concat)
    cat = concat or plain_concat(d.xp)
    a = n.attrs
    xp = d.xp
    simple = (n.n_outputs <= 3 and int(a.get("qk_matmul_output_mode", 0)) == 0
              and int(a.get("softmax_precision", 1) or 1) == 1
              and (n.version < 25 or (int(a.get("left_window_size", -1)) == -1
                                      and int(a.get("right_window_size", -1)) == -1)))
    q_heads, kv_heads = a.get("q_num_heads"), a.get("kv_num_heads")
    is_causal = bool(int(a.get("is_causal", 0)))
    softcap = float(a.get("softcap", 0.0))

    def heads(t, count):  # [B, S, H*D] -> [B, H, S, D], a view
        b, s, hidden = t.shape
        return t.reshape(b, s, int(count), hidden // int(count)).transpose(0, 2, 1, 3)

    def run(q, k, v, mask=None, past_k=None, past_v=None, nonpad=None):
        three_d = q.ndim == 3
        rows = q.shape[1] if three_d else (q.shape[2] if q.ndim == 4 else 0)
        keys = (k.shape[1] if three_d else k.shape[-2]) + (past_k.shape[2] if past_k is not None else 0)
        if not (simple and nonpad is None and q.ndim in (3, 4) and q.ndim == k.ndim == v.ndim
                and (past_k is None) == (past_v is None) and q.dtype == k.dtype == v.dtype == np.float32
                and 0 < rows <= ck.ATTN_MAX_ROWS and keys <= ck.ATTN_MAX_KEYS
                and (not three_d or (q_heads and kv_heads and q.shape[2] % int(q_heads) == 0
                                     and k.shape[2] % int(kv_heads) == 0 and v.shape[2] % int(kv_heads) == 0))):
            return general(q, k, v, mask, past_k, past_v, nonpad)
        q4, k4, v4 = (heads(q, q_heads), heads(k, kv_heads), heads(v, kv_heads)) if three_d else (q, k, v)
        b, hq, sq, dim = q4.shape
        if hq % k4.shape[1] or v4.shape[1] != k4.shape[1] or v4.shape[-1] != dim or k4.shape[-1] != dim:
            return general(q, k, v, mask, past_k, past_v, nonpad)
        past_len = 0
        if past_k is not None:
            past_len = past_k.shape[2]
            k4, v4 = cat(past_k, k4, "key"), cat(past_v, v4, "value")
        t = k4.shape[2]
        bias = None
        if mask is not None:
            bias = mask_bias(mask, t, np.dtype(np.float32), xp)
            bias = xp.broadcast_to(bias, (b, hq, sq, t))
            if bias.strides[-1] != 4:
                bias = xp.ascontiguousarray(bias)
        # the kernel reads each row's last axis contiguously
        q4, k4, v4 = (a if a.strides[-1] == 4 else xp.ascontiguousarray(a) for a in (q4, k4, v4))
        scale = float(a["scale"]) if a.get("scale") is not None else 1.0 / math.sqrt(dim)
        causal = past_len if is_causal else -1
        if three_d:
            y = xp.empty((b, sq, hq * dim), xp.float32)
            y4 = y.reshape(b, sq, hq, dim).transpose(0, 2, 1, 3)
        else:
            y = y4 = xp.empty((b, hq, sq, dim), xp.float32)
        if d.kernels is not None:
            d.kernels.attention(q4, k4, v4, bias, y4, scale, softcap, causal)
        else:
            y4[...] = ck.attention_twin(q4, k4, v4, bias, scale, softcap, causal, xp)
        return y, k4, v4, None
    return run


# ------------------------------------------------------------------ data movement
@device_op("Identity")
def _identity(n: KNode, d: Device):
    return lambda x: x


@device_op("Shape")
def _shape(n: KNode, d: Device):
    # runs on the host (a shape never needs the device): see the runtime's classification
    start, end = n.attr("start", 0), n.attr("end")

    def run(x):
        dims = np.array(x.shape, dtype=np.int64)
        return dims[start:end] if end is not None else dims[start:]
    return run


@device_op("Size")
def _size(n: KNode, d: Device):
    return lambda x: np.array(math.prod(x.shape), dtype=np.int64)


@device_op("Reshape", since=5)
def _reshape(n: KNode, d: Device):
    allowzero = int(n.attr("allowzero", 0))

    def run(x, shape):
        dims = _ints(shape)
        if not allowzero:
            dims = [x.shape[i] if s == 0 else s for i, s in enumerate(dims)]
        return x.reshape(dims)
    return run


@device_op("Flatten", since=13)
def _flatten(n: KNode, d: Device):
    axis = int(n.attr("axis", 1))

    def run(x):
        ax = axis % x.ndim if x.ndim and axis < 0 else axis
        return x.reshape(int(math.prod(x.shape[:ax])), -1)
    return run


@device_op("Transpose")
def _transpose(n: KNode, d: Device):
    perm = n.attr("perm")
    return lambda x: d.xp.transpose(x, perm)


@device_op("Squeeze", since=13)
def _squeeze(n: KNode, d: Device):
    def run(x, axes=None):
        return d.xp.squeeze(x) if axes is None else d.xp.squeeze(x, axis=tuple(_ints(axes)))
    return run


@device_op("Unsqueeze", since=13)
def _unsqueeze(n: KNode, d: Device):
    def run(x, axes):
        ax = _ints(axes)
        rank = x.ndim + len(ax)
        return d.xp.expand_dims(x, tuple(sorted(a % rank for a in ax)))
    return run


@device_op("Concat", since=4)
def _concat(n: KNode, d: Device):
    axis = int(n.attr("axis"))
    return lambda *xs: d.xp.concatenate(xs, axis=axis)


@device_op("Split", since=13)
def _split(n: KNode, d: Device):
    axis = int(n.attr("axis", 0))
    num_outputs = n.attr("num_outputs", n.n_outputs)

    def run(x, split=None):
        size = x.shape[axis]
        if split is None:
            k = int(num_outputs)
            chunk = -(-size // k)
            sizes = [chunk] * (k - 1) + [size - chunk * (k - 1)]
        else:
            sizes = _ints(split)
        bounds = np.cumsum(sizes)[:-1].tolist()
        return tuple(d.xp.split(x, bounds, axis=axis))
    return run


@device_op("Slice", since=13)
def _slice(n: KNode, d: Device):
    def run(x, starts, ends, axes=None, steps=None):
        return x[slice_index(x.shape, _ints(starts), _ints(ends), None if axes is None else _ints(axes),
                             None if steps is None else _ints(steps))]
    return run


def _gather_along(take: str) -> Factory:
    """Gather / GatherElements: negative indices count from the end of ``axis``."""
    def factory(n: KNode, d: Device):
        axis = int(n.attr("axis", 0))
        xp = d.xp
        fn = getattr(xp, take)

        def run(x, idx):
            return fn(x, xp.where(idx < 0, idx + x.shape[axis], idx), axis=axis)
        return run
    return factory


device_op("Gather", since=13)(_gather_along("take"))
device_op("GatherElements", since=13)(_gather_along("take_along_axis"))


@device_op("GatherND", since=13)
def _gather_nd(n: KNode, d: Device):
    bd = int(n.attr("batch_dims", 0))
    xp = d.xp

    def run(x, idx):
        nb = int(math.prod(x.shape[:bd]))
        xb = x.reshape((nb,) + tuple(x.shape[bd:]))
        ib = idx.reshape((nb,) + tuple(idx.shape[bd:])).astype(xp.int64, copy=False)
        k = int(ib.shape[-1])
        cols = []  # negative indices count from the end (no host array: a CUDA graph can capture this)
        for i in range(k):
            c = ib[..., i]
            cols.append(xp.where(c < 0, c + xb.shape[1 + i], c))
        b = xp.arange(nb).reshape((nb,) + (1,) * (ib.ndim - 2))
        res = xb[(b,) + tuple(cols)]
        return res.reshape(tuple(idx.shape[:-1]) + tuple(x.shape[bd + k:]))
    return run


@device_op("Expand", since=13)
def _expand(n: KNode, d: Device):
    def run(x, shape):
        return d.xp.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(_ints(shape))))
    return run


@device_op("Tile", since=13)
def _tile(n: KNode, d: Device):
    return lambda x, reps: d.xp.tile(x, _ints(reps))


@device_op("Range", since=11)
def _range(n: KNode, d: Device):
    def run(start, limit, delta):
        dtype = np.asarray(start).dtype
        return d.xp.asarray(np.arange(start, limit, delta).astype(dtype))
    return run


@device_op("ConstantOfShape", since=9)
def _constant_of_shape(n: KNode, d: Device):
    value = n.attr("value")
    vals = getattr(value, "values", value)
    fill = np.asarray(vals if vals is not None else np.zeros(1, np.float32)).reshape(-1)
    return lambda shape: d.xp.full(_ints(shape), fill[0], dtype=fill.dtype)


@device_op("Trilu", since=14)
def _trilu(n: KNode, d: Device):
    upper = int(n.attr("upper", 1))

    def run(x, k=None):
        kk = 0 if k is None else _ints(k)[0]
        return d.xp.triu(x, kk) if upper else d.xp.tril(x, kk)
    return run


@device_op("CumSum", since=14)
def _cumsum(n: KNode, d: Device):
    return cumsum_kernel(n, d.xp)  # the axis is a parameter: a host array


# ------------------------------------------------------------------ quantized weights
def gemv_weight(wq: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, attrs: dict, xp: Any,
                transposed: bool = False) -> ck.GemvWeight | None:
    """A ``DequantMatMul``'s constant operands in the GEMV layout, or None when its layout
    (blocks along the output axis) is not one the kernel reads."""
    axis, block = int(attrs.get("axis", 0)), int(attrs.get("block_size", 0))
    raw = np.asarray(wq)  # the raw constant (the cpu rewrite runs with pack=False for this backend)
    four = raw.dtype.name in ("int4", "uint4")  # 4-bit codes stay 4-bit on the device
    codes = _as_int(raw)  # [K, N] as stored (or [N, K] transposed)
    signed = codes.dtype == np.int8
    s = np.asarray(scale, np.float32)
    z = _as_int(np.asarray(zp)).astype(np.float32) if zp is not None else None
    if transposed:  # the weight is W^T: [N, K] with blocks along K (axis 1)
        codes = codes.T
        axis = 1 - axis
        s = s.T if s.ndim == 2 else s
        z = z.T if z is not None and z.ndim == 2 else z
    k, nn = codes.shape
    if s.size == 1:
        s2, z2, blk = np.full((1, nn), float(s.reshape(-1)[0]), np.float32), None, k
        if z is not None:
            z2 = np.full((1, nn), float(z.reshape(-1)[0]), np.float32)
    elif block <= 0 and axis == 1:  # per output column
        s2, blk = s.reshape(1, nn), k
        z2 = z.reshape(1, nn) if z is not None else None
    elif block > 0 and axis == 0:  # blocks along K: the layout the quantize pass writes for MatMul
        s2, blk = s, block
        z2 = z
    else:
        return None
    return ck.gemv_layout(codes, s2, z2, 4 if four else 8, signed, blk, xp)


#: Largest float32 tile (bytes) the prefill path of a quantized MatMul materialises at once.
DQ_TILE_BYTES = 32 * 2**20


def dq_matmul(x: Any, w: ck.GemvWeight, d: Device, bias: Any = None, resid: Any = None) -> Any:
    """``x @ dequantize(w) (+ bias) (+ resid)`` for float32 x [..., K]: GEMV for few rows (the
    additions in its epilogue), else tiles + cuBLAS."""
    xp = d.xp
    lead = x.shape[:-1]
    x2 = xp.ascontiguousarray(x.reshape(-1, w.k), dtype=xp.float32)
    m = x2.shape[0]
    r2 = xp.ascontiguousarray(resid.reshape(m, w.n), dtype=xp.float32) if resid is not None else None
    b1 = xp.ascontiguousarray(bias.reshape(w.n), dtype=xp.float32) if bias is not None else None
    if m <= ck.GEMV_MAX_ROWS and d.kernels is not None:
        y = d.kernels.dq_gemv(x2, w, b1, r2)
    else:
        y = xp.empty((m, w.n), xp.float32)
        step = max(1, DQ_TILE_BYTES // (4 * max(w.k, 1)))
        for n0 in range(0, w.n, step):
            n1 = min(w.n, n0 + step)
            tile = d.kernels.dq_unpack(w, n0, n1) if d.kernels is not None else ck.unpack_twin(w, xp, n0, n1)
            y[:, n0:n1] = x2 @ tile
        if b1 is not None:
            y += b1
        if r2 is not None:
            y += r2
    return y.reshape(lead + (w.n,))


@device_op("DequantizeLinear", since=21)
def _dequantize_linear(n: KNode, d: Device):
    axis = int(n.attr("axis", 1))
    block = int(n.attr("block_size", 0))
    out_t = int(n.attr("output_dtype", 0) or 0)
    xp = d.xp

    def run(x, scale, zp=None):
        ax = axis % x.ndim if x.ndim else 0
        y = x.astype(xp.float32)

        def expand(p):
            p = p.astype(xp.float32)
            if p.ndim == 0 or p.size == 1:
                return p.reshape(())
            if block <= 0:
                dims = [1] * x.ndim
                dims[ax] = p.shape[0]
                return p.reshape(dims)
            return xp.repeat(p, block, axis=ax)[(slice(None),) * ax + (slice(0, x.shape[ax]),)]

        if zp is not None:
            y -= expand(zp)
        y *= expand(scale)
        return y.astype(_np_dtype(out_t) if out_t else scale.dtype, copy=False)
    return run


@device_op("DequantMatMul", domain=INTERNAL_DOMAIN)
def _dequant_matmul(n: KNode, d: Device):
    # the runtime passes the prepared GemvWeight (built once at compile) as the second input, then
    # the epilogue's operands (attribute "epilogue": "", "bias", "resid" or "bias,resid")
    parts = _epilogue(n)
    out_dtype = _out_dtype(n)

    def run(x, w, *extra):
        ops = dict(zip(parts, extra))
        return dq_matmul(x, w, d, ops.get("bias"), ops.get("resid")).astype(out_dtype, copy=False)
    return run


@device_op("MatMulEpilogue", domain=INTERNAL_DOMAIN)
def _matmul_epilogue(n: KNode, d: Device):
    # (x, W, extras): a float32 MatMul on a constant W (stored k-contiguous) whose bias / residual Adds
    # were folded in (attribute "epilogue": "bias", "resid" or both, in input order)
    parts = _epilogue(n)
    width = int(n.attr("n"))
    xp = d.xp
    matmul = _matmul(n, d)

    def run(x, w, *extra):
        ops = dict(zip(parts, extra))
        bias, resid = ops.get("bias"), ops.get("resid")
        b1 = xp.ascontiguousarray(bias.reshape(width), dtype=xp.float32) if bias is not None else None
        y = _gemv_f32(x, w, d, b1, resid)
        if y is not None:
            return y
        y = matmul(x, w)
        if b1 is not None:
            y = y + b1
        if resid is not None:
            y = y + resid.reshape(y.shape)
        return y
    return run


def _epilogue(n: KNode) -> list[str]:
    """The operands a fused matmul's epilogue adds, in input order ("bias", "resid")."""
    return [p for p in str(n.attr("epilogue", "") or "").split(",") if p]


def _out_dtype(n: KNode) -> np.dtype:
    """A fused dequant node's result type: its output's (float16 models stay float16), else float32."""
    known = n.output_dtypes[0] if n.output_dtypes else None
    return np.dtype(known) if known is not None else np.dtype(np.float32)


@device_op("DequantGather", domain=INTERNAL_DOMAIN)
def _dequant_gather(n: KNode, d: Device):
    # the runtime passes (GemvWeight of the table's transpose: columns are rows of the table, ids)
    xp = d.xp
    out_dtype = _out_dtype(n)

    def run(w: ck.GemvWeight, ids):
        flat = ids.reshape(-1)
        flat = xp.where(flat < 0, flat + w.n, flat)
        sub = ck.GemvWeight(w.k, int(flat.shape[0]), w.bits, w.signed, w.block, xp.take(w.codes, flat, axis=0),
                            xp.take(w.scale, flat, axis=0),
                            xp.take(w.zero, flat, axis=0) if w.zero is not None else None)
        rows = ck.unpack_twin(sub, xp).T  # [ids, K]
        return rows.reshape(tuple(ids.shape) + (w.k,)).astype(out_dtype, copy=False)
    return run


@device_op("FusedElementwise", domain=INTERNAL_DOMAIN)
def _fused_elementwise(n: KNode, d: Device):
    import json

    from graphopt.backends.cuda_fusion import make_kernel

    return make_kernel(json.loads(n.attr("expr")), d.xp, d.emulated)
