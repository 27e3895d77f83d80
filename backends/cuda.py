"""The ``cuda`` target: NVIDIA GPUs through CuPy (extra ``cuda``).

The declared table is built from the device implementations in
:mod:`graphopt.backends.cuda_ops` (elementwise, reductions, cuBLAS matmuls, the shape
and indexing ops an LLM decoder uses, a fused ``RMSNormalization`` kernel, softmax,
block-wise ``DequantizeLinear`` fused with the ``MatMul``/``Gather`` it feeds), each
narrowed by dtype predicates. Standard ``Attention`` and ``RotaryEmbedding`` have device
code (the cpu kernels' code over an array module, plus ``attn_decode`` and ``rotary`` kernels),
verified on an H100 (ONNX node tests, fixtures, greedy tokens); ``fused_attention=False``
(or ``GRAPHOPT_CUDA_FUSED_ATTENTION=0``) leaves them undeclared, so attention is split back
into primitives (:data:`FUSED_ATTENTION_OPS`). It does not declare ``LayerNormalization`` or ``Gelu``. Legalization splits back whatever it
does not declare into primitives it does.

Importing this module never imports CuPy: the table is queryable on any machine.
:meth:`CudaBackend.available` says why it cannot compile here (no CuPy, no GPU).
``CudaBackend(emulate=True)`` runs the same runtime with numpy standing in for the
device (the hand-written CUDA kernels are replaced by their array twins): that is how
the backend's logic is tested without a GPU; it is not a fast CPU target.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt._backend import Backend, OpSupport
from graphopt._errors import BackendError

if TYPE_CHECKING:
    from graphopt._ir import Model

#: Element types the kernels handle (ONNX type names); CuPy has no bfloat16.
FLOATS = {"float", "float16"}
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
            if getattr(t, "type", "tensor_type") != "tensor_type":
                return f"{t.name!r} is a {t.type.replace('_type', '')}, only tensors are supported"
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


def _attention_check(node: gs.Node, model: Model) -> str | None:
    from graphopt.backends.cpu_fused import _attention_check as cpu_check

    return dtypes_in(FLOATS | {"bool"})(node, model) or cpu_check(node, model)


def _rms_check(node: gs.Node, model: Model) -> str | None:
    stash = int(node.attrs.get("stash_type", 1))
    if stash != onnx.TensorProto.FLOAT:
        return f"stash_type={stash} is not supported (float32 accumulation only)"
    return dtypes_in(FLOATS)(node, model)


#: The oldest opset the device kernels follow (axes as inputs for Squeeze/Unsqueeze/ReduceSum/Split).
MIN_OPSET = 13


def _versions(op: str) -> tuple[int, int]:
    """(the version an opset-13 model uses, the newest version onnx knows)."""
    try:
        since = onnx.defs.get_schema(op, MIN_OPSET).since_version
    except onnx.defs.SchemaError:  # newer than opset 13: from its first version
        since = min(s.since_version for s in onnx.defs.get_all_schemas_with_history()
                    if s.name == op and s.domain == "")
    return since, onnx.defs.get_schema(op).since_version


#: Declared since their device code passed the ONNX node tests, the fixtures and torch's greedy
#: tokens on an H100 (``tests/backends/test_cuda_gpu.py``). ``CudaBackend(fused_attention=False)``,
#: or ``GRAPHOPT_CUDA_FUSED_ATTENTION=0`` for the registered target, leaves them out: legalization
#: then splits attention back into primitives (to compare, or to work around a kernel problem).
FUSED_ATTENTION_OPS = ("Attention", "RotaryEmbedding")
FUSED_ATTENTION_DEFAULT = os.environ.get("GRAPHOPT_CUDA_FUSED_ATTENTION", "1") != "0"


def capability_table(fused_attention: bool = FUSED_ATTENTION_DEFAULT) -> list[OpSupport]:
    """The declared ops: every op with a device implementation, from opset 13 (or the op's
    first version) up to the newest version onnx knows today."""
    from graphopt.backends.cuda_ops import DEVICE_OPS

    table = []
    for (domain, op) in sorted(DEVICE_OPS):
        if domain:
            continue  # the runtime's own fused nodes are never declared
        if op in FUSED_ATTENTION_OPS and not fused_attention:
            continue
        since, until = _versions(op)
        if op == "DequantizeLinear":
            table.append(OpSupport(op, "", 21, until, predicate=_dequantize_check,
                                   note="block-wise constant weights; fused with the MatMul/Gather they feed"))
        elif op == "Attention":
            table.append(OpSupport(op, "", since, until, predicate=_attention_check,
                                   note="GQA, masks, KV cache, softcap; the cpu kernel's code over CuPy"))
        elif op == "RMSNormalization":
            table.append(OpSupport(op, "", since, until, predicate=_rms_check,
                                   note="fused kernel, float32 accumulation"))
        else:
            table.append(OpSupport(op, "", since, until, predicate=dtypes_in(ELEMENT)))
    return table


def _gpu_problem() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install 'graphopt[cuda]'; needs an NVIDIA GPU)"
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, driver too old, ...
        return f"CuPy finds no usable GPU ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if count < 1:
        return "CuPy finds no GPU"
    return None


class CudaBackend(Backend):
    name = "cuda"
    device = "cuda"
    summary = "NVIDIA GPUs through CuPy (extra 'cuda'): cuBLAS, fused RMSNorm, int4/int8 dequant-matmul"

    def __init__(self, emulate: bool = False, graphs: bool = False, fused_attention: bool | None = None,
                 fuse_elementwise: bool = True):
        #: numpy stands in for the device (tests without a GPU); ``graphs``: capture repeated steps;
        #: ``fused_attention``: declare Attention and RotaryEmbedding (see ``FUSED_ATTENTION_OPS``);
        #: ``fuse_elementwise``: one kernel per tree of float32 elementwise ops (``cuda_fusion``).
        self.emulate = emulate
        self.graphs = graphs
        self.fuse_elementwise = fuse_elementwise
        self.fused_attention = FUSED_ATTENTION_DEFAULT if fused_attention is None else fused_attention

    def ops(self) -> list[OpSupport]:
        return capability_table(self.fused_attention)

    def available(self) -> str | None:
        return None if self.emulate else _gpu_problem()

    def can_execute(self) -> bool:
        return True

    def compile(self, model: Model):
        from graphopt.backends.cuda_ops import Device
        from graphopt.backends.cuda_runtime import compile_model

        if self.emulate:
            device = Device(np, None)
        else:
            reason = self.available()
            if reason is not None:
                raise BackendError(f"backend 'cuda' cannot compile here: {reason}. `graphopt optimize --target "
                                   f"cuda` still legalizes a model for it")
            import cupy

            from graphopt.backends.cuda_kernels import Kernels

            device = Device(cupy, Kernels(cupy))
        return compile_model(model, device, self.check, graphs=self.graphs, fuse=self.fuse_elementwise)
