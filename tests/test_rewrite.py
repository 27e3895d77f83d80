"""Names handed out by graphopt.rewrite."""

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import rewrite
from graphopt.rewrite import naming_scope, unique_name


def _graph() -> gs.Graph:
    x = gs.Variable("x", np.float32, (2,))
    y = gs.Variable("y", np.float32, (2,))
    return gs.Graph(nodes=[gs.Node("Relu", "relu", inputs=[x], outputs=[y])], inputs=[x], outputs=[y])


def test_unique_name_avoids_tensor_and_node_names():
    g = _graph()
    assert unique_name(g, "x") == "x_1"
    assert unique_name(g, "relu") == "relu_1"
    assert unique_name(g, "z") == "z"


def test_naming_scope_walks_the_graph_once_and_never_repeats_a_name(monkeypatch):
    g = _graph()
    walks = []
    real = rewrite.Namer.__init__

    def counting(self, graph):
        walks.append(graph)
        real(self, graph)

    monkeypatch.setattr(rewrite.Namer, "__init__", counting)
    with naming_scope(g):
        names = [unique_name(g, "x") for _ in range(3)]
        with naming_scope(g):  # nested: the same namer
            names.append(unique_name(g, "x"))
    assert names == ["x_1", "x_2", "x_3", "x_4"]
    assert len(walks) == 1
    # outside the scope every call walks the graph again (x_1… were never added to it)
    assert unique_name(g, "x") == "x_1" and len(walks) == 2
    assert id(g) not in rewrite._SCOPES


def test_naming_scope_is_closed_on_error():
    g = _graph()
    try:
        with naming_scope(g):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert id(g) not in rewrite._SCOPES
