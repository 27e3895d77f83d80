"""Blocked ``DequantizeLinear`` split back for a target that runs only per-tensor / per-axis
dequantization (the ``tiny`` plugin target): codes widened to float (a per-tensor
DequantizeLinear for 2/4-bit codes, a Cast otherwise), ``(codes - zero point) * scale``
per block. Checked against onnxruntime's own kernel on the blocked node."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest

import graphopt
from legalize_helpers import cpu_run, feeds_of, max_err, one_node, ort_run
from tiny_plugin import tiny_target  # noqa: F401 - a fixture

RNG = np.random.default_rng(21)
QTYPES = {"int4": (ml_dtypes.int4, -8, 8), "uint4": (ml_dtypes.uint4, 0, 16), "int8": (np.int8, -128, 128),
          "uint8": (np.uint8, 0, 256), "int16": (np.int16, -300, 300), "uint16": (np.uint16, 0, 600)}


def case(qtype, shape, axis, block, zero_point=False, scale_dtype=np.float32, output_dtype=None):
    dtype, lo, hi = QTYPES[qtype]
    blocked = list(shape)
    blocked[axis] = -(-shape[axis] // block)
    inputs = {"x": RNG.integers(lo, hi, shape).astype(dtype),
              "scale": (RNG.random(blocked) * 0.1 + 0.01).astype(scale_dtype),
              "zp": RNG.integers(lo, hi, blocked).astype(dtype) if zero_point else None}
    attrs = {"axis": axis, "block_size": block}
    if output_dtype is not None:
        attrs["output_dtype"] = output_dtype
    return inputs, attrs


CASES = {
    "int4_axis0": case("int4", (64, 24), 0, 16),
    "uint4_zero_point": case("uint4", (64, 24), 0, 32, zero_point=True),
    "int4_partial_block": case("int4", (100, 8), 0, 32),
    "int8_axis1_partial_zero_point": case("int8", (12, 100), 1, 32, zero_point=True),
    "uint8_3d_middle_axis": case("uint8", (2, 40, 6), 1, 16, zero_point=True),
    "int16_negative_axis": case("int16", (6, 64), -1, 16, zero_point=True),
    "uint16": case("uint16", (64, 6), 0, 16),
    "float16_scale": case("int4", (64, 24), 0, 16, scale_dtype=np.float16),
}


# as weights (initializers) and as graph inputs; onnxruntime's Python API cannot feed 4-bit arrays
PARAMS = [(name, True) for name in CASES] + [(name, False) for name, (inputs, _) in CASES.items()
                                             if inputs["x"].dtype.kind in "iu"]


@pytest.mark.parametrize("name, as_initializers", PARAMS,
                         ids=[f"{n}-{'weights' if w else 'inputs'}" for n, w in PARAMS])
def test_matches_onnxruntime_kernel(name, as_initializers, tiny_target):
    inputs, attrs = CASES[name]
    inits = ("x", "scale", "zp") if as_initializers else ()
    proto = one_node("DequantizeLinear", inputs, ["y"], opset=21, initializers=inits, **attrs)
    proto.graph.output[0].type.tensor_type.elem_type = onnx.helper.np_dtype_to_tensor_dtype(inputs["scale"].dtype)
    feeds = feeds_of(inputs, inits)
    (expected,) = ort_run(proto, feeds)
    model = graphopt.legalize(graphopt.Model.from_proto(proto), tiny_target)

    assert graphopt.unsupported_nodes(model, tiny_target) == []
    assert not [n for n in model.graph.nodes if n.op == "DequantizeLinear" and n.attrs.get("block_size", 0)]
    (split,) = model.history[-1].split_back
    assert (split.op, split.count, split.source) == ("DequantizeLinear", 1, "graphopt.passes")
    for got in (ort_run(model.to_onnx(), feeds), cpu_run(model, feeds)):
        assert got[0].dtype == expected.dtype
        assert max_err(got[0], expected) == 0.0


def test_what_it_does_not_cover_is_named(tiny_target):
    inputs, attrs = case("int8", (8, 32), 0, 16)
    inputs["x"] = inputs["x"].astype(np.int32)
    proto = one_node("DequantizeLinear", inputs, ["y"], opset=21, **attrs)
    with pytest.raises(graphopt.LegalizeError, match=r"its decomposition does not apply: input type INT32 is not "
                                                      r"supported"):
        graphopt.legalize(graphopt.Model.from_proto(proto), tiny_target)
    inputs, attrs = case("int4", (64, 24), 0, 16)
    proto = one_node("DequantizeLinear", inputs, ["y"], opset=21, symbolic={"x": ["k", 24]}, **attrs)
    with pytest.raises(graphopt.LegalizeError, match=r"the input's shape must be static"):
        graphopt.legalize(graphopt.Model.from_proto(proto), tiny_target)
