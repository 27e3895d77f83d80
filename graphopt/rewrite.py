"""Safe graph edits shared by every pass.

onnx-graphsurgeon lets you rewire anything and clean up later, so a pass can
leave a half-edited graph. These helpers do one complete edit each and refuse
(returning False) when the edit would change what the graph computes or names
as its outputs.
"""

from __future__ import annotations

from contextlib import contextmanager

import onnx_graphsurgeon as gs


def replace_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> int:
    """Make every consumer of ``old`` (nodes, including those in subgraphs) read ``new``.

    Graph outputs are not touched. Returns the number of inputs rewired.
    """
    count = 0
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new
                count += 1
    return count


def bypass(graph: gs.Graph, node: gs.Node, src: gs.Tensor, dst: gs.Tensor) -> bool:
    """Remove ``node`` whose output ``dst`` equals its input ``src``.

    When ``dst`` is a graph output, ``src`` takes its name and place, which is only
    possible if ``src`` is an internal tensor produced by a node; otherwise the node is
    kept and False is returned.
    """
    is_output = any(t is dst for t in graph.outputs)
    if is_output:
        src_is_boundary = (
            isinstance(src, gs.Constant)
            or any(t is src for t in graph.inputs)
            or any(t is src for t in graph.outputs)
            or not src.inputs
        )
        if src_is_boundary:
            return False
    replace_uses(graph, dst, src)
    if is_output:
        name = dst.name
        node.outputs.clear()  # frees the name before src takes it
        src.name = name
        src.dtype = src.dtype if src.dtype is not None else dst.dtype
        src.shape = src.shape if src.shape is not None else dst.shape
        graph.outputs = [src if t is dst else t for t in graph.outputs]
    node.inputs.clear()
    node.outputs.clear()
    return True


def remove_dead(graph: gs.Graph) -> tuple[int, int]:
    """Drop nodes and constants that no graph output depends on.

    Returns (nodes removed, constants removed). Graph inputs are kept: removing one
    changes the model's interface.
    """
    nodes = len(graph.nodes)
    consts = sum(isinstance(t, gs.Constant) for t in graph.tensors().values())
    graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False, recurse_subgraphs=True)
    after = sum(isinstance(t, gs.Constant) for t in graph.tensors().values())
    return nodes - len(graph.nodes), consts - after


def is_standard(node: gs.Node, *ops: str) -> bool:
    """Whether ``node`` is in the default ONNX domain (and, if given, one of ``ops``)."""
    return (node.domain or "") in ("", "ai.onnx") and (not ops or node.op in ops)


def fuse(graph: gs.Graph, roots: list[gs.Tensor], node: gs.Node, rule: str,
         replaced: list[gs.Node] = ()) -> gs.Node:
    """Make ``node`` the producer of ``roots`` (the outputs of a matched subgraph) and drop
    whatever computed them before once nothing else reads it. ``replaced`` are the matched
    nodes, disconnected at once (the caller has checked nothing else reads them). ``node``
    remembers ``rule`` (exported as the node's ``graphopt.rule`` metadata) so reports can
    count fusions per rule."""
    keep = {id(t) for t in roots} | {id(t) for t in node.inputs}
    for old in replaced:
        if not any(id(o) in keep for o in old.outputs):
            old.inputs.clear()
            old.outputs.clear()
    for t in roots:
        for old in list(t.inputs):
            old.outputs = [o if o is not t else gs.Variable(unique_name(graph, f"{t.name}__replaced"), t.dtype, t.shape)
                           for o in old.outputs]
    node.outputs = list(roots)
    node.meta = {"graphopt.rule": rule}
    graph.nodes.append(node)
    return node


def fused_by(node: gs.Node) -> str | None:
    """The rule that created ``node``, if a graphopt fusion did."""
    return getattr(node, "meta", {}).get("graphopt.rule")


def unique_name(graph: gs.Graph, base: str) -> str:
    """A tensor/node name not used in ``graph`` yet. Walks the graph, unless inside
    :func:`naming_scope` (or use a :class:`Namer` in loops)."""
    namer = _SCOPES.get(id(graph))
    return namer(base) if namer is not None else Namer(graph)(base)


_SCOPES: dict[int, Namer] = {}


@contextmanager
def naming_scope(graph: gs.Graph):
    """Within the block, :func:`unique_name` on ``graph`` uses one :class:`Namer` (one graph
    walk, not one per name: a rewrite loop was quadratic in the graph's size). Every name the
    block gives a new tensor or node must come from :func:`unique_name`."""
    if id(graph) in _SCOPES:
        yield
        return
    _SCOPES[id(graph)] = Namer(graph)
    try:
        yield
    finally:
        del _SCOPES[id(graph)]


class Namer:
    """Hands out names unused in ``graph``, remembering the ones it gave (one graph walk)."""

    def __init__(self, graph: gs.Graph):
        self.used = set(graph.tensors()) | {n.name for n in graph.nodes}

    def __call__(self, base: str) -> str:
        base = base or "t"
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name
