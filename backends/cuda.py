"""The ``cuda`` target: its capability table, importable and queryable without a GPU.

Until the CuPy kernels exist, this table is the contract the CUDA backend
commits to: elementwise and reduction kernels, cuBLAS matmuls, the shape and
indexing ops an LLM decoder uses, fused ``RMSNormalization`` and block-wise
``DequantizeLinear`` (which the backend will fuse with the ``MatMul`` it feeds).
It does not declare fused ``Attention``, ``RotaryEmbedding``,
``LayerNormalization`` or ``Gelu``: ``graphopt optimize --target cuda``
splits them back into primitives it does declare, so the written model runs on
the backend as soon as it exists, and in onnxruntime today.

Importing this module never imports CuPy. :meth:`CudaBackend.available` says
why it cannot compile here; :meth:`CudaBackend.compile` raises a
:class:`BackendError` saying the same.
"""

from __future__ import annotations

import importlib.util
import shutil
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt._backend import Backend, OpSupport
from graphopt._errors import BackendError

if TYPE_CHECKING:
    from graphopt._ir import Model

#: Element types the kernels will handle (ONNX type names).
FLOATS = {"float", "float16", "bfloat16"}
INDEX = {"int64", "int32"}
ELEMENT = FLOATS | INDEX | {"bool", "int8", "uint8"}
QUANTIZED = {"int4", "uint4", "int8", "uint8"}


def _type_name(t: gs.Tensor) -> str | None:
    dtype = t.dtype
    if dtype is None and isinstance(t, gs.Constant):
        dtype = t.values.dtype
    if dtype is None:
        return None
    try:
        code = int(dtype) if isinstance(dtype, (int, np.integer)) else onnx.helper.np_dtype_to_tensor_dtype(
            np.dtype(dtype))
    except (KeyError, TypeError, ValueError):
        return str(dtype)
    return onnx.helper.tensor_dtype_to_string(code).removeprefix("TensorProto.").lower()


def dtypes_in(allowed: set[str]):
    """Predicate: every tensor of known dtype is one of ``allowed``."""
    def check(node: gs.Node, model: Model) -> str | None:
        for t in list(node.inputs) + list(node.outputs):
            if not t.name:
                continue
            name = _type_name(t)
            if name is not None and name not in allowed:
                return f"dtype {name} of {t.name!r} is not supported"
        return None
    return check


def _dequantize_check(node: gs.Node, model: Model) -> str | None:
    x = node.inputs[0]
    if not isinstance(x, gs.Constant):
        return "only constant (weight) inputs are dequantized; activations are not"
    name = _type_name(x)
    if name not in QUANTIZED:
        return f"dtype {name} of {x.name!r} is not supported (int4, uint4, int8, uint8 are)"
    scale = node.inputs[1]
    if _type_name(scale) not in FLOATS:
        return f"scale dtype {_type_name(scale)} is not supported"
    return None


def _rms_check(node: gs.Node, model: Model) -> str | None:
    stash = int(node.attrs.get("stash_type", 1))
    if stash != onnx.TensorProto.FLOAT:
        return f"stash_type={stash} is not supported (float32 accumulation only)"
    return dtypes_in(FLOATS)(node, model)


#: Elementwise, reductions, matmuls and softmax.
_COMPUTE_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Tanh",
                "Erf", "Sigmoid", "Relu", "Sin", "Cos", "Floor", "Ceil", "Clip", "Max", "Min", "Sum", "Mod",
                "Where", "Softmax", "LogSoftmax", "MatMul", "Gemm", "ReduceMean", "ReduceSum", "ReduceMax",
                "ReduceMin", "ArgMax", "TopK", "CumSum", "Trilu")
#: Comparisons and logic (bool results).
_LOGIC_OPS = ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Not", "IsNaN", "IsInf")
#: Data movement, shapes and indexing.
_MOVE_OPS = ("Identity", "Cast", "Shape", "Size", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
             "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND", "ScatterND", "Expand", "Tile",
             "Range", "ConstantOfShape", "Constant")
#: The oldest opset the kernels follow (axes as inputs for Squeeze/Unsqueeze/ReduceSum/Split, modern Softmax).
MIN_OPSET = 13


def _versions(op: str) -> tuple[int, int]:
    """(the version an opset-13 model uses, the newest version onnx knows)."""
    try:
        since = onnx.defs.get_schema(op, MIN_OPSET).since_version
    except onnx.defs.SchemaError:  # newer than opset 13
        since = onnx.defs.get_schema(op).since_version
    return since, onnx.defs.get_schema(op).since_version


def capability_table() -> list[OpSupport]:
    """The declared ops. Each covers its op from opset 13 up to the newest version onnx
    knows today (a later revision with new semantics is not covered until it is checked)."""
    table = [OpSupport(op, "", *_versions(op), predicate=dtypes_in(ELEMENT))
             for op in _COMPUTE_OPS + _LOGIC_OPS + _MOVE_OPS]
    table.append(OpSupport("RMSNormalization", "", *_versions("RMSNormalization"), predicate=_rms_check,
                           note="fused kernel, float32 accumulation"))
    table.append(OpSupport("DequantizeLinear", "", 21, _versions("DequantizeLinear")[1],
                           predicate=_dequantize_check, note="block-wise weights; fused with the MatMul they feed"))
    return table


class CudaBackend(Backend):
    name = "cuda"
    device = "cuda"
    summary = "NVIDIA GPUs through CuPy (capability table only: kernels not implemented yet; extra 'cuda')"

    def ops(self) -> list[OpSupport]:
        return capability_table()

    def available(self) -> str | None:
        if importlib.util.find_spec("cupy") is None:
            return "CuPy is not installed (pip install 'graphopt[cuda]'; needs an NVIDIA GPU)"
        if shutil.which("nvidia-smi") is None:
            return "no NVIDIA GPU driver found (nvidia-smi is missing)"
        return "the CUDA kernels are not implemented yet; only the capability table exists"

    def can_execute(self) -> bool:
        return False

    def compile(self, model: Model):
        reason = self.available()
        raise BackendError(f"backend 'cuda' cannot compile here: {reason}. `graphopt optimize --target cuda` "
                           f"still legalizes a model for it")
