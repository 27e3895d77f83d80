"""Plugin discovery: built-ins through the hooks, third parties through entry points."""

from __future__ import annotations

import textwrap
import warnings

import pytest

import graphopt
from graphopt._plugins import build_registry


def _fake_distribution(root, name: str, module: str, body: str) -> None:
    """An installed distribution (dist-info + module) on a path we add to sys.path."""
    dist = root / f"{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[graphopt]\n{name} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(body))


def test_builtins_register_through_the_hooks():
    reg = build_registry(entry_points=False)
    assert {n: r.plugin for n, r in reg.passes.items()} == {
        "shape-inference": "graphopt.passes",
        "identity-elimination": "graphopt.passes",
        "constant-folding": "graphopt.passes",
        "initializer-dedupe": "graphopt.passes",
        "tie-embedding-dedupe": "graphopt.passes",
        "rmsnorm-fuse": "graphopt.passes",
        "attention-fuse": "graphopt.passes",
        "matmul-merge": "graphopt.passes",
        "quantize": "graphopt.passes",
        "matmulnbits-format": "graphopt.passes",
        "dead-code-elimination": "graphopt.passes",
    }
    assert {n: r.plugin for n, r in reg.backends.items()} == {
        "cpu": "graphopt.backends", "cuda": "graphopt.backends", "onnxruntime": "graphopt.backends"}
    assert reg.problems == []


def test_example_plugin_found_through_its_entry_point():
    reg = build_registry()
    entry = reg.passes.get("cast-cleanup")
    assert entry is not None, "install plugins/graphopt-cast-cleanup (README test command does)"
    assert entry.plugin == "cast_cleanup"
    assert reg.plugins["cast_cleanup"].startswith("graphopt-cast-cleanup ")


def test_broken_plugin_warns_by_name_and_the_rest_works(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "broken_plugin", "broken_plugin_mod", "raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(graphopt.PluginWarning,
                      match=r"graphopt plugin 'broken_plugin' \(broken_plugin_mod\) failed to load: "
                            r"ImportError: needs libfoo; skipped"):
        reg = build_registry()
    assert "dead-code-elimination" in reg.passes and "cpu" in reg.backends
    assert "cast-cleanup" in reg.passes


def test_plugin_whose_hook_raises_is_reported(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "raising_plugin", "raising_plugin_mod", """
        import graphopt

        @graphopt.hookimpl
        def graphopt_register_passes(register):
            raise ValueError("config missing")

        class Target(graphopt.Backend):
            name = "toy"
            def ops(self):
                return [graphopt.OpSupport("Relu")]

        @graphopt.hookimpl
        def graphopt_register_backends(register):
            register(Target)
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(graphopt.PluginWarning,
                      match=r"plugin 'raising_plugin', hook graphopt_register_passes: ValueError: config missing"):
        reg = build_registry()
    assert reg.backends["toy"].plugin == "raising_plugin"  # its other hook still worked


def test_duplicate_and_invalid_registrations_are_refused():
    class Dup(graphopt.Pass):
        name = "dead-code-elimination"
        summary = "impostor"

        def run(self, model, ctx):
            return graphopt.PassResult(False)

    class Plugin:
        @graphopt.hookimpl
        def graphopt_register_passes(self, register):
            register(Dup)

        @graphopt.hookimpl
        def graphopt_register_backends(self, register):
            register(object)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = build_registry(entry_points=False, extra=(("dup_plugin", Plugin()),))
    messages = [str(w.message) for w in caught]
    assert any("pass 'dead-code-elimination' is already registered by 'graphopt.passes'" in m for m in messages)
    assert any("is not a backend: it needs a 'name'" in m for m in messages)
    assert reg.passes["dead-code-elimination"].plugin == "graphopt.passes"


def test_misspelled_hook_is_reported():
    class Typo:
        @graphopt.hookimpl
        def graphopt_register_pases(self, register):  # noqa: D401 - deliberately misspelled
            pass

    with pytest.warns(graphopt.PluginWarning, match=r"graphopt plugin 'typo'.*graphopt_register_pases"):
        build_registry(entry_points=False, extra=(("typo", Typo()),))


def test_disable_third_party_plugins(monkeypatch):
    monkeypatch.setenv("GRAPHOPT_DISABLE_PLUGINS", "cast_cleanup")
    reg = build_registry()
    assert "cast-cleanup" not in reg.passes and "dead-code-elimination" in reg.passes
