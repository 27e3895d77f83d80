"""The ``cpu`` backend: numpy kernels and a precomputed schedule.

``compile`` does all the graph work once:

1. checks every node against the declared table (one error listing every node
   it cannot run, with the reason);
2. applies compile-time rewrites (e.g. ``DequantizeLinear → MatMul`` on a
   constant weight becomes one dequant-matmul kernel);
3. orders the nodes topologically, gives every tensor an integer slot,
   builds each node's kernel from its attributes, and computes after which
   step each intermediate is last used.

``run`` then only walks that list: look up input slots, call the kernel,
store outputs, drop intermediates after their last use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt import _memory
from graphopt._backend import Backend, Executable, OpSupport, op_version
from graphopt._errors import BackendError
from graphopt._ir import Model
from graphopt.backends import cpu_kernels
from graphopt.backends.cpu_kernels import KERNELS, KNode, find_kernel

logger = logging.getLogger(__name__)

#: Domain of nodes the backend creates for itself at compile time; never declared.
INTERNAL_DOMAIN = "graphopt.cpu"

#: Compile-time rewrites: ``fn(model) -> int`` (number of rewrites), applied in order.
COMPILE_REWRITES: list[Callable[[Model], int]] = []


def _dtype(t: gs.Tensor) -> np.dtype | None:
    try:
        return np.dtype(t.dtype) if t.dtype is not None and not isinstance(t.dtype, int) else None
    except TypeError:
        return None


@dataclass
class Step:
    node_name: str
    op: str
    fn: Callable[..., Any]
    inputs: tuple[int, ...]  # -1: missing optional input
    outputs: tuple[int, ...]
    free: tuple[int, ...]  # slots dead after this step


class SlotExecutable(Executable):
    """An executor over integer slots: ``input_slots`` / ``output_slots`` map names to slots."""

    def __init__(self, steps: list, n_slots: int, constants: dict[int, Any], inputs: dict[str, int],
                 outputs: dict[str, int], rewrites: dict[str, int]):
        self.steps = steps
        self.n_slots = n_slots
        self.constants = constants
        self.input_slots = inputs
        self.output_slots = outputs
        self.rewrites = rewrites
        #: The environment every run starts from: constants in their slots.
        self._base: list[Any] = [None] * n_slots
        for slot, value in constants.items():
            self._base[slot] = value

    @property
    def input_names(self) -> list[str]:
        return list(self.input_slots)

    @property
    def output_names(self) -> list[str]:
        return list(self.output_slots)

    def check_feeds(self, feeds: dict[str, Any]) -> None:
        missing = [n for n in self.input_slots if n not in feeds]
        if missing:
            raise BackendError(f"missing inputs: {', '.join(missing)}")


class CpuExecutable(SlotExecutable):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        env = list(self._base)
        for name, slot in self.input_slots.items():
            env[slot] = np.asarray(feeds[name])
        for step in self.steps:
            args = [env[i] if i >= 0 else None for i in step.inputs]
            store(env, step.outputs, invoke("cpu", step.node_name, step.op, step.fn, args))
            for slot in step.free:
                env[slot] = None
        return {name: _contiguous(env[slot]) for name, slot in self.output_slots.items()}


def invoke(backend: str, node: str, op: str, fn: Callable[..., Any], args: list[Any]) -> Any:
    """Calls a step's kernel; a failure names the backend, the node, its op and the input shapes."""
    try:
        return fn(*args)
    except Exception as e:
        shapes = ", ".join(str(getattr(a, "shape", None)) for a in args)
        raise BackendError(f"{backend}: node {node!r} ({op}) failed on inputs of shape "
                           f"[{shapes}]: {type(e).__name__}: {e}") from e


def store(env: list[Any], outputs: tuple[int, ...], result: Any) -> None:
    """Puts a kernel's result (one array or a tuple) into its output slots (-1: output not wanted)."""
    if len(outputs) == 1:
        env[outputs[0]] = result if not isinstance(result, tuple) else result[0]
    else:
        for slot, value in zip(outputs, result):
            if slot >= 0:
                env[slot] = value


def _contiguous(value: Any) -> np.ndarray:
    a = np.asarray(value)
    return a if a.flags.c_contiguous and a.flags.owndata else np.array(a, copy=True)


class CpuBackend(Backend):
    name = "cpu"
    device = "cpu"
    summary = "numpy kernels for the LLM op set, fused ops included"

    def ops(self) -> list[OpSupport]:
        return [OpSupport(k.op, k.domain, k.since, k.until, k.predicate) for k in KERNELS
                if k.domain != INTERNAL_DOMAIN]

    def compile(self, model: Model) -> CpuExecutable:
        _memory.reuse_freed_memory()
        work = model.copy()
        check_nodes("cpu", work, self.check)
        rewrites = {fn.__name__: fn(work) for fn in COMPILE_REWRITES}
        return _schedule(work, rewrites)


def check_nodes(backend: str, model: Model, check: Callable[[gs.Node, Model], str | None]) -> None:
    """Refuses a model with nodes ``check`` rejects, naming (up to ten of) them and why."""
    problems = [f"{n.name or '<unnamed>'} ({n.op}): {reason}"
                for n in model.graph.nodes if (reason := check(n, model)) is not None]
    if problems:
        raise BackendError(f"{backend} cannot run {len(problems)} node(s): " + "; ".join(problems[:10]) +
                           (f"; … (+{len(problems) - 10})" if len(problems) > 10 else ""))


def _knode(node: gs.Node, model: Model) -> KNode:
    domain = node.domain or ""
    return KNode(
        op=node.op, domain=domain, version=op_version(node.op, domain, model.opset(domain)) or 1,
        attrs=dict(node.attrs), n_inputs=len(node.inputs), n_outputs=len(node.outputs),
        input_dtypes=[_dtype(t) for t in node.inputs], output_dtypes=[_dtype(t) for t in node.outputs],
        input_shapes=[tuple(t.shape) if t.shape is not None else None for t in node.inputs], name=node.name,
    )


class Slots(dict):
    """Tensor name -> integer slot of the executor's environment, given out on first use."""

    def slot(self, name: str) -> int:
        if name not in self:
            self[name] = len(self)
        return self[name]


def plan_frees(steps: list, keep: set[int]) -> None:
    """Sets each step's ``free``: the slots (outside ``keep``) whose last use is that step."""
    last_use: dict[int, int] = {}
    for i, step in enumerate(steps):
        for s in step.inputs + step.outputs:
            if s >= 0 and s not in keep:
                last_use[s] = i
    frees: dict[int, list[int]] = {}
    for s, i in last_use.items():
        frees.setdefault(i, []).append(s)
    for i, step in enumerate(steps):
        step.free = tuple(frees.get(i, ()))


def const_values(t: gs.Constant) -> np.ndarray:
    """A constant's values, without caching them on the tensor. graphsurgeon cannot export a
    4-bit constant once its lazy values were replaced by an ml_dtypes array; and the graph a
    compile works on is cyclic (nodes and tensors point at each other), so arrays cached on it
    would outlive the executable until the cyclic garbage collector ran: the fp32 weights of a
    reference run stayed resident beside the next model's."""
    v = t._values
    return v.load() if isinstance(v, LazyValues) else np.asarray(v)


def _schedule(model: Model, rewrites: dict[str, int]) -> CpuExecutable:
    graph = model.graph
    graph.toposort()
    slots = Slots()
    slot = slots.slot

    inputs = {t.name: slot(t.name) for t in graph.inputs}
    constants = {slot(name): const_values(t) for name, t in graph.tensors().items()
                 if isinstance(t, gs.Constant)}
    steps: list[Step] = []
    for node in graph.nodes:
        spec = find_kernel(node.op, node.domain or "", op_version(node.op, node.domain or "",
                                                                   model.opset(node.domain or "")))
        if spec is None:  # compile rewrites must only create nodes with kernels
            raise BackendError(f"cpu: no kernel for {node.op} (node {node.name!r})")
        fn = spec.factory(_knode(node, model))
        steps.append(Step(node.name, node.op, fn,
                          tuple(slot(t.name) if t.name else -1 for t in node.inputs),
                          tuple(slot(t.name) if t.name else -1 for t in node.outputs), ()))
    outputs = {t.name: slot(t.name) for t in graph.outputs}
    plan_frees(steps, set(outputs.values()) | set(constants) | set(inputs.values()))
    logger.debug("cpu: %d steps, %d slots, %d constants", len(steps), len(slots), len(constants))
    return CpuExecutable(steps, len(slots), constants, inputs, outputs, rewrites)


# Fused and quantized kernels register themselves on import.
from graphopt.backends import cpu_fused  # noqa: E402,F401
assert cpu_kernels  # registry module is imported for its side effects
