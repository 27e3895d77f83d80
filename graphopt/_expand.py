"""Expanding a standard op into the function body the ONNX spec defines for it.

onnx builds the body for a node's attributes and input types (``Attention``,
``RMSNormalization``, ``RotaryEmbedding``, ``LayerNormalization``, ``Gelu`` …
have context-dependent bodies) and its inliner converts the body to the
model's opset. :func:`expand_function` drives that machinery on a one-node
model and then simplifies the result with what is known about this node
(ranks, static dims, dtypes), so a split-back node costs about what the
exporter's own unfused graph cost:

1. shape inference on the one-node model (the node's input shapes, symbolic
   dims included);
2. ``Constant`` nodes become constants; ``Identity`` and casts to the type a
   tensor already has disappear; ``CastLike`` to a known type becomes ``Cast``;
3. ``Shape``/``Size`` of statically known dims fold, and so does every node
   whose inputs are all constants (onnx's reference implementation), e.g. the
   axes computed from the rank, the scale from the head size, GQA's head
   ratio;
4. unused nodes go.

Two traps are handled here: onnx's inliner asserts on a node with an empty
optional input ("Type unknown for"), so the one-node model gives the empty
name a type; and a standard op newer than the model's opset (a decomposition
may emit ``Attention``-23 into an opset-17 model) is built at the op's own
opset, simplified (so ``ReduceMean`` axes are constants) and converted down
to the model's opset with onnx's version converter.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import onnx
import onnx.inliner
import onnx.version_converter
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from graphopt._ir import Model
from graphopt.rewrite import bypass, remove_dead

logger = logging.getLogger(__name__)

#: Parent constants up to this size are copied into the one-node model so the body can fold with them.
_INLINE_CONST_BYTES = 1024
#: Largest tensor the simplifier creates by folding.
_FOLD_MAX_BYTES = 1 << 20
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli"}


class CannotDecompose(Exception):  # noqa: N818 - reads as a statement: "cannot decompose: why"
    """Raised by a decomposition that does not cover this node's configuration; the message says why."""


def c_array(value) -> np.ndarray:
    """A C-contiguous array of the same shape (``np.ascontiguousarray`` turns 0-d into 1-d)."""
    v = np.asarray(value)
    return v if v.flags.c_contiguous else v.copy(order="C")


def norm_domain(domain: str | None) -> str:
    return "" if domain in (None, "", "ai.onnx") else domain


def op_label(node: gs.Node) -> str:
    domain = norm_domain(node.domain)
    return f"{domain}::{node.op}" if domain else node.op


def _schema(op: str, domain: str, opset: int | None) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op, opset if opset is not None else onnx.defs.onnx_opset_version(), domain)
    except onnx.defs.SchemaError:
        return None


@functools.lru_cache(maxsize=512)
def first_version(op: str) -> int | None:
    """The opset that introduced standard op ``op`` (None: not a standard op)."""
    for version in range(1, onnx.defs.onnx_opset_version() + 1):
        if _schema(op, "", version) is not None:
            return version
    return None


def opset_problem(node: gs.Node, model: Model) -> str | None:
    """Why a standard node is invalid in this model (its op is newer than the opset import), else None."""
    if norm_domain(node.domain) != "":
        return None
    opset = model.opset("")
    if opset is None or _schema(node.op, "", opset) is not None:
        return None
    first = first_version(node.op)
    if first is None:
        return None  # not a standard op at all (e.g. onnxruntime's SimplifiedLayerNormalization): the target decides
    return f"{node.op} needs opset {first}, the model imports opset {opset}"


# ------------------------------------------------------------------ dtypes
def onnx_dtype(t: gs.Tensor) -> int:
    """The tensor's ONNX element type, 0 when unknown."""
    dtype = t.dtype
    if dtype is None:
        if isinstance(t, gs.Constant):
            dtype = t.values.dtype
        else:
            return 0
    if isinstance(dtype, (int, np.integer)):
        return int(dtype)
    try:
        return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except (KeyError, TypeError, ValueError):
        return 0


def _value_info(name: str, t: gs.Tensor) -> onnx.ValueInfoProto:
    shape = t.shape
    if shape is not None:
        shape = [d if isinstance(d, str) else (int(d) if d is not None and int(d) >= 0 else None) for d in shape]
    return helper.make_tensor_value_info(name, onnx_dtype(t), shape)


def _constant_values(t: gs.Constant) -> np.ndarray | None:
    v = t._values
    nbytes = getattr(v, "nbytes", None)
    if nbytes is None or nbytes > _INLINE_CONST_BYTES:
        return None
    arr = np.asarray(t.values)
    return arr if arr.dtype.kind in "biuf" and arr.dtype.type.__module__ == "numpy" else None


# ------------------------------------------------------------- the expansion
def expand_function(node: gs.Node, model: Model) -> list[gs.Node] | None:
    """The nodes of ``node``'s ONNX function body, wired to ``node``'s tensors, or None when
    the op has no function body. Raises :class:`CannotDecompose` when onnx cannot build it."""
    domain = norm_domain(node.domain)
    if domain != "":
        return None
    opset = model.opset("") or onnx.defs.onnx_opset_version()
    schema = _schema(node.op, "", opset)
    build_opset = opset
    if schema is None:  # newer than the model's opset: build at the op's first opset, convert down after
        build_opset = first_version(node.op)
        if build_opset is None:
            return None
        schema = _schema(node.op, "", build_opset)
    if not (schema.has_function or schema.has_context_dependent_function):
        return None
    missing = [t.name for t in node.inputs if t.name and (not onnx_dtype(t) or t.shape is None)]
    if missing:  # the body onnx builds depends on them (Attention: 3-D or 4-D inputs)
        raise CannotDecompose(f"the dtype or rank of {', '.join(map(repr, missing))} is unknown, so onnx "
                              f"cannot build the function body of {node.op}")

    sub, bindings = _one_node_model(node, build_opset)
    try:
        inlined = onnx.inliner.inline_selected_functions(sub, [("", node.op)], inline_schema_functions=True)
    except Exception as e:
        raise CannotDecompose(f"onnx could not build the function body of {node.op}: {_first_line(e)}") from e
    if any(n.op_type == node.op and norm_domain(n.domain) == "" for n in inlined.graph.node):
        return None
    del inlined.graph.value_info[:]
    body = simplify_proto(inlined)
    if build_opset != opset:
        try:
            converted = onnx.version_converter.convert_version(body.to_onnx(), opset)
        except Exception as e:
            raise CannotDecompose(f"the function body of {node.op} (opset {build_opset}) cannot be converted "
                                  f"to the model's opset {opset}: {_first_line(e)}") from e
        body = simplify_proto(converted)
    return _bind(body.graph, bindings)


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(e).__name__


def _one_node_model(node: gs.Node, opset: int) -> tuple[onnx.ModelProto, dict[str, gs.Tensor]]:
    """A model holding only ``node``: its inputs typed with everything known about them,
    small constants as initializers. Returns the model and name → parent tensor."""
    bindings: dict[str, gs.Tensor] = {}
    inputs, inits, outputs = [], [], []
    for t in node.inputs:
        if not t.name or t.name in bindings:
            continue
        bindings[t.name] = t
        values = _constant_values(t) if isinstance(t, gs.Constant) else None
        if values is not None:
            inits.append(onnx.numpy_helper.from_array(values, t.name))
        inputs.append(_value_info(t.name, t))  # the inliner reads types from inputs, not initializers
    for t in node.outputs:
        if t.name:
            bindings[t.name] = t
            outputs.append(helper.make_tensor_value_info(t.name, onnx_dtype(t), None))
    attrs = {}
    for k, v in node.attrs.items():
        attrs[k] = onnx.numpy_helper.from_array(np.asarray(v.values), k) if isinstance(v, gs.Constant) else v
    proto_node = helper.make_node(node.op, [t.name for t in node.inputs], [t.name for t in node.outputs],
                                  name=node.name or node.op, **attrs)
    graph = helper.make_graph([proto_node], "expand", inputs, outputs, inits)
    # onnx's inliner asks for the type of every input, the empty name of a missing optional one included.
    if any(not t.name for t in node.inputs):
        graph.value_info.append(helper.make_tensor_value_info("", TensorProto.FLOAT, None))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return model, bindings


def _bind(body: gs.Graph, bindings: dict[str, gs.Tensor]) -> list[gs.Node]:
    """Move the body's nodes out of their one-node graph onto the parent's tensors."""
    nodes = list(body.nodes)
    for n in nodes:
        for i, t in enumerate(n.inputs):
            if t.name in bindings:
                n.inputs[i] = bindings[t.name]
        for i, t in enumerate(n.outputs):
            if t.name in bindings:
                n.outputs[i] = bindings[t.name]
    return nodes


# -------------------------------------------------------------- simplifying
def simplify_proto(proto: onnx.ModelProto) -> Model:
    """Shape-infer and simplify a small model (see the module docstring); returns it as IR."""
    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:  # keep going without shapes; folding does less
        logger.debug("shape inference of an expanded body failed: %s", e)
    model = Model.from_proto(proto)
    simplify(model)
    return model


def simplify(model: Model, max_rounds: int = 8) -> None:
    graph = model.graph
    for _ in range(max_rounds):
        changed = False
        graph.toposort()
        outputs = {id(t) for t in graph.outputs}
        for node in list(graph.nodes):
            if not node.outputs:
                continue
            changed |= _simplify_node(graph, node, model, outputs)
        remove_dead(graph)
        if not changed:
            break


def _same_dtype(a: gs.Tensor, b: gs.Tensor) -> bool:
    da, db = onnx_dtype(a), onnx_dtype(b)
    return bool(da) and da == db


def _static_dims(t: gs.Tensor, start: int, end: int) -> list[int] | None:
    if t.shape is None:
        return None
    rank = len(t.shape)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    dims = list(t.shape[start:end])
    if any(not isinstance(d, (int, np.integer)) or d < 0 for d in dims):
        return None
    return [int(d) for d in dims]


def _to_const(node: gs.Node, value: np.ndarray) -> bool:
    node.outputs[0].to_constant(c_array(value))
    node.outputs.clear()
    node.inputs.clear()
    return True


def _simplify_node(graph: gs.Graph, node: gs.Node, model: Model, outputs: set[int]) -> bool:
    op = node.op if norm_domain(node.domain) == "" else None
    if op in ("Identity", "Cast", "CastLike") and node.inputs and node.inputs[0].name:
        noop = op == "Identity" or _same_dtype(node.inputs[0], node.outputs[0]) or (
            op == "CastLike" and len(node.inputs) > 1 and _same_dtype(node.inputs[0], node.inputs[1]))
        if noop and bypass(graph, node, node.inputs[0], node.outputs[0]):
            return True
    if op == "CastLike" and len(node.inputs) == 2 and onnx_dtype(node.inputs[1]):
        node.op = "Cast"
        node.attrs = {"to": onnx_dtype(node.inputs[1])}
        node.inputs.pop()
        return True
    if op == "Reshape" and merge_reshape_chain(node):
        return True
    if op == "Concat" and drop_empty_concat_inputs(node):
        return True
    if op in ("Reshape", "Slice") or (op == "Concat" and len(node.inputs) == 1):
        if (is_noop_reshape(node) or is_noop_slice(node) or op == "Concat") and \
                bypass(graph, node, node.inputs[0], node.outputs[0]):
            return True
    if op == "Split" and (full := single_full_split(node)) is not None and \
            not any(t.outputs or id(t) in outputs for i, t in enumerate(node.outputs) if i != full) and \
            bypass(graph, node, node.inputs[0], node.outputs[full]):
        return True
    if any(id(t) in outputs for t in node.outputs):
        return False
    if op == "Constant":
        return _fold(node, model)
    if op == "Shape" and node.inputs:
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        if rank is not None:
            dims = _static_dims(node.inputs[0], int(node.attrs.get("start", 0)), int(node.attrs.get("end", rank)))
            if dims is not None:
                return _to_const(node, np.array(dims, dtype=np.int64))
    if op == "Size" and node.inputs and node.inputs[0].shape is not None:
        dims = _static_dims(node.inputs[0], 0, len(node.inputs[0].shape))
        if dims is not None:
            return _to_const(node, np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64))
    if op is None or op in _NONDETERMINISTIC or any(isinstance(a, gs.Graph) for a in node.attrs.values()):
        return False
    if op != "Constant" and (not node.inputs or not all(isinstance(t, gs.Constant) or not t.name
                                                        for t in node.inputs)):
        return False
    if any(isinstance(t, gs.Constant) and np.asarray(t.values).nbytes > _FOLD_MAX_BYTES for t in node.inputs):
        return False
    return _fold(node, model)


def const_ints(t: gs.Tensor) -> list[int] | None:
    if not isinstance(t, gs.Constant):
        return None
    v = np.asarray(t.values)
    return [int(x) for x in v.reshape(-1)] if v.dtype.kind in "iu" else None


def merge_reshape_chain(node: gs.Node) -> bool:
    """``Reshape(Reshape(x, s1), s2)`` → ``Reshape(x, s2)`` when ``s2`` copies (0) only dims
    that ``s1`` copied from ``x`` too."""
    if node.op != "Reshape" or int(node.attrs.get("allowzero", 0)) or len(node.inputs) < 2:
        return False
    src = node.inputs[0]
    prod = src.inputs[0] if len(src.inputs) == 1 else None
    if prod is None or prod.op != "Reshape" or int(prod.attrs.get("allowzero", 0)):
        return False
    s1, s2 = const_ints(prod.inputs[1]), const_ints(node.inputs[1])
    if s1 is None or s2 is None or any(v == 0 and (i >= len(s1) or s1[i] != 0) for i, v in enumerate(s2)):
        return False
    node.inputs[0] = prod.inputs[0]
    return True


def is_noop_reshape(node: gs.Node) -> bool:
    """A ``Reshape`` provably keeping its input's shape: each target dim copies (0) or equals the
    input's static dim, and at most one -1 stands for the only remaining dim."""
    if node.op != "Reshape" or len(node.inputs) < 2 or node.inputs[0].shape is None:
        return False
    target, shape = const_ints(node.inputs[1]), list(node.inputs[0].shape)
    if target is None or len(target) != len(shape):
        return False
    unmatched = 0
    for want, have in zip(target, shape):
        if want == 0 and not int(node.attrs.get("allowzero", 0)):
            continue
        if want == -1:
            unmatched += 1
            continue
        if not (isinstance(have, (int, np.integer)) and int(have) == want):
            return False
    return unmatched <= 1


def _zero_along(t: gs.Tensor, axis: int) -> bool:
    return t.shape is not None and -len(t.shape) <= axis < len(t.shape) and t.shape[axis] == 0


def drop_empty_concat_inputs(node: gs.Node) -> bool:
    """``Concat`` inputs of static size 0 along the axis are dropped."""
    if node.op != "Concat" or len(node.inputs) < 2:
        return False
    axis = int(node.attrs.get("axis", 0))
    keep = [t for t in node.inputs if not _zero_along(t, axis)]
    if not keep or len(keep) == len(node.inputs):
        return False
    node.inputs.clear()
    node.inputs.extend(keep)
    return True


def is_noop_slice(node: gs.Node) -> bool:
    """A ``Slice`` with constant bounds covering every sliced axis whole (static dims, step 1)."""
    if node.op != "Slice" or len(node.inputs) < 3 or node.inputs[0].shape is None:
        return False
    shape = node.inputs[0].shape
    starts, ends = const_ints(node.inputs[1]), const_ints(node.inputs[2])
    axes = const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else \
        (list(range(len(starts))) if starts is not None else None)
    steps = const_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else \
        ([1] * len(starts) if starts is not None else None)
    if None in (starts, ends, axes, steps):
        return False
    for start, end, axis, step in zip(starts, ends, axes, steps):
        dim = shape[axis] if -len(shape) <= axis < len(shape) else None
        if step != 1 or not isinstance(dim, (int, np.integer)) or start not in (0, -int(dim) if dim else 0) \
                or end < int(dim):
            return False
    return True


def single_full_split(node: gs.Node) -> int | None:
    """For a ``Split`` whose outputs are all of static size 0 along the axis but one, that one's index."""
    if node.op != "Split" or len(node.outputs) < 2:
        return None
    axis = int(node.attrs.get("axis", 0))
    empty = [_zero_along(t, axis) for t in node.outputs]
    return empty.index(False) if empty.count(False) == 1 else None


def _fold(node: gs.Node, model: Model) -> bool:
    names = [f"in{i}" if t.name else "" for i, t in enumerate(node.inputs)]
    attrs = {k: onnx.numpy_helper.from_array(np.asarray(v.values), k) if isinstance(v, gs.Constant) else v
             for k, v in node.attrs.items()}
    proto = helper.make_node(node.op, names, [f"out{i}" for i in range(len(node.outputs))], **attrs)
    feeds = {n: np.asarray(t.values) for n, t in zip(names, node.inputs) if n}
    try:
        results = ReferenceEvaluator(proto, opsets={"": model.opset("")}).run(None, feeds)
    except Exception as e:
        logger.debug("cannot fold %s: %s", node.op, e)
        return False
    results = [np.asarray(r) for r in results]
    if any(r.dtype.kind not in "biuf" or r.dtype.type.__module__ != "numpy" or r.nbytes > _FOLD_MAX_BYTES
           for r in results):
        return False
    for out, value in zip(node.outputs, results):
        if out.name:
            out.to_constant(c_array(value))
    node.outputs.clear()
    node.inputs.clear()
    return True
