"""Shared by the legalization tests: one-node models, targets with parts of the cpu table,
and running a model in onnxruntime and on the cpu backend."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt

ORT_FUSED = {"Attention", "RotaryEmbedding", "RMSNormalization", "LayerNormalization", "Gelu"}


class Partial(graphopt.Backend):
    """The cpu backend's table without ``drop`` (a target without some fused ops)."""

    def __init__(self, drop=ORT_FUSED, name="primitive"):
        self.drop = set(drop)
        self.name = name

    def ops(self):
        return [s for s in graphopt.get_backend("cpu").ops() if s.op_type not in self.drop]


PRIMITIVE = Partial()


def vi(name, arr_or_type, shape=None):
    if isinstance(arr_or_type, np.ndarray):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr_or_type.dtype),
                                             list(arr_or_type.shape))
    return helper.make_tensor_value_info(name, arr_or_type, shape)


def one_node(op, inputs: dict, outputs, opset=23, domain="", initializers=(), symbolic=None, **attrs):
    """A model holding one node (float outputs). ``inputs``: name → array (fed) or None (missing
    optional); names in ``initializers`` become initializers. ``symbolic``: name → dims with strings."""
    symbolic = symbolic or {}
    names = list(inputs)
    while names and inputs[names[-1]] is None:
        names.pop()
    node = helper.make_node(op, [n if inputs[n] is not None else "" for n in names], list(outputs),
                            domain=domain, name=f"{op}_0", **attrs)
    graph_inputs, inits = [], []
    for n in names:
        v = inputs[n]
        if v is None:
            continue
        if n in initializers:
            inits.append(onnx.numpy_helper.from_array(v, n))
        else:
            shape = symbolic.get(n, list(v.shape))
            graph_inputs.append(vi(n, helper.np_dtype_to_tensor_dtype(v.dtype), shape))
    graph = helper.make_graph([node], "g", graph_inputs, [vi(o, TensorProto.FLOAT, None) for o in outputs if o],
                              inits)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.output
                if v.type.tensor_type.HasField("shape")}
    for i, out in enumerate(model.graph.output):  # the checker wants shapes on graph outputs
        if out.name in inferred:
            model.graph.output[i].CopyFrom(inferred[out.name])
    return model


def feeds_of(inputs: dict, initializers=()):
    return {k: v for k, v in inputs.items() if v is not None and k not in initializers}


def ort_run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def cpu_run(model: graphopt.Model, feeds: dict) -> list[np.ndarray]:
    exe = graphopt.compile(model, "cpu")
    out = exe.run(feeds)
    return [out[t.name] for t in model.graph.outputs]


def max_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) if a.size else 0.0
