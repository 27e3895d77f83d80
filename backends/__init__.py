"""Built-in backends. This package is a plugin like any other: it registers its
backends through the ``graphopt_register_backends`` hook (shipped as ``graphopt.backends``)."""

from __future__ import annotations

from graphopt.backends.cpu import CpuBackend
from graphopt.backends.cuda import CudaBackend
from graphopt.backends.onnxruntime import OnnxRuntimeBackend
from graphopt.hookspecs import hookimpl

BUILTIN_BACKENDS = (CpuBackend, CudaBackend, OnnxRuntimeBackend)


@hookimpl
def graphopt_register_backends(register):
    for cls in BUILTIN_BACKENDS:
        register(cls)
