"""Elementwise fusion for the ``cuda`` backend: a tree of float32 elementwise ops becomes one kernel.

A decode step on a GPU is dominated by how many kernels it launches, not by arithmetic:
``x * sigmoid(x) * up``, a residual add after a projection, rotary's ``x*cos + rotate(x)*sin``
each cost a launch per op. At compile time this pass finds trees of elementwise ops (the
root's inputs produced by further elementwise ops that nothing else reads) and replaces
each tree by one ``FusedElementwise`` node (internal domain) holding the expression. On
CuPy it runs as one ``cupy.ElementwiseKernel`` (broadcasting as numpy does); emulated, the
same tree is evaluated with numpy.

Only float32 tensors (dtypes known from shape inference) and single-output trees are fused,
so the result's shape is the broadcast of the leaves' shapes, exactly as op by op. 0-d
float constants are inlined as literals.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt._ir import Model
from graphopt.backends.cpu import INTERNAL_DOMAIN

#: op -> (arity, C expression template over {0}, {1}, numpy function)
ELEMENTWISE: dict[str, tuple[int, str, Callable[..., Any]]] = {
    "Add": (2, "({0} + {1})", np.add),
    "Sub": (2, "({0} - {1})", np.subtract),
    "Mul": (2, "({0} * {1})", np.multiply),
    "Div": (2, "({0} / {1})", np.divide),
    "Pow": (2, "powf({0}, {1})", np.power),
    "Neg": (1, "(-{0})", np.negative),
    "Sqrt": (1, "sqrtf({0})", np.sqrt),
    "Reciprocal": (1, "(1.0f / {0})", np.reciprocal),
    "Exp": (1, "expf({0})", np.exp),
    "Log": (1, "logf({0})", np.log),
    "Tanh": (1, "tanhf({0})", np.tanh),
    "Sin": (1, "sinf({0})", np.sin),
    "Cos": (1, "cosf({0})", np.cos),
    "Sigmoid": (1, "(1.0f / (1.0f + expf(-{0})))", lambda x: np.float32(1) / (np.float32(1) + np.exp(-x))),
    "Relu": (1, "(isnan({0}) ? {0} : fmaxf({0}, 0.0f))", lambda x: np.maximum(x, np.float32(0))),
}

F32 = np.dtype(np.float32)


def _is_f32(t: gs.Tensor) -> bool:
    dtype = t.values.dtype if isinstance(t, gs.Constant) else t.dtype
    try:
        return dtype is not None and np.dtype(dtype) == F32
    except TypeError:
        return False


def _eligible(node: gs.Node, dynamic: Callable[[str], bool]) -> bool:
    spec = ELEMENTWISE.get(node.op)
    return (spec is not None and not node.domain and len(node.outputs) == 1 and len(node.inputs) == spec[0]
            and all(t.name and _is_f32(t) for t in node.inputs) and _is_f32(node.outputs[0])
            and dynamic(node.outputs[0].name))


def fuse_elementwise(model: Model, dynamic: Callable[[str], bool]) -> int:
    """Replaces elementwise trees of two or more nodes by ``FusedElementwise`` nodes; returns how many
    nodes were absorbed. ``dynamic(name)``: whether a tensor is computed on the device."""
    graph = model.graph
    graph.toposort()
    outputs = {t.name for t in graph.outputs}
    grouped: set[int] = set()
    absorbed = 0
    for root in reversed(list(graph.nodes)):
        if id(root) in grouped or not _eligible(root, dynamic):
            continue
        leaves: list[gs.Tensor] = []
        members: list[gs.Node] = [root]
        member_ids = {id(root)}

        def leaf(t: gs.Tensor) -> list:
            if isinstance(t, gs.Constant) and t.values.ndim == 0:
                return ["const", float(t.values)]
            for i, seen in enumerate(leaves):
                if seen is t:
                    return ["in", i]
            leaves.append(t)
            return ["in", len(leaves) - 1]

        def tree(t: gs.Tensor) -> list:
            producer = t.inputs[0] if len(t.inputs) == 1 else None
            if (producer is not None and id(producer) not in grouped and id(producer) not in member_ids
                    and t.name not in outputs and len(t.outputs) == 1 and _eligible(producer, dynamic)):
                members.append(producer)
                member_ids.add(id(producer))
                return [producer.op, *[tree(i) for i in producer.inputs]]
            return leaf(t)

        expr = [root.op, *[tree(i) for i in root.inputs]]
        if len(members) < 2:
            continue
        grouped.update(id(m) for m in members)
        fused = gs.Node("FusedElementwise", name=f"{root.name or 'fused'}__ew{len(members)}", domain=INTERNAL_DOMAIN,
                        attrs={"expr": json.dumps(expr), "ops": ",".join(m.op for m in reversed(members))},
                        inputs=list(leaves), outputs=list(root.outputs))
        for m in members:
            m.inputs.clear()
            m.outputs.clear()
        graph.nodes.append(fused)
        absorbed += len(members)
    if absorbed:
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.toposort()
        model.opset_imports.setdefault(INTERNAL_DOMAIN, 1)
    return absorbed


def _literal(v: float) -> str:
    if math.isnan(v):
        return "__int_as_float(0x7fc00000)"
    if math.isinf(v):
        return "__int_as_float(0x7f800000)" if v > 0 else "__int_as_float(0xff800000)"
    return f"{float(np.float32(v))!r}f"


def c_expression(expr: list) -> str:
    """The tree as a CUDA C float expression over ``x0``, ``x1``, ..."""
    kind = expr[0]
    if kind == "in":
        return f"x{expr[1]}"
    if kind == "const":
        return _literal(expr[1])
    return ELEMENTWISE[kind][1].format(*[c_expression(e) for e in expr[1:]])


def evaluate(expr: list, args: list[Any]) -> Any:
    """The tree evaluated with numpy in float32 (the emulated device)."""
    kind = expr[0]
    if kind == "in":
        return args[expr[1]]
    if kind == "const":
        return np.float32(expr[1])
    return ELEMENTWISE[kind][2](*[evaluate(e, args) for e in expr[1:]]).astype(F32, copy=False)


def n_inputs(expr: list) -> int:
    if expr[0] == "in":
        return expr[1] + 1
    if expr[0] == "const":
        return 0
    return max((n_inputs(e) for e in expr[1:]), default=0)


def cuda_source(expr: list, name: str) -> str:
    """A standalone kernel with the expression (flat indexing), for compile checks with NVRTC."""
    n = n_inputs(expr)
    params = ", ".join([f"const float* __restrict__ x{i}_p" for i in range(n)] + ["float* y", "long long size"])
    loads = "".join(f"    const float x{i} = x{i}_p[i];\n" for i in range(n))
    return (f'extern "C" __global__ void {name}({params}) {{\n'
            f"    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n"
            f"    if (i >= size) return;\n{loads}    y[i] = {c_expression(expr)};\n}}\n")


def make_kernel(expr: list, xp: Any, emulated: bool) -> Callable[..., Any]:
    if emulated:
        return lambda *args: evaluate(expr, list(args))
    n = n_inputs(expr)
    # a name stable across processes, so CuPy's on-disk kernel cache finds it again
    name = f"graphopt_ew_{hashlib.sha1(json.dumps(expr).encode()).hexdigest()[:16]}"
    kernel = xp.ElementwiseKernel(", ".join(f"float32 x{i}" for i in range(n)), "float32 y",
                                  f"y = {c_expression(expr)};", name)
    return lambda *args: kernel(*args)
