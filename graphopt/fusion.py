"""The driver every fusion pass shares.

A fusion pass declares the standard ops it emits (``emits``) and the opset they
need, and implements ``scan(model, ctx, rewrite) -> {rule: count}``. The driver

1. skips (with a note) when the target does not declare an emitted op — fusing what
   the target cannot run would only be split back again;
2. scans without rewriting; nothing found means nothing changes (with ``--explain``, or for a
   pass that ``counts_misses``, the scan is repeated to collect why each candidate did not match);
3. raises the model's opset if needed (``graphopt._opset``), then scans again,
   rewriting, and sweeps dead nodes;
4. reports ``fused`` and ``rule:<name>`` counters, and ``unfused`` with the reasons (a
   pass records a candidate it left with :meth:`FusionPass.miss`).
"""

from __future__ import annotations

from typing import ClassVar

from graphopt._ir import Model
from graphopt._opset import ensure_opset
from graphopt._pipeline import Pass, PassContext, PassResult
from graphopt.rewrite import naming_scope, remove_dead


class FusionPass(Pass):
    #: Standard ops (default domain) the pass creates.
    emits: ClassVar[tuple[str, ...]] = ()
    #: The opset those ops need.
    opset: ClassVar[int] = 23
    #: Whether the pass records the candidates it leaves (:meth:`miss`) even without --explain:
    #: then a scan that finds nothing runs again to collect them.
    counts_misses: ClassVar[bool] = False

    def scan(self, model: Model, ctx: PassContext, *, rewrite: bool) -> dict[str, int]:  # pragma: no cover
        raise NotImplementedError

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        target = ctx.target
        if target is not None:
            missing = [op for op in self.emits if not target.supports_op(op, "", self.opset)]
            if missing:
                ctx.notes.append(f"{self.name}: target {target.name} does not support {', '.join(missing)}; skipped")
                return PassResult(False, {"skipped_target": 1})
        if not self.scan(model, ctx, rewrite=False):
            if ctx.explain or self.counts_misses:  # nothing will be rewritten: collect the reasons only
                with naming_scope(model.graph):
                    self.scan(model, ctx, rewrite=True)
            return self._result(ctx, {})
        reason = ensure_opset(model, self.opset)
        if reason:
            ctx.notes.append(f"{self.name}: {reason}; nothing fused")
            return PassResult(False, {"fused": 0, "opset_upgrade_failed": 1})
        with naming_scope(model.graph):
            counts = self.scan(model, ctx, rewrite=True)
        remove_dead(model.graph)
        return self._result(ctx, counts)

    def miss(self, ctx: PassContext, what: str, reason: str) -> None:
        """Record a candidate left unfused: counted as ``unfused`` with its reason, and a note
        under --explain."""
        ctx.unfused.setdefault(self.name, []).append(f"{what}: {reason}")
        if ctx.explain:
            ctx.notes.append(f"{self.name}: {what} not fused: {reason}")

    def _result(self, ctx: PassContext, counts: dict[str, int]) -> PassResult:
        """Counters ``fused``, ``rule:<name>`` and ``unfused`` (candidates left, whose reasons
        are in the details: the CLI warns about them)."""
        missed = ctx.unfused.get(self.name, [])
        counters = {"fused": sum(counts.values()), **{f"rule:{k}": v for k, v in counts.items()}}
        details = {}
        if missed:
            counters["unfused"] = len(missed)
            details["unfused"] = list(missed)
        return PassResult(bool(counts), counters, details)
