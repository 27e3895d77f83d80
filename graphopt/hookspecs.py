"""The plugin contract: the hooks graphopt calls, documented like an API.

Built-in passes and backends use exactly these hooks (they are registered the
same way a third-party package is, only without an entry point). A third-party
package declares one entry point in the group ``graphopt`` whose object (a
module or any object) carries functions decorated with :data:`hookimpl`::

    # pyproject.toml
    [project.entry-points.graphopt]
    my_plugin = "my_package.plugin"

    # my_package/plugin.py
    import graphopt

    @graphopt.hookimpl
    def graphopt_register_passes(register):
        register(MyPass)

Each hook receives a ``register`` callable instead of returning a list (the
shape used by simonw/llm), so a plugin can register any number of things, and
graphopt can attribute each one to the plugin that registered it. A hook that
raises is reported as a warning naming the plugin and the hook; the other
plugins still load.
"""

from __future__ import annotations

import pluggy

PROJECT = "graphopt"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def graphopt_register_passes(register):
    """Register graph passes.

    :param register: call ``register(pass_class)`` once per pass. A pass class
        has a class attribute ``name`` (stable, kebab-case, unique across all
        plugins), ``summary`` (one line), optional ``before``/``after`` tuples
        of pass names it must run before/after when both are in a pipeline,
        ``default`` (whether it runs when the user names no passes), and a
        method ``run(model, ctx) -> PassResult``. See :class:`graphopt.Pass`.
    """


@hookspec
def graphopt_register_backends(register):
    """Register execution targets.

    :param register: call ``register(backend_class)`` once per backend. A
        backend class has ``name`` (the ``--target`` value), ``device`` and
        ``summary``, declares the ops it supports (``ops()`` returning
        :class:`graphopt.OpSupport` entries) and compiles a model it fully
        supports with ``compile(model)``. See :class:`graphopt.Backend`.
    """


@hookspec
def graphopt_register_decompositions(register):
    """Register decompositions of ops into simpler ops.

    :param register: call ``register(domain, op_type, fn)``. ``fn(node, model)``
        returns the list of nodes that replace ``node`` (same graph inputs and
        outputs). Legalization uses it to split back ops a backend cannot run;
        every custom-domain op graphopt or a plugin emits must have one.
    """
