"""The backend contract: what a target declares it can run, and how it runs it.

A backend declares support per op as :class:`OpSupport` entries (domain, op
type, opset range) with an optional predicate that looks at the node (dtypes,
attributes, shapes) and returns a *reason* when it cannot run that node. The
declaration is a promise: a backend never declares an op it gets wrong.
Passes consult it before fusing; legalization splits back what it refuses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import onnx
import onnx_graphsurgeon as gs

from graphopt._errors import BackendError

if TYPE_CHECKING:
    import numpy as np

    from graphopt._ir import Model

#: ``predicate(node, model) -> None`` when the node is supported, else the reason.
Predicate = Callable[[gs.Node, "Model"], "str | None"]


@dataclass(frozen=True)
class OpSupport:
    """One declared op: ``domain::op_type`` in op versions ``since``..``until`` (inclusive).

    For standard ONNX ops the version is the op's own ``since_version`` as resolved
    against the model's opset (Softmax in an opset-18 model is Softmax-13), so a
    declaration never silently covers a later revision of the op with new semantics.
    For other domains it is the model's opset import for that domain.
    """

    op_type: str
    domain: str = ""
    since: int = 1
    until: int | None = None
    predicate: Predicate | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "op_type": self.op_type, "since": self.since,
                "until": self.until, "conditional": self.predicate is not None, "note": self.note}


def _norm_domain(domain: str | None) -> str:
    return "" if domain in (None, "", "ai.onnx") else domain


@functools.lru_cache(maxsize=4096)
def op_version(op_type: str, domain: str, opset: int | None) -> int | None:
    """The version of ``op_type`` a model with ``opset`` uses (its schema's since_version).

    Falls back to ``opset`` for ops onnx has no schema for (custom domains)."""
    if opset is None:
        return None
    try:
        return onnx.defs.get_schema(op_type, opset, domain).since_version
    except onnx.defs.SchemaError:
        return opset


class Backend:
    """Base class of execution targets."""

    name: ClassVar[str] = ""
    device: ClassVar[str] = "cpu"
    summary: ClassVar[str] = ""

    def ops(self) -> list[OpSupport]:
        """The declared op table."""
        return []

    def available(self) -> str | None:
        """None when this backend can compile here, else why not (missing package, no GPU)."""
        return None

    def can_execute(self) -> bool:
        """Whether ``compile`` is implemented (a backend may exist as a capability table first)."""
        return type(self).compile is not Backend.compile

    # ------------------------------------------------------------ queries
    def _table(self) -> dict[tuple[str, str], list[OpSupport]]:
        table = getattr(self, "_op_table", None)
        if table is None:
            table = {}
            for s in self.ops():
                table.setdefault((_norm_domain(s.domain), s.op_type), []).append(s)
            self._op_table = table
        return table

    def supports_op(self, op_type: str, domain: str = "", opset: int | None = None) -> bool:
        """Whether the op is declared at all (in a model of the given opset), ignoring predicates."""
        version = op_version(op_type, _norm_domain(domain), opset)
        for s in self._table().get((_norm_domain(domain), op_type), []):
            if version is None or (s.since <= version and (s.until is None or version <= s.until)):
                return True
        return False

    def check(self, node: gs.Node, model: Model) -> str | None:
        """None when this backend can run ``node``, else the reason it cannot."""
        domain = _norm_domain(node.domain or "")
        entries = self._table().get((domain, node.op), [])
        if not entries:
            return f"{self.name} does not support {domain + '::' if domain else ''}{node.op}"
        version = op_version(node.op, domain, model.opset(domain))
        if version is not None:
            entries = [s for s in entries if s.since <= version and (s.until is None or version <= s.until)]
            if not entries:
                return f"{self.name} does not support {node.op}-{version}"
        reasons = []
        for s in entries:
            if s.predicate is None:
                return None
            reason = s.predicate(node, model)
            if reason is None:
                return None
            reasons.append(reason)
        return f"{self.name} cannot run this {node.op}: {'; '.join(reasons)}"

    def compile(self, model: Model) -> Executable:
        raise BackendError(f"backend {self.name!r} declares its ops but cannot execute graphs yet")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "device": self.device,
            "summary": self.summary,
            "available": self.available() is None,
            "unavailable_reason": self.available(),
            "executes": self.can_execute(),
            "ops": [s.to_dict() for s in self.ops()],
        }


class Executable:
    """A compiled model: ``run(feeds) -> outputs`` by name."""

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def step(self, feeds: dict[str, Any], keep: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
        """``run`` for a loop that feeds outputs back (a decode loop): outputs named in ``keep``
        may come back in the backend's own memory (a device array) and are accepted as inputs
        by the next call. By default the same as ``run``."""
        return self.run(feeds)
