"""The ``cpu`` backend: numpy kernels.

Its op table is the contract the numpy kernels implement: the standard ops an
LLM decoder export uses plus the fused ops graphopt emits. Execution (the
kernels and the scheduler) is tracked separately; until it lands, ``compile``
refuses with a clear error instead of pretending, and ``graphopt backends``
shows ``executes: no``.
"""

from __future__ import annotations

from graphopt._backend import Backend, OpSupport

PRIMITIVES = (
    "MatMul Gemm Add Sub Mul Div Pow Sqrt Reciprocal Neg Exp Log Sin Cos Sigmoid Tanh Erf Relu Gelu "
    "Softmax ReduceMean ReduceSum ReduceMax Transpose Reshape Flatten Gather GatherElements Concat "
    "Slice Split Squeeze Unsqueeze Expand Tile Where Cast CastLike Shape Size Range Equal Less Greater "
    "And Or Not Trilu ConstantOfShape Constant Identity ScatterND TopK ArgMax Einsum IsNaN Max Min Clip"
).split()


class CpuBackend(Backend):
    name = "cpu"
    device = "cpu"
    summary = "numpy kernels for the LLM op set, fused ops included"

    def ops(self) -> list[OpSupport]:
        table = [OpSupport(op) for op in PRIMITIVES]
        table += [
            OpSupport("LayerNormalization", since=17),
            OpSupport("RMSNormalization", since=23),
            OpSupport("RotaryEmbedding", since=23),
            OpSupport("Attention", since=23),
            OpSupport("DequantizeLinear"),
        ]
        return table
