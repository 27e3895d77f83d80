"""The ``onnxruntime`` backend: runs graphs in onnxruntime's CPU execution provider.

Its op table is read from onnxruntime's own kernel registry, so it declares
exactly what the installed onnxruntime can run. It is the reference runtime
graphopt compares its own backends against. Needs the ``ort`` extra.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graphopt._backend import Backend, Executable, OpSupport
from graphopt._errors import BackendError

if TYPE_CHECKING:
    from graphopt._ir import Model

_OPEN_END = 2**31 - 1


def _rotary_caches_match(node, model) -> str | None:
    """onnxruntime's RotaryEmbedding-23 kernel wants cos/sin caches with exactly the input's
    batch when no position ids are given ("expected to have the same shape as input 'x'"); the
    spec broadcasts a batch of 1 and exporters write one. Refuse unless the shapes prove them
    equal, so legalization splits such nodes back instead of onnxruntime failing at run time."""
    if len(node.inputs) > 3 and node.inputs[3].name:
        return None
    x, cos = node.inputs[0], node.inputs[1]
    if x.shape and cos.shape and x.shape[0] == cos.shape[0]:
        return None
    return (f"its RotaryEmbedding needs cos/sin caches with the input's batch ({x.shape[0] if x.shape else '?'}), "
            f"not {cos.shape[0] if cos.shape else 'unknown'}")


class OnnxRuntimeExecutable(Executable):
    def __init__(self, session):
        self.session = session
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    device = "cpu"
    summary = "onnxruntime CPU execution provider (reference runtime; extra 'ort')"

    def __init__(self, *, threads: int | None = None, optimization: str = "basic",
                 accuracy_level: int | None = 0, spinning: bool = True):
        """``accuracy_level``: what onnxruntime's MatMulNBits (which it makes of
        ``DequantizeLinear → MatMul``) computes in: 0 keeps activations in float (the
        reference; slow for 4-bit weights), 4 quantizes them to int8 (onnxruntime's
        speed default, ~1e-2 extra error), None leaves onnxruntime's default."""
        self.threads = threads
        self.optimization = optimization
        self.accuracy_level = accuracy_level
        #: False stops idle worker threads from spinning: needed when several sessions take turns.
        self.spinning = spinning

    def available(self) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install 'graphopt[ort]')"
        return None

    def ops(self) -> list[OpSupport]:
        if self.available():
            return []
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        seen = {}
        for k in C.get_all_opkernel_def():
            if k.provider != "CPUExecutionProvider":
                continue
            lo, hi = k.version_range
            key = (k.domain, k.op_name)
            old = seen.get(key, (lo, hi))
            seen[key] = (min(lo, old[0]), max(hi, old[1]))
        predicates = {("", "RotaryEmbedding"): _rotary_caches_match}
        table = [OpSupport(op, domain, lo, None if hi >= _OPEN_END else hi, predicates.get((domain, op)))
                 for (domain, op), (lo, hi) in sorted(seen.items())]
        # Resolved by onnxruntime's graph loader, not by a kernel, so absent from the registry.
        table.append(OpSupport("Constant", "", 1, None, note="folded into an initializer at load"))
        return table

    def compile(self, model: Model) -> OnnxRuntimeExecutable:
        reason = self.available()
        if reason:
            raise BackendError(f"backend 'onnxruntime' is unavailable: {reason}")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        level = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                 "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                 "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[self.optimization]
        opts.graph_optimization_level = level
        # Keep activations in float when onnxruntime is the numerical reference.
        if self.accuracy_level is not None:
            opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(self.accuracy_level))
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if not self.spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        with tempfile.TemporaryDirectory(prefix="graphopt-ort-") as tmp:
            path = Path(tmp) / "model.onnx"
            model.save(path)
            try:
                session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as e:
                raise BackendError(f"onnxruntime cannot load the model: {str(e).splitlines()[0]}") from e
        return OnnxRuntimeExecutable(session)
