"""Built-in passes. This package is a plugin like any other: it registers its
passes through the ``graphopt_register_passes`` hook and the decompositions of
foreign fused ops through ``graphopt_register_decompositions`` (shipped as
``graphopt.passes``)."""

from __future__ import annotations

from graphopt.hookspecs import hookimpl
from graphopt.passes.attention import AttentionFuse
from graphopt.passes.cleanup import DeadCodeElimination, IdentityElimination
from graphopt.passes.constant_folding import ConstantFolding
from graphopt.passes.decompose_attention import ATTENTION_DECOMPOSITIONS
from graphopt.passes.decompositions import DECOMPOSITIONS
from graphopt.passes.dedupe import InitializerDedupe
from graphopt.passes.matmul_merge import MatMulMerge
from graphopt.passes.matmulnbits import MatMulNBitsFormat
from graphopt.passes.quantize import Quantize
from graphopt.passes.rmsnorm import RMSNormFuse
from graphopt.passes.shape_inference import ShapeInference
from graphopt.passes.tie_embedding import TieEmbeddingDedupe

BUILTIN_PASSES = (ShapeInference, IdentityElimination, ConstantFolding, InitializerDedupe, TieEmbeddingDedupe,
                  RMSNormFuse, AttentionFuse, MatMulMerge, Quantize, MatMulNBitsFormat, DeadCodeElimination)


@hookimpl
def graphopt_register_passes(register):
    for cls in BUILTIN_PASSES:
        register(cls)


@hookimpl
def graphopt_register_decompositions(register):
    for (domain, op_type), fn in {**DECOMPOSITIONS, **ATTENTION_DECOMPOSITIONS}.items():
        register(domain, op_type, fn)
