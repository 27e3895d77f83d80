"""A third-party backend plugin, installed for the tests as a distribution on sys.path.

``graphopt-tiny-backend`` (module ``graphopt_tiny_backend``, entry point ``tiny_backend``
in the ``graphopt`` group) registers the target ``tiny``: the cpu backend's table without
``Attention``, ``RMSNormalization`` and ``RotaryEmbedding``, and with ``DequantizeLinear``
per-tensor / per-axis only (a predicate refuses ``block_size`` > 0). It runs graphs with
the cpu backend's executor, after checking that the graph holds nothing outside its own
table, so a test passes only if optimize/legalize really kept to that table.

The ``tiny_target`` fixture writes the distribution (dist-info with ``entry_points.txt``
plus the module) into a temporary folder, puts it on ``sys.path`` and rebuilds graphopt's
registry, so the backend is found exactly as an installed package's would be; on teardown
it removes all of it and rebuilds the registry again.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

import graphopt

DIST = "graphopt-tiny-backend"
MODULE = "graphopt_tiny_backend"
ENTRY_POINT = "tiny_backend"
TARGET = "tiny"
LEFT_OUT = ("Attention", "RMSNormalization", "RotaryEmbedding")

SOURCE = '''
"""graphopt-tiny-backend: a deliberately small target for graphopt (a test plugin)."""

import graphopt

LEFT_OUT = ("Attention", "RMSNormalization", "RotaryEmbedding")


def _not_blocked(inner):
    def predicate(node, model):
        if int(node.attrs.get("block_size", 0) or 0):
            return "blocked DequantizeLinear (block_size > 0) is not supported"
        return inner(node, model) if inner is not None else None
    return predicate


class TinyBackend(graphopt.Backend):
    name = "tiny"
    device = "cpu"
    summary = "the cpu op set without fused attention, RMS norm, rotary and blocked dequantization"

    def ops(self):
        table = []
        for s in graphopt.get_backend("cpu").ops():
            if s.op_type in LEFT_OUT:
                continue
            if s.op_type == "DequantizeLinear":
                s = graphopt.OpSupport(s.op_type, s.domain, s.since, s.until, _not_blocked(s.predicate),
                                       "per-tensor and per-axis only")
            table.append(s)
        return table

    def compile(self, model):
        problems = [f"{n.name} ({n.op}): {reason}" for n in model.graph.nodes
                    if (reason := self.check(n, model)) is not None]
        if problems:
            raise graphopt.BackendError(f"tiny cannot run {len(problems)} node(s): " + "; ".join(problems[:5]))
        return graphopt.get_backend("cpu").compile(model)  # the cpu backend's kernels and executor


@graphopt.hookimpl
def graphopt_register_backends(register):
    register(TinyBackend)
'''


def install(root) -> None:
    """Write the distribution into ``root`` (a folder to put on sys.path)."""
    dist = root / f"{MODULE}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[graphopt]\n{ENTRY_POINT} = {MODULE}\n")
    (root / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    """The name of the installed ``tiny`` target (registry rebuilt with the plugin found)."""
    root = tmp_path_factory.mktemp("site")
    install(root)
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        graphopt.get_registry(reload=True)
        yield TARGET
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(MODULE, None)
        importlib.invalidate_caches()
        graphopt.get_registry(reload=True)
