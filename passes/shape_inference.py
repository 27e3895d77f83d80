"""Shape inference: onnx's shape inference (with data propagation), written back to the IR.

Runs on a copy of the model whose weights are graph inputs (types only), so
it costs the same for a 10 MB and a 10 GB model. Dtypes and shapes are
written to the graph's tensors only where they add information: a known dim
replaces an unknown or symbolic one, never the other way round.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers.onnx_importer import get_onnx_tensor_dtype, get_onnx_tensor_shape

from graphopt._ir import Model
from graphopt._pipeline import Pass, PassContext, PassResult


def _known(shape) -> int:
    if shape is None:
        return -1
    return sum(isinstance(d, int) for d in shape)


class ShapeInference(Pass):
    name = "shape-inference"
    summary = "infer dtypes and shapes of every tensor (onnx shape inference with data propagation)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        proto = model.to_onnx_without_weights()
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
        tensors = model.graph.tensors()
        updated = 0
        infos = list(inferred.graph.value_info) + list(inferred.graph.output)
        for vi in infos:
            t = tensors.get(vi.name)
            if t is None or isinstance(t, gs.Constant) or not vi.type.HasField("tensor_type"):
                continue
            dtype = get_onnx_tensor_dtype(vi)
            shape = get_onnx_tensor_shape(vi) if vi.type.tensor_type.HasField("shape") else None
            changed = False
            if t.dtype is None and dtype is not None:
                t.dtype = dtype
                changed = True
            if shape is not None and _known(shape) > _known(t.shape) and \
                    (t.shape is None or len(t.shape) == len(shape)):
                t.shape = shape
                changed = True
            updated += changed
        typed = sum(1 for t in model.graph.tensors().values() if isinstance(t, gs.Variable) and t.dtype is not None)
        return PassResult(updated > 0, {"tensors_updated": updated, "tensors_typed": typed})
