"""graphopt: a graph-optimization compiler for ONNX models, LLM-first.

Public surface::

    import graphopt
    model = graphopt.load("model.onnx")          # weights stay on disk until needed
    out = graphopt.optimize(model, target="cpu")  # passes are pluggy plugins; ends legalized for the target
    out.save("out.onnx")                          # atomic; external data when large
"""

from __future__ import annotations

from graphopt._api import build_pipeline, compile, get_backend, optimize
from graphopt._backend import Backend, Executable, OpSupport
from graphopt._errors import (
    BackendError,
    GraphoptError,
    ModelLoadError,
    ModelSaveError,
    PassError,
    PluginError,
    UnknownNameError,
    VerificationError,
)
from graphopt._ir import ExternalValues, Model, load
from graphopt._legalize import (CannotDecompose, LegalizeError, LegalizeStats, SplitBack, legalize,
                                unsupported_nodes)
from graphopt._pipeline import Pass, PassContext, PassResult, PassStats, Pipeline
from graphopt._plugins import PluginWarning, get_registry
from graphopt._verify import verify as verify_graph
from graphopt.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "Backend", "BackendError", "CannotDecompose", "Executable", "ExternalValues", "GraphoptError",
    "LegalizeError", "LegalizeStats", "Model", "ModelLoadError", "ModelSaveError", "OpSupport", "Pass",
    "PassContext", "PassError", "PassResult", "PassStats", "Pipeline", "PluginError", "PluginWarning",
    "SplitBack", "UnknownNameError", "VerificationError", "__version__", "build_pipeline", "compile",
    "get_backend", "get_registry", "hookimpl", "legalize", "load", "optimize", "unsupported_nodes",
    "verify_graph",
]
