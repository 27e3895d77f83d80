"""Passes and the pipeline that orders, runs, verifies and measures them.

A pass is a small class with a stable ``name``, a one-line ``summary`` and
``run(model, ctx) -> PassResult``. The pipeline

1. orders the passes: the order given, adjusted by the passes' declared
   ``before``/``after`` constraints (a cycle among constraints is an error
   naming the passes on it);
2. runs them on a *copy* of the caller's model, so a pass that raises leaves
   the caller's model untouched and is reported as
   ``pass 'x' failed after ['a', 'b']: reason``;
3. optionally verifies the graph after every pass (tests always do);
4. records nodes before/after, wall time, and the pass's counters.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import networkx as nx

from graphopt._errors import PassError, PluginError, VerificationError
from graphopt._ir import Model
from graphopt._verify import verify as verify_graph

if TYPE_CHECKING:
    from graphopt._backend import Backend

logger = logging.getLogger(__name__)


@dataclass
class PassResult:
    """What a pass did: whether it changed the model, and named counts (e.g. ``fused=24``)."""

    changed: bool
    counters: dict[str, int] = field(default_factory=dict)
    #: Structured facts for the report (e.g. per-weight quantization error); JSON-serialisable.
    details: dict[str, Any] = field(default_factory=dict)
    #: Work the pass left running in the background (futures) that completes ``details``: the
    #: quantize pass's arithmetic overlaps the passes after it and saving. Reading
    #: :attr:`PassStats.details` waits for it (and raises what it raised).
    pending: list[Future] = field(default_factory=list)


@dataclass
class PassContext:
    """What a pass may consult: the target backend and the user's options."""

    target: Backend | None = None
    options: dict[str, Any] = field(default_factory=dict)
    #: Collected explanations (why a candidate did not match), per pass.
    explain: bool = False
    notes: list[str] = field(default_factory=list)
    #: Per fusion pass, the candidates it saw but did not fuse, each "what: why".
    unfused: dict[str, list[str]] = field(default_factory=dict)

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)


class Pass:
    """Base class for passes (optional: any class with these attributes works)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: Names of passes this one must run before / after when both are in a pipeline.
    before: ClassVar[tuple[str, ...]] = ()
    after: ClassVar[tuple[str, ...]] = ()
    #: Whether the pass is part of the default pipeline.
    default: ClassVar[bool] = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class PassStats:
    name: str
    nodes_before: int
    nodes_after: int
    #: The pass's own time; work it left running in the background (``pending``) is not in it.
    seconds: float
    changed: bool
    counters: dict[str, int]
    _details: dict[str, Any] = field(default_factory=dict)
    pending: list[Future] = field(default_factory=list, repr=False, compare=False)

    @property
    def details(self) -> dict[str, Any]:
        """The pass's details, complete: waits for its background work first."""
        for f in self.pending:
            f.result()
        self.pending = []
        return self._details

    def to_dict(self) -> dict[str, Any]:
        details = self.details  # settles the background work (pending is empty after it)
        out = asdict(self)
        del out["_details"], out["pending"]
        out["details"] = details
        return out


def order_passes(passes: list[Pass]) -> list[Pass]:
    """Stable topological order: the given order wherever constraints allow it."""
    index = {p.name: i for i, p in enumerate(passes)}
    if len(index) != len(passes):
        dup = [p.name for p in passes if sum(q.name == p.name for q in passes) > 1][0]
        raise PluginError(f"pass {dup!r} appears twice in the pipeline")
    g = nx.DiGraph()
    g.add_nodes_from(index)
    for p in passes:
        for other in getattr(p, "before", ()):
            if other in index:
                g.add_edge(p.name, other)
        for other in getattr(p, "after", ()):
            if other in index:
                g.add_edge(other, p.name)
    try:
        names = list(nx.lexicographical_topological_sort(g, key=index.__getitem__))
    except nx.NetworkXUnfeasible:
        cycle = " -> ".join(a for a, _ in nx.find_cycle(g))
        raise PluginError(f"pass ordering constraints form a cycle: {cycle}") from None
    by_name = {p.name: p for p in passes}
    return [by_name[n] for n in names]


class Pipeline:
    """An ordered list of passes run on a copy of a model."""

    def __init__(self, passes: list[Pass], *, verify: bool = False, checker: bool = True):
        self.passes = order_passes(list(passes))
        self.verify = verify
        self.checker = checker

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def run(self, model: Model, ctx: PassContext | None = None) -> Model:
        """Return an optimized copy of ``model``; ``model`` itself is never changed.

        Raises :class:`PassError` naming the failing pass and the passes before it.
        """
        ctx = ctx or PassContext()
        work = model.copy()
        done: list[str] = []
        for p in self.passes:
            before = work.node_count()
            start = time.perf_counter()
            try:
                result = p.run(work, ctx)
                if not isinstance(result, PassResult):
                    raise TypeError(f"run() returned {type(result).__name__}, expected PassResult")
                seconds = time.perf_counter() - start  # verification is not the pass's cost
                if self.verify:
                    verify_graph(work, checker=self.checker)
            except VerificationError as e:
                raise PassError(p.name, done, e) from e
            except Exception as e:
                logger.debug("pass %s raised", p.name, exc_info=True)
                raise PassError(p.name, done, e) from e
            stats = PassStats(p.name, before, work.node_count(), seconds, bool(result.changed),
                              dict(result.counters), dict(result.details), list(result.pending))
            work.history.append(stats)
            logger.info("%s: %d -> %d nodes in %.3fs %s", p.name, before, stats.nodes_after, seconds,
                        stats.counters)
            done.append(p.name)
        return work
