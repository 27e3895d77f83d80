"""Run the ONNX backend node tests against a graphopt backend.

The ~1,900 node test cases ship inside the onnx wheel and are generated in
memory (``onnx.backend.test.loader.load_model_tests(kind="node")``). A case
*applies* to a backend when every node of its model is declared by the
backend (op, op version and predicate); those cases must pass, which is what
makes a declaration a promise. Cases whose op is declared but whose predicate
refuses them are counted as *narrowed*.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx

from graphopt._backend import Backend
from graphopt._ir import Model

#: Cases onnx itself marks as not a test of op semantics, or that need features graphopt does not model.
IGNORED_PREFIXES = ("test_training_dropout",)


@functools.lru_cache(maxsize=1)
def node_cases() -> tuple:
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return tuple(c for c in load_model_tests(kind="node") if not c.name.startswith(IGNORED_PREFIXES))


@dataclass
class CaseResult:
    name: str
    status: str  # passed | failed | narrowed | undeclared
    detail: str = ""


def classify(backend: Backend, case) -> tuple[str, str, Model | None]:
    """("applies" | "narrowed" | "undeclared", reason, model)."""
    model = Model.from_proto(case.model)
    for node in model.graph.nodes:
        reason = backend.check(node, model)
        if reason is None:
            continue
        declared = backend.supports_op(node.op, node.domain or "", model.opset(node.domain or ""))
        return ("narrowed" if declared else "undeclared"), reason, model
    return "applies", "", model


def applicable(backend: Backend) -> tuple[dict, list[str]]:
    """Every node case by name, and the sorted names of those ``backend`` declares it can run
    (the parametrization of a backend's conformance tests)."""
    cases = {c.name: c for c in node_cases()}
    return cases, sorted(n for n, c in cases.items() if classify(backend, c)[0] == "applies")


def _array(x):
    """Some cases store their data as TensorProtos rather than arrays."""
    return onnx.numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else x


def run_case(backend: Backend, case) -> CaseResult:
    status, reason, model = classify(backend, case)
    if status != "applies":
        return CaseResult(case.name, status, reason)
    try:
        exe = backend.compile(model)
        in_names = [t.name for t in model.graph.inputs]
        out_names = [t.name for t in model.graph.outputs]
        for inputs, expected in case.data_sets:
            inputs, expected = [_array(x) for x in inputs], [_array(x) for x in expected]
            with np.errstate(all="ignore"):
                got = exe.run(dict(zip(in_names, inputs)))
            for name, want in zip(out_names, expected):
                have = got[name]
                if want.dtype != object and have.dtype != want.dtype:
                    return CaseResult(case.name, "failed", f"{name}: dtype {have.dtype}, expected {want.dtype}")
                if have.shape != want.shape:
                    return CaseResult(case.name, "failed", f"{name}: shape {have.shape}, expected {want.shape}")
                np.testing.assert_allclose(have, want, rtol=case.rtol, atol=case.atol, err_msg=name)
    except AssertionError as e:
        return CaseResult(case.name, "failed", str(e).strip().splitlines()[0] if str(e).strip() else "mismatch")
    except Exception as e:
        return CaseResult(case.name, "failed", f"{type(e).__name__}: {e}")
    return CaseResult(case.name, "passed")


@dataclass
class Summary:
    results: list[CaseResult] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)


def run_all(backend: Backend, names: set[str] | None = None) -> Summary:
    summary = Summary()
    for case in node_cases():
        if names is None or case.name in names:
            summary.results.append(run_case(backend, case))
    return summary
