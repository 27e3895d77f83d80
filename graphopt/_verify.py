"""Structural verification of a graph: run between passes (always in tests).

Three checks, cheapest first, each failing with a message that names the
offending node or tensor:

1. acyclic — a cycle is reported with the nodes on it (networkx finds it);
2. every node input is produced — by a node, a graph input or a constant;
3. the onnx checker, on a copy of the model with the weights moved to graph
   inputs, so it is cheap and works for models with external data.
"""

from __future__ import annotations

import networkx as nx
import onnx
import onnx_graphsurgeon as gs

from graphopt._errors import VerificationError
from graphopt._ir import Model


def _node_label(node: gs.Node) -> str:
    return f"{node.name or '<unnamed>'} ({node.op})"


def dataflow_graph(graph: gs.Graph) -> nx.DiGraph:
    """Producer → consumer edges between the nodes of ``graph`` (by node index)."""
    g = nx.DiGraph()
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        g.add_node(i)
        for out in node.outputs:
            if out.name:
                producer[out.name] = i
    for i, node in enumerate(graph.nodes):
        for inp in _all_inputs(node):
            j = producer.get(inp)
            if j is not None:
                g.add_edge(j, i)
    return g


def _all_inputs(node: gs.Node) -> list[str]:
    """Names a node reads, including outer-scope names its subgraphs read."""
    names = [t.name for t in node.inputs if t.name]
    for attr in node.attrs.values():
        if isinstance(attr, gs.Graph):
            local = {t.name for n in attr.nodes for t in n.outputs} | {t.name for t in attr.inputs}
            for sub in attr.nodes:
                names.extend(n for n in _all_inputs(sub) if n not in local)
    return names


def check_acyclic(graph: gs.Graph) -> None:
    g = dataflow_graph(graph)
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return
    names = " -> ".join(_node_label(graph.nodes[a]) for a, _ in cycle)
    raise VerificationError(f"graph has a cycle: {names}")


def check_inputs_produced(graph: gs.Graph) -> None:
    available = {t.name for t in graph.inputs}
    available |= {n for n, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    for node in graph.nodes:
        available |= {t.name for t in node.outputs if t.name}
    for node in graph.nodes:
        for name in _all_inputs(node):
            if name not in available:
                raise VerificationError(
                    f"node {_node_label(node)} reads {name!r}, which no node, graph input or constant produces"
                )
    for out in graph.outputs:
        if out.name not in available:
            raise VerificationError(f"graph output {out.name!r} is not produced by any node")


def check_onnx(model: Model) -> None:
    proto = model.to_onnx_without_weights()
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid model"
        raise VerificationError(f"onnx checker: {first}") from e


def verify(model: Model, *, checker: bool = True) -> None:
    """Raise :class:`VerificationError` if the graph is malformed."""
    check_acyclic(model.graph)
    check_inputs_produced(model.graph)
    if checker:
        check_onnx(model)
