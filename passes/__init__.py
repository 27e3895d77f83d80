"""Built-in passes. This package is a plugin like any other: it registers its
passes through the ``graphopt_register_passes`` hook (shipped as ``graphopt.passes``)."""

from __future__ import annotations

from graphopt.hookspecs import hookimpl
from graphopt.passes.attention import AttentionFuse
from graphopt.passes.cleanup import DeadCodeElimination, IdentityElimination
from graphopt.passes.constant_folding import ConstantFolding
from graphopt.passes.dedupe import InitializerDedupe
from graphopt.passes.rmsnorm import RMSNormFuse
from graphopt.passes.shape_inference import ShapeInference

BUILTIN_PASSES = (ShapeInference, IdentityElimination, ConstantFolding, InitializerDedupe, RMSNormFuse,
                  AttentionFuse, DeadCodeElimination)


@hookimpl
def graphopt_register_passes(register):
    for cls in BUILTIN_PASSES:
        register(cls)
