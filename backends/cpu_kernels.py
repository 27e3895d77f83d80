"""numpy kernels of the ``cpu`` backend, and the table they declare.

A kernel is a *factory*: given a :class:`KNode` (op, attributes, op version,
dtypes, known shapes) it returns ``fn(*inputs) -> array | tuple``. Attributes
are parsed once at compile time, never per run. Missing optional inputs arrive
as ``None``.

The backend's declared op table is built from this registry, so it declares
exactly what has a kernel; a predicate narrows a declaration where a kernel
does not cover every case (dtypes numpy cannot hold, unusual attributes).
The ONNX backend node tests run against every declaration
(``tests/backends/test_cpu_conformance.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

Kernel = Callable[..., Any]
Factory = Callable[["KNode"], Kernel]


@dataclass
class KNode:
    """What a kernel factory may look at."""

    op: str
    domain: str
    version: int
    attrs: dict[str, Any]
    n_inputs: int
    n_outputs: int
    input_dtypes: list[np.dtype | None] = field(default_factory=list)
    output_dtypes: list[np.dtype | None] = field(default_factory=list)
    input_shapes: list[tuple | None] = field(default_factory=list)
    name: str = ""

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


@dataclass(frozen=True)
class KernelSpec:
    op: str
    domain: str
    since: int
    until: int | None
    factory: Factory
    predicate: Callable[[gs.Node, Any], str | None] | None = None


KERNELS: list[KernelSpec] = []

# dtypes numpy represents exactly; everything else (bfloat16, float8, int4, strings) is refused
_STD_KINDS = set("biuf")


def _is_std(dtype) -> bool:
    if dtype is None:
        return True  # unknown: decided at run time by numpy itself
    try:
        if isinstance(dtype, (int, np.integer)):
            dtype = onnx.helper.tensor_dtype_to_np_dtype(int(dtype))
        dt = np.dtype(dtype)
    except (TypeError, KeyError, ValueError):
        return False
    return dt.kind in _STD_KINDS and dt.type.__module__ == "numpy"


def _type_name(dtype) -> str:
    if isinstance(dtype, (int, np.integer)):
        return onnx.TensorProto.DataType.Name(int(dtype)).lower()
    return str(dtype)


def std_dtypes(node: gs.Node, model: Any) -> str | None:
    """Predicate: plain tensors only, and every known dtype is one numpy holds exactly."""
    for t in list(node.inputs) + list(node.outputs):
        if t.name and getattr(t, "type", "tensor_type") != "tensor_type":
            return f"{t.name!r} is a {t.type.replace('_type', '')}, only tensors are supported"
        if t.name and not _is_std(t.dtype):
            return f"dtype {_type_name(t.dtype)} of {t.name!r} is not supported"
    for key in ("to",):
        if key in node.attrs and not _is_std(node.attrs[key]):
            return f"{key}={node.attrs[key]} is not supported"
    return None


def kernel(*ops: str, domain: str = "", since: int = 1, until: int | None = None,
           predicate: Callable | None = std_dtypes) -> Callable[[Factory], Factory]:
    def register(factory: Factory) -> Factory:
        for op in ops:
            KERNELS.append(KernelSpec(op, domain, since, until, factory, predicate))
        return factory
    return register


def find_kernel(op: str, domain: str, version: int | None) -> KernelSpec | None:
    for spec in KERNELS:
        if spec.op == op and spec.domain == domain and (
                version is None or (spec.since <= version and (spec.until is None or version <= spec.until))):
            return spec
    return None


# ---------------------------------------------------------------- elementwise
def _same(fn: Callable) -> Factory:
    """Elementwise op whose result keeps the input dtype."""
    def factory(n: KNode) -> Kernel:
        def run(x):
            return np.asarray(fn(x), dtype=x.dtype)
        return run
    return factory


def _erf(x: np.ndarray) -> np.ndarray:
    # numpy has no erf; Numerical Recipes' Chebyshev fit of erfc, |relative error| < 1.2e-7.
    x64 = x.astype(np.float64)
    s = np.sign(x64)
    a = np.abs(x64)
    t = 1.0 / (1.0 + 0.5 * a)
    y = t * np.exp(-a * a - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
    return (s * (1.0 - y)).astype(x.dtype)


for _op, _fn in {
    "Neg": np.negative, "Abs": np.abs, "Exp": np.exp, "Log": np.log, "Sqrt": np.sqrt, "Sin": np.sin,
    "Cos": np.cos, "Tanh": np.tanh, "Floor": np.floor, "Ceil": np.ceil, "Sign": np.sign,
    "Reciprocal": np.reciprocal, "Erf": _erf, "Round": np.round,
}.items():
    kernel(_op)(_same(_fn))


@kernel("Sigmoid")
def _sigmoid(n: KNode) -> Kernel:
    def run(x):
        with np.errstate(over="ignore"):
            return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype)
    return run


@kernel("Relu")
def _relu(n: KNode) -> Kernel:
    return lambda x: np.maximum(x, np.zeros((), dtype=x.dtype))


@kernel("Gelu", since=20)
def _gelu(n: KNode) -> Kernel:
    if n.attr("approximate", "none") == "tanh":
        def run(x):
            c = np.sqrt(2.0 / np.pi)
            return (0.5 * x * (1.0 + np.tanh(c * (x + 0.044715 * x**3)))).astype(x.dtype)
    else:
        def run(x):
            return (0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))).astype(x.dtype)
    return run


@kernel("IsNaN")
def _isnan(n: KNode) -> Kernel:
    return np.isnan


@kernel("IsInf")
def _isinf(n: KNode) -> Kernel:
    pos, neg = int(n.attr("detect_positive", 1)), int(n.attr("detect_negative", 1))
    return lambda x: (np.isposinf(x) & bool(pos)) | (np.isneginf(x) & bool(neg))


@kernel("Not")
def _not(n: KNode) -> Kernel:
    return np.logical_not


def _binary(fn: Callable, keep_dtype: bool = True) -> Factory:
    def factory(n: KNode) -> Kernel:
        if keep_dtype:
            return lambda a, b: np.asarray(fn(a, b)).astype(a.dtype, copy=False)
        return lambda a, b: np.asarray(fn(a, b))
    return factory


def _int_div(a, b):
    if a.dtype.kind in "iu":
        q = np.trunc(a.astype(np.float64) / b.astype(np.float64))
        return q.astype(a.dtype)
    return np.divide(a, b)


def _pow(a, b):
    if a.dtype.kind in "iu":
        return np.power(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)
    return np.power(a, b.astype(a.dtype) if b.dtype.kind == "f" or b.dtype != a.dtype else b)


kernel("Add", since=7)(_binary(np.add))
kernel("Sub", since=7)(_binary(np.subtract))
kernel("Mul", since=7)(_binary(np.multiply))
kernel("Div", since=7)(_binary(_int_div))
kernel("Pow", since=7)(_binary(_pow))
kernel("Equal", since=7)(_binary(np.equal, keep_dtype=False))
kernel("Less", since=7)(_binary(np.less, keep_dtype=False))
kernel("LessOrEqual")(_binary(np.less_equal, keep_dtype=False))
kernel("Greater", since=7)(_binary(np.greater, keep_dtype=False))
kernel("GreaterOrEqual")(_binary(np.greater_equal, keep_dtype=False))
kernel("And", since=7)(_binary(np.logical_and, keep_dtype=False))
kernel("Or", since=7)(_binary(np.logical_or, keep_dtype=False))
kernel("Xor", since=7)(_binary(np.logical_xor, keep_dtype=False))


@kernel("Mod", since=10)
def _mod(n: KNode) -> Kernel:
    if int(n.attr("fmod", 0)):
        return lambda a, b: np.fmod(a, b).astype(a.dtype)
    return lambda a, b: np.mod(a, b).astype(a.dtype)


def _variadic(fn: Callable) -> Factory:
    def factory(n: KNode) -> Kernel:
        def run(*xs):
            out = xs[0]
            for x in xs[1:]:
                out = fn(out, x)
            return np.asarray(out).astype(xs[0].dtype, copy=False)
        return run
    return factory


kernel("Max", since=8)(_variadic(np.maximum))
kernel("Min", since=8)(_variadic(np.minimum))
kernel("Sum", since=8)(_variadic(np.add))


@kernel("Mean", since=8)
def _mean(n: KNode) -> Kernel:
    return lambda *xs: (sum(x.astype(np.float64) for x in xs) / len(xs)).astype(xs[0].dtype)


@kernel("Where", since=9)
def _where(n: KNode) -> Kernel:
    return lambda c, a, b: np.where(c, a, b)


def clip_kernel(xp) -> Kernel:
    """``Clip`` over the array module ``xp`` (numpy here, CuPy on the cuda backend)."""
    def run(x, lo=None, hi=None):
        out = x
        if lo is not None:
            out = xp.maximum(out, lo)
        if hi is not None:
            out = xp.minimum(out, hi)
        return out.astype(x.dtype, copy=False)
    return run


@kernel("Clip", since=11)
def _clip(n: KNode) -> Kernel:
    return clip_kernel(np)


# ------------------------------------------------------------------- casting
def _np_dtype(onnx_type: int) -> np.dtype:
    return onnx.helper.tensor_dtype_to_np_dtype(int(onnx_type))


def _cast_to(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if x.dtype.kind == "f" and dtype.kind in "iu":
        with np.errstate(invalid="ignore"):
            return np.trunc(x).astype(dtype)
    if dtype == np.bool_:
        return x != 0
    return x.astype(dtype)


@kernel("Cast", since=6, until=25)
def _cast(n: KNode) -> Kernel:
    dtype = _np_dtype(n.attr("to"))
    return lambda x: _cast_to(x, dtype)


@kernel("CastLike", since=15, until=25)
def _castlike(n: KNode) -> Kernel:
    return lambda x, like: _cast_to(x, like.dtype)


# ----------------------------------------------------------------- reductions
def _axes_from(n: KNode, axes_input_since: int) -> Callable:
    """Reduce ops take axes as an attribute before ``axes_input_since``, as an input after."""
    keepdims = bool(n.attr("keepdims", 1))
    noop_empty = bool(n.attr("noop_with_empty_axes", 0))
    attr_axes = n.attr("axes")

    def resolve(x, axes=None):
        if n.version < axes_input_since:
            axes = attr_axes
        if axes is None or (hasattr(axes, "size") and axes.size == 0):
            return None if not noop_empty else (), keepdims
        return tuple(int(a) for a in np.asarray(axes).reshape(-1)), keepdims
    return resolve


def _identity_of(fn: Callable, dtype: np.dtype) -> Any:
    """What max/min of an empty set is (the spec: the lowest/highest value of the type)."""
    if fn is np.max:
        return False if dtype == np.bool_ else (-np.inf if dtype.kind == "f" else np.iinfo(dtype).min)
    if fn is np.min:
        return True if dtype == np.bool_ else (np.inf if dtype.kind == "f" else np.iinfo(dtype).max)
    return None


def _reduce(fn: Callable, axes_input_since: int, post: Callable | None = None) -> Factory:
    def factory(n: KNode) -> Kernel:
        resolve = _axes_from(n, axes_input_since)

        def run(x, axes=None):
            ax, keep = resolve(x, axes)
            if ax == ():
                return post(x) if post else x
            initial = _identity_of(fn, x.dtype) if x.size == 0 else None
            if initial is not None:
                out = fn(x, axis=ax, keepdims=keep, initial=initial)
                return np.asarray(out).astype(x.dtype, copy=False)
            out = fn(x, axis=ax, keepdims=keep)
            out = post(out) if post else out
            return np.asarray(out).astype(x.dtype, copy=False)
        return run
    return factory


kernel("ReduceSum", since=1)(_reduce(np.sum, 13))
kernel("ReduceMean", since=1)(_reduce(np.mean, 18))
kernel("ReduceMax", since=1)(_reduce(np.max, 18))
kernel("ReduceMin", since=1)(_reduce(np.min, 18))
kernel("ReduceProd", since=1)(_reduce(np.prod, 18))
kernel("ReduceSumSquare", since=1)(_reduce(lambda x, **k: np.sum(x * x, **k), 18))
kernel("ReduceL2", since=1)(_reduce(lambda x, **k: np.sqrt(np.sum(x * x, **k)), 18))
kernel("ReduceL1", since=1)(_reduce(lambda x, **k: np.sum(np.abs(x), **k), 18))


def _arg(fn: Callable) -> Factory:
    def factory(n: KNode) -> Kernel:
        axis, keep, last = int(n.attr("axis", 0)), bool(n.attr("keepdims", 1)), bool(n.attr("select_last_index", 0))

        def run(x):
            if last:
                flipped = np.flip(x, axis)
                idx = x.shape[axis] - 1 - fn(flipped, axis=axis)
            else:
                idx = fn(x, axis=axis)
            idx = idx.astype(np.int64)
            return np.expand_dims(idx, axis) if keep else idx
        return run
    return factory


kernel("ArgMax", since=1)(_arg(np.argmax))
kernel("ArgMin", since=1)(_arg(np.argmin))


# ----------------------------------------------------------------- linear algebra
@kernel("MatMul", since=1)
def _matmul(n: KNode) -> Kernel:
    return np.matmul


@kernel("Gemm", since=7)
def _gemm(n: KNode) -> Kernel:
    alpha, beta = float(n.attr("alpha", 1.0)), float(n.attr("beta", 1.0))
    ta, tb = int(n.attr("transA", 0)), int(n.attr("transB", 0))

    def run(a, b, c=None):
        if a.ndim != 2 or b.ndim != 2:  # the spec's contract; numpy would quietly broadcast
            raise ValueError(f"Gemm needs 2-D A and B, got ranks {a.ndim} and {b.ndim}")
        a = a.T if ta else a
        b = b.T if tb else b
        y = a @ b
        if alpha != 1.0:
            y = alpha * y
        if c is not None:
            y = y + (beta * c if beta != 1.0 else c)
        return y.astype(a.dtype, copy=False)
    return run


@kernel("Einsum", since=12)
def _einsum(n: KNode) -> Kernel:
    eq = n.attr("equation")
    eq = eq.decode() if isinstance(eq, bytes) else eq
    eq = eq.replace(" ", "")
    return lambda *xs: np.einsum(eq, *xs)


@kernel("Softmax", since=1)
@kernel("LogSoftmax", since=1)
def _softmax(n: KNode) -> Kernel:
    log = n.op == "LogSoftmax"
    legacy = n.version < 13
    axis = int(n.attr("axis", 1 if legacy else -1))

    def soft(x, ax):
        m = np.max(x, axis=ax, keepdims=True)
        e = np.exp(x - m)
        s = np.sum(e, axis=ax, keepdims=True)
        return (x - m - np.log(s)) if log else e / s

    def run(x):
        if legacy:  # coerced to 2-D at `axis`
            ax = axis % max(x.ndim, 1)
            flat = x.reshape(int(np.prod(x.shape[:ax], dtype=np.int64)), -1)
            return soft(flat, 1).reshape(x.shape).astype(x.dtype, copy=False)
        return soft(x, axis).astype(x.dtype, copy=False)
    return run


# ------------------------------------------------------------------ shape ops
@kernel("Identity", since=1)
def _identity(n: KNode) -> Kernel:
    return lambda x: x


@kernel("Dropout", since=12, predicate=lambda node, m: None if len(node.outputs) == 1 or not node.outputs[1].name
        else "Dropout with a mask output is not supported")
def _dropout(n: KNode) -> Kernel:
    def run(x, ratio=None, training=None):
        if training is not None and bool(np.asarray(training)):
            raise ValueError("Dropout in training mode is not supported")
        return x
    return run


@kernel("Shape", since=1)
def _shape(n: KNode) -> Kernel:
    start, end = n.attr("start", 0), n.attr("end")

    def run(x):
        dims = np.array(x.shape, dtype=np.int64)
        return dims[start:end] if end is not None else dims[start:]
    return run


@kernel("Size", since=1)
def _size(n: KNode) -> Kernel:
    return lambda x: np.array(x.size, dtype=np.int64)


@kernel("Reshape", since=5)
def _reshape(n: KNode) -> Kernel:
    allowzero = int(n.attr("allowzero", 0))

    def run(x, shape):
        shape = [int(s) for s in shape]
        if not allowzero:
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)
    return run


@kernel("Flatten", since=1)
def _flatten(n: KNode) -> Kernel:
    axis = int(n.attr("axis", 1))

    def run(x):
        ax = axis % x.ndim if x.ndim and axis < 0 else axis
        return x.reshape(int(np.prod(x.shape[:ax], dtype=np.int64)), -1)
    return run


@kernel("Transpose", since=1)
def _transpose(n: KNode) -> Kernel:
    perm = n.attr("perm")
    return lambda x: np.transpose(x, perm)


def _axes_param(n: KNode, input_since: int) -> Callable:
    attr_axes = n.attr("axes")

    def resolve(axes=None):
        if n.version < input_since:
            axes = attr_axes
        return None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    return resolve


@kernel("Squeeze", since=1)
def _squeeze(n: KNode) -> Kernel:
    resolve = _axes_param(n, 13)

    def run(x, axes=None):
        ax = resolve(axes)
        return np.squeeze(x) if ax is None else np.squeeze(x, axis=tuple(ax))
    return run


@kernel("Unsqueeze", since=1)
def _unsqueeze(n: KNode) -> Kernel:
    resolve = _axes_param(n, 13)

    def run(x, axes=None):
        ax = resolve(axes)
        rank = x.ndim + len(ax)
        return np.expand_dims(x, tuple(sorted(a % rank for a in ax)))
    return run


@kernel("Concat", since=4)
def _concat(n: KNode) -> Kernel:
    axis = int(n.attr("axis"))
    return lambda *xs: np.concatenate(xs, axis=axis)


@kernel("Split", since=2)
def _split(n: KNode) -> Kernel:
    axis = int(n.attr("axis", 0))
    attr_split = n.attr("split")
    num_outputs = n.attr("num_outputs", n.n_outputs)

    def run(x, split=None):
        if n.version < 13:
            split = attr_split
        size = x.shape[axis]
        if split is None:
            k = int(num_outputs)
            chunk = -(-size // k)
            split = [chunk] * (k - 1) + [size - chunk * (k - 1)]
        ax = axis % x.ndim
        index = [slice(None)] * x.ndim
        parts, start = [], 0
        for s in np.asarray(split).tolist():  # views, as np.split gives, without its overhead
            index[ax] = slice(start, start + int(s))
            parts.append(x[tuple(index)])
            start += int(s)
        return tuple(parts)
    return run


def slice_index(shape: tuple, starts, ends, axes=None, steps=None) -> tuple:
    """The Python index of an ONNX ``Slice`` (clamped starts/ends, negative axes and steps)."""
    rank = len(shape)
    axes = range(len(starts)) if axes is None else [int(a) % rank for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * rank
    for a, s, e, st in zip(axes, starts, ends, steps):
        dim, s, e, st = shape[a], int(s), int(e), int(st)
        if st > 0:
            s = min(max(s + dim if s < 0 else s, 0), dim)
            e = min(max(e + dim if e < 0 else e, 0), dim)
        else:
            s = min(max(s + dim if s < 0 else s, 0), dim - 1)
            e = min(max(e + dim if e < 0 else e, -1), dim - 1)
            e = None if e < 0 else e
        index[a] = slice(s, e, st)
    return tuple(index)


@kernel("Slice", since=10)
def _slice(n: KNode) -> Kernel:
    return lambda x, starts, ends, axes=None, steps=None: x[slice_index(x.shape, starts, ends, axes, steps)]


def _gather_along(take: Callable) -> Factory:
    """Gather / GatherElements: negative indices count from the end of ``axis``."""
    def factory(n: KNode) -> Kernel:
        axis = int(n.attr("axis", 0))

        def run(x, idx):
            idx = np.where(idx < 0, idx + x.shape[axis], idx)
            return take(x, idx, axis=axis)
        return run
    return factory


kernel("Gather", since=1)(_gather_along(np.take))
kernel("GatherElements", since=11)(_gather_along(np.take_along_axis))


@kernel("GatherND", since=11)
def _gather_nd(n: KNode) -> Kernel:
    batch_dims = int(n.attr("batch_dims", 0))

    def run(x, idx):
        idx = np.asarray(idx, dtype=np.int64)
        batch_shape = x.shape[:batch_dims]
        nb = int(np.prod(batch_shape, dtype=np.int64)) if batch_dims else 1
        xb = x.reshape((nb,) + x.shape[batch_dims:])
        ib = idx.reshape((nb,) + idx.shape[batch_dims:])
        k = ib.shape[-1]
        out = []
        for b in range(nb):
            flat = ib[b].reshape(-1, k)
            dims = np.array(xb.shape[1:1 + k])
            flat = np.where(flat < 0, flat + dims, flat)
            out.append(xb[b][tuple(flat.T)])
        res = np.stack(out)
        return res.reshape(idx.shape[:-1] + x.shape[batch_dims + k:])
    return run


@kernel("ScatterND", since=11)
def _scatter_nd(n: KNode) -> Kernel:
    reduction = n.attr("reduction", "none")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    ufunc = {"none": None, "add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}[reduction]

    def run(x, idx, updates):
        out = np.copy(x)
        k = idx.shape[-1]
        flat = idx.reshape(-1, k)
        upd = updates.reshape((flat.shape[0],) + x.shape[k:])
        for i in range(flat.shape[0]):
            pos = tuple(int(v) for v in flat[i])
            out[pos] = upd[i] if ufunc is None else ufunc(out[pos], upd[i])
        return out
    return run


@kernel("Expand", since=8)
def _expand(n: KNode) -> Kernel:
    def run(x, shape):
        shape = [int(s) for s in shape]
        target = np.broadcast_shapes(x.shape, tuple(shape))
        return np.broadcast_to(x, target)
    return run


@kernel("Tile", since=6)
def _tile(n: KNode) -> Kernel:
    return lambda x, reps: np.tile(x, [int(r) for r in reps])


@kernel("Range", since=11)
def _range(n: KNode) -> Kernel:
    def run(start, limit, delta):
        return np.arange(start, limit, delta).astype(np.asarray(start).dtype)
    return run


@kernel("ConstantOfShape", since=9)
def _constant_of_shape(n: KNode) -> Kernel:
    value = n.attr("value")
    fill = np.asarray(value.values if isinstance(value, gs.Constant) else (value if value is not None else
                      np.zeros(1, np.float32))).reshape(-1)

    def run(shape):
        return np.full([int(s) for s in shape], fill[0], dtype=fill.dtype)
    return run


@kernel("Constant", since=1)
def _constant(n: KNode) -> Kernel:
    a = n.attrs
    if "value" in a:
        v = np.asarray(a["value"].values if isinstance(a["value"], gs.Constant) else a["value"])
    elif "value_float" in a:
        v = np.array(a["value_float"], np.float32)
    elif "value_floats" in a:
        v = np.array(a["value_floats"], np.float32)
    elif "value_int" in a:
        v = np.array(a["value_int"], np.int64)
    elif "value_ints" in a:
        v = np.array(a["value_ints"], np.int64)
    else:
        raise ValueError("Constant without a numeric value")
    return lambda: v


@kernel("Trilu", since=14)
def _trilu(n: KNode) -> Kernel:
    upper = int(n.attr("upper", 1))

    def run(x, k=None):
        k = 0 if k is None else int(k)
        return np.triu(x, k) if upper else np.tril(x, k)
    return run


@kernel("TopK", since=11)
def _topk(n: KNode) -> Kernel:
    axis, largest, is_sorted = int(n.attr("axis", -1)), int(n.attr("largest", 1)), int(n.attr("sorted", 1))

    def run(x, k):
        k = int(np.asarray(k).reshape(-1)[0])
        ax = axis % x.ndim
        # stable sort keeps the lower index first among equal values, as the spec asks
        if largest:  # descending, lower index first among equals (works for unsigned too)
            n_ax = x.shape[ax]
            order = n_ax - 1 - np.flip(np.argsort(np.flip(x, ax), axis=ax, kind="stable"), ax)
        else:
            order = np.argsort(x, axis=ax, kind="stable")
        idx = np.take(order, np.arange(k), axis=ax)
        vals = np.take_along_axis(x, idx, axis=ax)
        return vals, idx.astype(np.int64)
    return run


def cumsum_kernel(n: KNode, xp) -> Kernel:
    """``CumSum`` over the array module ``xp`` (numpy here, CuPy on the cuda backend)."""
    exclusive, reverse = int(n.attr("exclusive", 0)), int(n.attr("reverse", 0))

    def run(x, axis):
        ax = int(np.asarray(axis).reshape(-1)[0])
        y = xp.flip(x, ax) if reverse else x
        out = xp.cumsum(y, axis=ax, dtype=x.dtype)
        if exclusive:
            out = out - y
        return xp.flip(out, ax) if reverse else out
    return run


@kernel("CumSum", since=11)
def _cumsum(n: KNode) -> Kernel:
    return cumsum_kernel(n, np)
