"""The public library API, mirrored by the CLI."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from graphopt._backend import Backend, Executable
from graphopt._errors import BackendError
from graphopt._ir import Model
from graphopt._legalize import legalize, unsupported_nodes
from graphopt._pipeline import PassContext, Pipeline
from graphopt._plugins import get_registry
from graphopt._verify import verify as verify_graph


def _as_model(model: Model | str | os.PathLike) -> Model:
    return model if isinstance(model, Model) else Model.load(model)


def get_backend(target: str | Backend) -> Backend:
    return target if isinstance(target, Backend) else get_registry().backend(target)


def build_pipeline(passes: Iterable[str] | None = None, disable: Iterable[str] = (), *,
                   verify: bool = False) -> Pipeline:
    """The passes to run: ``passes`` (exactly those) or the defaults, minus ``disable``."""
    registry = get_registry()
    names = list(passes) if passes is not None else registry.default_passes()
    disabled = list(disable)
    for n in names + disabled:
        registry.pass_class(n)  # raises UnknownNameError naming the known passes
    return Pipeline([registry.pass_class(n)() for n in names if n not in disabled], verify=verify)


def optimize(model: Model | str | os.PathLike, target: str | Backend = "cpu", *,
             passes: Iterable[str] | None = None, disable: Iterable[str] = (), verify: bool = False,
             explain: bool = False, **options: Any) -> Model:
    """Optimize ``model`` for ``target`` and return the optimized copy.

    The input model is never changed. ``passes`` picks the passes to run
    (default: every default pass of every plugin), ``disable`` removes some,
    ``verify`` checks the graph after every pass, ``options`` reach every pass
    through ``ctx.options`` (e.g. ``fold_max_bytes``). Per-pass statistics are
    appended to the returned model's ``history``. Finally the result is legalized
    for ``target``: what it cannot run is split back (a ``legalize`` entry in
    ``history`` says what and why), or :class:`LegalizeError` names what has no
    decomposition.
    """
    backend = get_backend(target)
    pipeline = build_pipeline(passes, disable, verify=verify)
    ctx = PassContext(target=backend, options=dict(options), explain=explain)
    result = pipeline.run(_as_model(model), ctx)
    result.notes.extend(ctx.notes)
    legalize(result, backend, in_place=True)
    if verify and result.history and result.history[-1].name == "legalize":
        verify_graph(result)
    return result


def compile(model: Model | str | os.PathLike, target: str | Backend = "cpu") -> Executable:  # noqa: A001
    """Compile ``model`` for ``target`` into an :class:`Executable`, splitting back (on a
    copy) whatever the target cannot run first."""
    backend = get_backend(target)
    reason = backend.available()
    if reason:
        raise BackendError(f"target {backend.name!r} is unavailable here: {reason}")
    model = _as_model(model)
    if unsupported_nodes(model, backend):
        model = legalize(model, backend)
    return backend.compile(model)
