"""Transformer fuse: each decoder layer's attention becomes standard ``Attention`` (opset 23),
its rotary embedding standard ``RotaryEmbedding`` (opset 23).

The match starts at the attention output and walks up (structure and math, not names)::

    Reshape(Transpose(MatMul(Softmax(scores), V*), [0,2,1,3]))        → Y  [B, S, H·D]
    scores = [Add(] Mul(MatMul(Q*, Transpose(K*, [0,1,3,2])), scale) [, mask)]   (or Div by √d)
    Q* = rotary(Transpose(Reshape(q, [B,S,H,D]), [0,2,1,3]))          rotary optional
    K* = repeat_kv(Concat(past_key, rotary(heads(k)), axis=-2))       repeat and cache optional
    V* = repeat_kv(Concat(past_value, heads(v), axis=-2))
    rotary(t) = t·cos + Concat(-t[..., D/2:], t[..., :D/2])·sin       (rotate-half, non-interleaved)
    repeat_kv(t) = Reshape(Expand(Unsqueeze(t, 2), …), [B, H, T, D])  (grouped-query attention)

and becomes, with 3-D inputs so the head reshapes and transposes disappear::

    q' = RotaryEmbedding(q, cos_half, sin_half, num_heads=H)
    k' = RotaryEmbedding(k, cos_half, sin_half, num_heads=Hkv)
    Y, present_key, present_value = Attention(q', k', v, mask, past_key, past_value,
                                              q_num_heads=H, kv_num_heads=Hkv, scale=s)

The additive mask the exporter built (causal and padding together, left padding
included) is passed through unchanged, so the fused op computes exactly what the
export did. ``cos_half``/``sin_half`` are the first halves of the exporter's own
``[B, S, D]`` cos/sin tensors (one Slice each, shared by all layers); the pass
checks they really are ``cos(Concat(f, f))`` so the halves are equal.

Not fused (each with a reason under ``--explain``): interleaved or partial rotary,
softcapping, scores scaled on Q and K separately, head sizes unknown after shape
inference, intermediates used outside the block, a target without Attention or
RotaryEmbedding.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

from graphopt._ir import Model
from graphopt._pipeline import PassContext
from graphopt.fusion import FusionPass
from graphopt.pattern import Any, Const, Match, Op, OneOf, Wrapped, const_value, escapes, find, producer
from graphopt.passes.decompose_attention import never_minus_inf
from graphopt.rewrite import fuse, unique_name

OPSET = 23


def _perm(expected):
    return lambda p: p is not None and list(p) == expected


def _axis_last(a) -> bool:
    return a in (-1, 3)


# ------------------------------------------------------------------ patterns
def _scalar_scaled(inner, name: str):
    """``inner`` or ``inner · c`` (c a scalar constant, bound as ``name``): SDPA exports scale
    Q and K by √scale each instead of scaling the scores."""
    return OneOf(Op("Mul", Wrapped(inner), Const(name, scalar=True)), inner)


def _nan_guarded(node: gs.Node, m: Match) -> str | None:
    return None if node.inputs[2] is m["softmax"].outputs[0] else "the NaN guard selects another tensor"


def _attention_pattern():
    k_in = _scalar_scaled(Wrapped(Any("k_rep")), "k_scale_pre")
    k_t = OneOf(
        Op("Transpose", k_in, perm=_perm([0, 1, 3, 2])),
        # torch.onnx (dynamo) transposes SDPA's K as 3-D: [B·H, T, D] → [B·H, D, T] → [B, H, D, T]
        Op("Reshape", Op("Transpose", Op("Reshape", k_in, Any("kt_flat_shape")), perm=_perm([0, 2, 1])),
           Any("kt_back_shape"), name="kt_back"))
    qk = Op("MatMul", _scalar_scaled(Wrapped(Any("q_rot")), "q_scale"), Wrapped(_scalar_scaled(k_t, "k_scale")),
            name="qk")
    scaled = OneOf(Op("Mul", Wrapped(qk), Const("scale", scalar=True)),
                   Op("Div", Wrapped(qk), Const("divisor", scalar=True)), qk)
    scores = OneOf(Op("Add", Wrapped(scaled), Any("mask")), scaled)
    softmax = Op("Softmax", Wrapped(scores), axis=_axis_last, name="softmax")
    # torch's SDPA decomposition: Where(IsNaN(p), 0, p) — a row with every key masked gives zeros
    guarded = Op("Where", Op("IsNaN", softmax), Const(value=0.0), Any(), name="nan_guard", check=_nan_guarded)
    pv = Op("MatMul", Wrapped(OneOf(guarded, softmax)), Wrapped(Any("v_rep")), name="pv")
    # TorchScript SDPA exports reshape the output to its own shape first
    pv = OneOf(Op("Reshape", pv, Any("pv_shape"), name="pv_noop"), pv)
    return Op("Reshape", Op("Transpose", pv, perm=_perm([0, 2, 1, 3])), Any("out_shape"))


ATTENTION = _attention_pattern()
HEADS = Op("Transpose", Op("Reshape", Any("x3"), Any("shape")), perm=_perm([0, 2, 1, 3]))
# Qwen3-style per-head q/k norm between the head split and the transpose (already fused by rmsnorm-fuse).
HEADS_NORMED = Op("Transpose", Op("RMSNormalization", Op("Reshape", Any("x3"), Any("shape"), name="split"),
                                  Any("scale"), name="norm", axis=lambda a: a in (None, -1, 3)),
                  perm=_perm([0, 2, 1, 3]), name="transpose")
# Partial rotary (Phi-3 style): only the first r channels of each head rotate.
PARTIAL = Op("Concat", Any("rotated"), Op("Slice", Any("x"), Any(), Any(), Any(), extra_inputs=True, name="pass"),
             axis=_axis_last)
ROTARY = Op("Add",
            Op("Mul", Any("x"), Any("cos")),
            Op("Mul", Op("Concat", Op("Neg", Op("Slice", Any("x"), Any(), Any(), Any(), extra_inputs=True, name="hi")),
                         Op("Slice", Any("x"), Any(), Any(), Any(), extra_inputs=True, name="lo"), axis=_axis_last),
               Any("sin")))
REPEAT_KV = Op("Reshape", Op("Expand", Op("Unsqueeze", Any("kv"), extra_inputs=True, name="unsq"), Any()), Any())
KV_CACHE = Op("Concat", Any("past"), Any("cur"), axis=lambda a: a in (-2, 2))


def _attention_shaped(softmax: gs.Node, hops: int = 8) -> bool:
    """Whether the Softmax reads (through elementwise ops) a MatMul of two activations, i.e.
    scores of queries against keys; a router's Softmax over x·W is not attention."""
    frontier = [softmax.inputs[0]]
    for _ in range(hops):
        nxt = []
        for t in frontier:
            node = producer(t)
            if node is None:
                continue
            if node.op == "MatMul":
                if all(const_value(i) is None and not isinstance(i, gs.Constant) for i in node.inputs):
                    return True
                continue
            if node.op in ("Add", "Sub", "Mul", "Div", "Where", "Cast", "Tanh", "Identity"):
                nxt += [i for i in node.inputs if const_value(i) is None]
        frontier = nxt
    return False


class Reject(Exception):
    """A candidate that is attention but cannot be fused; the message says why."""


def _sub(pattern, t: gs.Tensor) -> Match | None:
    m, _ = find(pattern, t)
    return m


def _ints(t: gs.Tensor) -> list[int] | None:
    v = const_value(t)
    return None if v is None else [int(x) for x in v.reshape(-1)]


def _slice_bounds(node: gs.Node, dim: int) -> tuple[int, int]:
    starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
    axes = _ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else [0]
    steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else [1]
    if None in (starts, ends, axes, steps) or len(starts) != 1:
        raise Reject("rotary slice bounds are not constant")
    if axes[0] not in (-1, 3) or steps[0] != 1:
        raise Reject("rotary slices are not along the last axis")
    return min(starts[0], dim), min(ends[0], dim)


def _halves_equal(t: gs.Tensor, op: str) -> gs.Tensor | None:
    """If ``t`` is (casts / scalar multiples of) ``op(Concat(f, f))``, return ``t`` (a [B, S, D] table)."""
    cur = t
    for _ in range(6):
        node = producer(cur)
        if node is None:
            return None
        if node.op == op:
            cat = producer(node.inputs[0])
            if cat is not None and cat.op == "Concat" and len(cat.inputs) == 2 and cat.inputs[0] is cat.inputs[1]:
                return t
            return None
        if node.op == "Cast" or (node.op == "Mul" and any(const_value(i) is not None and
                                                          const_value(i).size == 1 for i in node.inputs)):
            cur = next(i for i in node.inputs if const_value(i) is None) if node.op == "Mul" else node.inputs[0]
            continue
        return None
    return None


class _Layer:
    """Everything resolved about one attention block."""

    def __init__(self):
        self.nodes: list[gs.Node] = []
        self.present_k = self.present_v = self.past_k = self.past_v = None
        self.cos = self.sin = None
        self.rotary_dim: int | None = None
        #: Exporter-emitted RotaryEmbeddings (opset-23 exports), per side: (cos, sin, position ids, attrs).
        self.native: dict[str, tuple] = {}
        self.rule_parts: list[str] = []
        #: q/k whose heads were normalised per head: the normalised [B, S, H, D] tensor to flatten.
        self.normed: dict[str, gs.Tensor] = {}
        #: K and V as [B, Hkv, S, D] heads before any repeat (the cache when there is no past).
        self.heads: dict[str, gs.Tensor] = {}
        #: SDPA's NaN guard follows the softmax; how the mask reaches Attention (see _mask_mode).
        self.guarded = False
        self.mask_mode = "clamp"
        self.flat_output = False


class AttentionFuse(FusionPass):
    name = "attention-fuse"
    summary = "fuse each attention block into standard Attention + RotaryEmbedding (opset 23)"
    after = ("shape-inference", "constant-folding", "identity-elimination", "cast-cleanup", "rmsnorm-fuse")
    before = ("dead-code-elimination",)
    emits = ("Attention", "RotaryEmbedding")
    opset = OPSET
    counts_misses = True

    # -------------------------------------------------------------- scanning
    def scan(self, model: Model, ctx: PassContext, *, rewrite: bool) -> dict[str, int]:
        graph = model.graph
        graph.toposort()
        counts: dict[str, int] = {}
        halves: dict[int, gs.Tensor] = {}
        for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
            root = self._root_of(softmax)
            if root is None:
                if rewrite:
                    self.missed(ctx, softmax, "its output does not reach Reshape(Transpose(MatMul(probs, V)))")
                continue
            m, why = find(ATTENTION, root)
            try:
                if m is None:
                    raise Reject(why)
                layer = self._resolve(m, graph)
            except Reject as e:
                if rewrite:
                    self.missed(ctx, softmax, str(e))
                continue
            rule = "attention" + "".join(f"-{p}" for p in layer.rule_parts)
            counts[rule] = counts.get(rule, 0) + 1
            if not rewrite:
                return counts
            self._rewrite(graph, m, root, layer, rule, halves)
        return counts

    def missed(self, ctx: PassContext, softmax: gs.Node, reason: str) -> None:
        """An attention-shaped Softmax that did not fuse is a miss (a router's is not)."""
        if _attention_shaped(softmax):
            self.miss(ctx, f"Softmax {softmax.name!r}", reason)

    @staticmethod
    def _root_of(softmax: gs.Node) -> gs.Tensor | None:
        """Follow Softmax → (casts) → MatMul → Transpose → Reshape downstream."""
        t = softmax.outputs[0]
        if sorted(u.op for u in t.outputs) == ["IsNaN", "Where"]:  # SDPA's NaN guard (the pattern checks it)
            t = next(u for u in t.outputs if u.op == "Where").outputs[0]
        for _ in range(4):
            users = t.outputs
            if len(users) != 1:
                return None
            if users[0].op in ("Cast", "Identity"):
                t = users[0].outputs[0]
                continue
            break
        for op in ("MatMul", "Reshape", "Transpose", "Reshape"):
            # Shape nodes may read an intermediate (TorchScript builds reshape targets from it);
            # the match's escape check makes sure they feed nothing but the block
            users = [u for u in t.outputs if u.op != "Shape"]
            if op == "Reshape" and len(users) == 1 and users[0].op == "Transpose":
                continue  # the optional no-op Reshape after the MatMul
            if len(users) != 1 or users[0].op != op:
                return None
            t = users[0].outputs[0]
        return t

    def _resolve(self, m: Match, graph: gs.Graph) -> _Layer:
        layer = _Layer()
        layer.nodes = list(m.nodes)
        q3, h, d = self._side(m["q_rot"], layer, "q", graph)
        k3, hkv, dk = self._side(m["k_rep"], layer, "k", graph)
        v3, hv, dv = self._side(m["v_rep"], layer, "v", graph)
        if not (d == dk == dv) or hkv != hv:
            raise Reject(f"inconsistent head sizes q {h}x{d}, k {hkv}x{dk}, v {hv}x{dv}")
        if h % hkv:
            raise Reject(f"{h} query heads are not a multiple of {hkv} KV heads")
        layer.q3, layer.k3, layer.v3, layer.h, layer.hkv, layer.d = q3, k3, v3, h, hkv, d
        layer.scale = _scale(m)
        if "kt_back" in m.bindings:
            _check_transpose_3d(m)
        if "pv_noop" in m.bindings:
            _check_noop_reshape(m)
        layer.guarded = "nan_guard" in m.bindings
        layer.mask = m.get("mask")
        if layer.mask is not None:
            if layer.mask.dtype is not None and np.dtype(layer.mask.dtype).kind != "f":
                raise Reject("the attention mask is not additive (float)")
            shape = layer.mask.shape
            if shape is not None and len(shape) != 4:
                raise Reject(f"mask of rank {len(shape)}, expected 4")
            layer.mask_mode = _mask_mode(layer.mask, layer.guarded)
        out = m.bindings.get("out_shape")
        root_shape = None
        for n in m.nodes:
            if n.op == "Reshape" and n.inputs[1] is out:
                root_shape = n.outputs[0].shape
        if root_shape is not None and isinstance(root_shape[-1], int) and root_shape[-1] != h * d:
            raise Reject(f"output reshaped to {root_shape[-1]} features, expected {h}·{d}")
        if root_shape is None:
            raise Reject("the rank of the attention output is unknown (run shape-inference first)")
        if len(root_shape) not in (2, 3):
            raise Reject(f"attention output reshaped to rank {len(root_shape)}")
        layer.flat_output = len(root_shape) == 2  # GPT-2 flattens batch and sequence for its Conv1D
        if (layer.cos is None) != (layer.sin is None):
            raise Reject("rotary on only one of cos/sin")
        if layer.native and set(layer.native) != {"q", "k"}:
            raise Reject("the exporter's RotaryEmbedding is applied to only one of Q and K")
        if "rotary-q" in layer.rule_parts and "rotary-k" not in layer.rule_parts or \
                "rotary-k" in layer.rule_parts and "rotary-q" not in layer.rule_parts:
            raise Reject("rotary embedding applied to only one of Q and K")
        layer.rule_parts = [p for p in layer.rule_parts if p not in ("rotary-q", "rotary-k")]
        if layer.cos is not None:
            layer.rule_parts.insert(0, "partial-rotary" if layer.rotary_dim else "rotary")
        if layer.past_k is None:
            self._present_without_past(layer, graph)
        keep = tuple(t for t in (layer.present_k, layer.present_v) if t is not None)
        root = next(n for n in m.nodes if n.op == "Reshape" and n.inputs[1] is out).outputs[0]
        reason = escapes(_as_match(layer.nodes), root, graph, keep=keep)
        if reason:
            raise Reject(reason)
        return layer

    def _side(self, t: gs.Tensor, layer: _Layer, which: str, graph: gs.Graph) -> tuple[gs.Tensor, int, int]:
        """Peel repeat_kv, the KV cache and rotary off one of Q/K/V; return (x3, heads, head_dim)."""
        if which in ("k", "v"):
            rep = _sub(REPEAT_KV, t)
            if rep is not None:
                unsq = rep["unsq"]
                axes = unsq.attrs.get("axes")
                if axes is None and len(unsq.inputs) > 1:
                    axes = _ints(unsq.inputs[1])
                if list(axes or []) != [2]:
                    raise Reject("KV heads are repeated along an unexpected axis")
                layer.nodes += rep.nodes
                t = rep["kv"]
                if "gqa" not in layer.rule_parts:
                    layer.rule_parts.append("gqa")
            cache = _sub(KV_CACHE, t)
            if cache is not None:
                past = cache["past"]
                if not any(past is i for i in graph.inputs):
                    raise Reject("the KV cache is not concatenated onto a graph input")
                if which == "k":
                    layer.past_k, layer.present_k = past, t
                else:
                    layer.past_v, layer.present_v = past, t
                layer.nodes += cache.nodes
                t = cache["cur"]
                if "kvcache" not in layer.rule_parts:
                    layer.rule_parts.append("kvcache")
            layer.heads[which] = t
        if which in ("q", "k"):
            t = self._peel_rotary(t, layer, which)
        heads = _sub(HEADS, t)
        if heads is None:
            heads = _sub(HEADS_NORMED, t)
            if heads is None:
                raise Reject(f"{which.upper()} is not a [B,S,H·D] projection split into heads")
            layer.normed[which] = heads["norm"].outputs[0]  # kept; flattened back to [B, S, H·D]
            layer.nodes.append(heads["transpose"])
            if "qk-norm" not in layer.rule_parts:
                layer.rule_parts.append("qk-norm")
        else:
            layer.nodes += heads.nodes
        x3 = heads["x3"]
        shape4 = list(t.shape) if t.shape is not None and len(t.shape) == 4 else [None] * 4
        target = [e if isinstance(e, int) else None for e in shape_entries(heads["shape"]) or [None] * 4]
        if len(target) != 4:
            raise Reject(f"{which.upper()} is reshaped to rank {len(target)}, expected 4")

        def known(*candidates):
            return next((int(c) for c in candidates if isinstance(c, (int, np.integer)) and c > 0), None)

        d = known(shape4[3], target[3])
        features = x3.shape[-1] if x3.shape is not None and len(x3.shape) == 3 else None
        h = known(shape4[1], target[2], features // d if isinstance(features, int) and d else None)
        if h is None or d is None:
            raise Reject(f"head count and size of {which.upper()} are unknown (run shape-inference first)")
        if isinstance(features, int) and features != h * d:
            raise Reject(f"{which.upper()} has {features} features, not {h} heads of {d}")
        return x3, h, d

    def _peel_rotary(self, t: gs.Tensor, layer: _Layer, which: str) -> gs.Tensor:
        """The tensor under a full or partial rotary embedding of ``t`` (or ``t`` itself)."""
        node = producer(t)
        if node is not None and node.op == "RotaryEmbedding" and (node.domain or "") in ("", "ai.onnx"):
            return self._native_rotary(node, layer, which)
        rot = _sub(ROTARY, t)
        if rot is not None:
            self._check_rotary(rot, layer, which)
            layer.nodes += rot.nodes
            return rot["x"]
        part = _sub(PARTIAL, t)
        if part is None:
            return t
        rot = _sub(ROTARY, part["rotated"])
        x = part["x"]
        if rot is None:
            return t
        lead = producer(rot["x"])
        d = x.shape[-1] if x.shape is not None else None
        if lead is None or lead.op != "Slice" or lead.inputs[0] is not x or not isinstance(d, int):
            return t
        r0, r = _slice_bounds(lead, d)
        p0, p1 = _slice_bounds(part["pass"], d)
        if r0 != 0 or (p0, p1) != (r, d) or r % 2 or not 0 < r < d:
            raise Reject(f"partial rotary slices [{r0}:{r}] + [{p0}:{p1}] do not split the head of {d}")
        self._check_rotary(rot, layer, which, rotary_dim=r)
        layer.nodes += part.nodes + rot.nodes + [lead]
        return x

    @staticmethod
    def _native_rotary(node: gs.Node, layer: _Layer, which: str) -> gs.Tensor:
        """A standard RotaryEmbedding the exporter already emitted on the 4-D heads: the fused
        op applies the same one (same caches, position ids and attributes) to the 3-D input."""
        x = node.inputs[0]
        if x.shape is None or len(x.shape) != 4:
            raise Reject("the exporter's RotaryEmbedding is not on [B, H, S, D] heads")
        attrs = {k: node.attrs[k] for k in ("interleaved", "rotary_embedding_dim") if node.attrs.get(k)}
        pos = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
        layer.native[which] = (node.inputs[1], node.inputs[2], pos, attrs)
        layer.cos, layer.sin = node.inputs[1], node.inputs[2]  # marks "rotary present" for the checks
        layer.rotary_dim = int(attrs.get("rotary_embedding_dim", 0))
        layer.nodes.append(node)
        layer.rule_parts.append(f"rotary-{which}")
        return x

    def _check_rotary(self, rot: Match, layer: _Layer, which: str, rotary_dim: int | None = None) -> None:
        x = rot["x"]
        d = x.shape[-1] if x.shape is not None else None
        if not isinstance(d, int):
            raise Reject("rotary over a head size that is unknown")
        if layer.rotary_dim is not None and layer.rotary_dim != (rotary_dim or 0):
            raise Reject("Q and K rotate different numbers of channels")
        layer.rotary_dim = rotary_dim or 0
        lo, hi = _slice_bounds(rot["lo"], d), _slice_bounds(rot["hi"], d)
        if lo != (0, d // 2) or hi != (d // 2, d):
            raise Reject(f"rotary halves {lo}/{hi} are not rotate-half over the full head ({d}); partial or "
                         "interleaved rotary is not fused")
        cos, sin = rot["cos"], rot["sin"]
        for table, op in ((cos, "Cos"), (sin, "Sin")):
            _table3(table, op)  # rejects tables whose halves cannot be shown equal
        if layer.cos is None:
            layer.cos, layer.sin = cos, sin
        elif layer.cos is not cos or layer.sin is not sin:
            raise Reject("Q and K use different cos/sin tables")
        layer.rule_parts.append(f"rotary-{which}")
    # --------------------------------------------------------------- rewrite
    def _rewrite(self, graph: gs.Graph, m: Match, root: gs.Tensor, layer: _Layer, rule: str,
                 halves: dict) -> None:
        q, k, v = layer.q3, layer.k3, layer.v3
        if "q" in layer.normed:
            q = self._flatten(graph, layer.normed["q"], layer.h * layer.d)
        if "k" in layer.normed:
            k = self._flatten(graph, layer.normed["k"], layer.hkv * layer.d)
        if layer.native:  # reuse the exporter's caches as they are
            if set(layer.native) != {"q", "k"}:
                raise AssertionError("checked in _resolve")
            for side in ("q", "k"):
                cos, sin, pos, attrs = layer.native[side]
                heads = layer.h if side == "q" else layer.hkv
                x = self._rotary(graph, q if side == "q" else k, cos, sin, heads, attrs=attrs,
                                 extra=[pos] if pos is not None else [])
                q, k = (x, k) if side == "q" else (q, x)
        elif layer.cos is not None:
            rdim = layer.rotary_dim or layer.d
            cos_half = self._half_table(graph, layer.cos, "Cos", rdim, halves)
            sin_half = self._half_table(graph, layer.sin, "Sin", rdim, halves)
            q = self._rotary(graph, q, cos_half, sin_half, layer.h, layer.rotary_dim)
            k = self._rotary(graph, k, cos_half, sin_half, layer.hkv, layer.rotary_dim)
        empty = gs.Variable.empty
        mask = empty()
        if layer.mask is not None:
            mask = layer.mask if layer.mask_mode == "pass" else self._clamped(graph, layer.mask, halves)
        inputs = [q, k, v, mask]
        outputs = [root]
        if layer.past_k is not None and layer.past_v is not None:
            inputs += [layer.past_k, layer.past_v]
        if layer.present_k is not None or layer.present_v is not None:
            outputs += [t if t is not None else gs.Variable(unique_name(graph, f"{root.name}_present_{w}"), v.dtype)
                        for t, w in ((layer.present_k, "key"), (layer.present_v, "value"))]
        while inputs and not inputs[-1].name:
            inputs.pop()
        node = gs.Node("Attention", unique_name(graph, f"Attention_{root.name}"),
                       attrs={"q_num_heads": layer.h, "kv_num_heads": layer.hkv, "scale": layer.scale},
                       inputs=inputs)
        fuse(graph, outputs, node, rule, replaced=layer.nodes)
        y = root
        if layer.flat_output:  # Attention gives [B, S, H·D]; the export wanted [B·S, H·D]
            bsd = gs.Variable(unique_name(graph, f"{root.name}_bsd"), root.dtype, None)
            flat = gs.Constant(unique_name(graph, f"{root.name}_flat_shape"),
                               np.array([-1, layer.h * layer.d], np.int64))
            graph.nodes.append(gs.Node("Reshape", unique_name(graph, f"Reshape_{root.name}_flat"),
                                       inputs=[bsd, flat], outputs=[y]))
            y = bsd
        if layer.mask_mode == "clamp+zero-dead-rows":
            raw = gs.Variable(unique_name(graph, f"{root.name}_attention"), root.dtype, None)
            zero = gs.Constant(unique_name(graph, f"{root.name}_zero"), np.zeros((), np.dtype(root.dtype or np.float32)))
            graph.nodes.append(gs.Node("Where", unique_name(graph, f"Where_{root.name}_dead_rows"),
                                       inputs=[self._dead_rows(graph, layer.mask, halves), zero, raw], outputs=[y]))
            y = raw
        node.outputs[0] = y

    @staticmethod
    def _dead_rows(graph: gs.Graph, mask: gs.Tensor, cache: dict) -> gs.Tensor:
        """[B, S, 1]: whether every key of a query row is masked with -inf (once per mask)."""
        key = ("dead", id(mask))
        if key not in cache:
            dtype = np.dtype(mask.dtype) if mask.dtype is not None else np.dtype(np.float32)
            c = {name: gs.Constant(unique_name(graph, f"{mask.name}_{name}"), v) for name, v in
                 (("last", np.array([-1], np.int64)), ("head", np.array([1], np.int64)),
                  ("minus_inf", np.array(-np.inf, dtype)))}
            row_max, dead4, dead = (gs.Variable(unique_name(graph, f"{mask.name}_{n}")) for n in
                                    ("row_max", "dead4", "dead_rows"))
            graph.nodes += [
                gs.Node("ReduceMax", unique_name(graph, f"ReduceMax_{mask.name}"), attrs={"keepdims": 1},
                        inputs=[mask, c["last"]], outputs=[row_max]),
                gs.Node("Equal", unique_name(graph, f"Equal_{mask.name}"), inputs=[row_max, c["minus_inf"]],
                        outputs=[dead4]),
                gs.Node("Squeeze", unique_name(graph, f"Squeeze_{mask.name}"), inputs=[dead4, c["head"]],
                        outputs=[dead])]
            cache[key] = dead
        return cache[key]

    @staticmethod
    def _present_without_past(layer: _Layer, graph: gs.Graph) -> None:
        """With no past, Attention's present outputs are K and V themselves: a prefill graph that
        outputs (or otherwise reads) its new K/V heads gets them from the fused op."""
        inside = {id(n) for n in layer.nodes}
        outputs = {id(t) for t in graph.outputs}
        for which, t in layer.heads.items():
            if id(t) in outputs or any(id(c) not in inside and c.op != "Shape" for c in t.outputs):
                if which == "k":
                    layer.present_k = t
                else:
                    layer.present_v = t
        if layer.present_k is not None or layer.present_v is not None:
            layer.rule_parts.append("present")

    @staticmethod
    def _clamped(graph: gs.Graph, mask: gs.Tensor, cache: dict[int, gs.Tensor]) -> gs.Tensor:
        """``Max(mask, -1e30)``, once per mask tensor.

        Exporters fill masked positions with the dtype's lowest value. For a query row with
        every key masked (the padding of a left-padded batch) the unfused graph then gives
        uniform attention (scores vanish next to -3.4e38), and so does the Attention spec,
        but onnxruntime's Attention kernel reads the lowest float as -inf and returns zeros.
        -1e30 is just as absolute a mask (exp underflows to 0 and scores still vanish next
        to it) without that ambiguity, so the fused graph computes what the export did in
        every runtime."""
        key = ("clamp", id(mask))
        if key in cache:
            return cache[key]
        dtype = np.dtype(mask.dtype) if mask.dtype is not None else np.dtype(np.float32)
        floor = gs.Constant(unique_name(graph, f"{mask.name}_floor"), np.array(-1e30 if dtype.itemsize >= 4
                                                                                  else -6e4, dtype=dtype))
        out = gs.Variable(unique_name(graph, f"{mask.name}_clamped"), mask.dtype, mask.shape)
        graph.nodes.append(gs.Node("Max", unique_name(graph, f"Max_{mask.name}"), inputs=[mask, floor], outputs=[out]))
        cache[key] = out
        return out

    @staticmethod
    def _flatten(graph: gs.Graph, x4: gs.Tensor, features: int) -> gs.Tensor:
        """[B, S, H, D] → [B, S, H·D] (after a per-head norm)."""
        shape = gs.Constant(unique_name(graph, f"{x4.name}_flat_shape"), np.array([0, 0, features], np.int64))
        dims = list(x4.shape[:2]) + [features] if x4.shape is not None else None
        out = gs.Variable(unique_name(graph, f"{x4.name}_flat"), x4.dtype, dims)
        graph.nodes.append(gs.Node("Reshape", unique_name(graph, f"Reshape_{x4.name}_flat"), inputs=[x4, shape],
                                   outputs=[out]))
        return out

    @staticmethod
    def _rotary(graph: gs.Graph, x3: gs.Tensor, cos: gs.Tensor, sin: gs.Tensor, heads: int,
                rotary_dim: int | None = None, attrs: dict | None = None, extra: list = ()) -> gs.Tensor:
        out = gs.Variable(unique_name(graph, f"{x3.name}_rotary"), x3.dtype, x3.shape)
        attrs = {**(attrs or {}), "num_heads": heads}
        if rotary_dim:
            attrs["rotary_embedding_dim"] = rotary_dim
        node = gs.Node("RotaryEmbedding", unique_name(graph, f"RotaryEmbedding_{x3.name}"),
                       attrs=attrs, inputs=[x3, cos, sin, *extra], outputs=[out])
        node.meta = {"graphopt.rule": "rotary-rotate-half"}
        graph.nodes.append(node)
        return out

    @staticmethod
    def _half_table(graph: gs.Graph, table4: gs.Tensor, op: str, d: int, cache: dict[int, gs.Tensor]) -> gs.Tensor:
        """[B, S, D/2] from the exporter's [B, 1, S, D] cos/sin (Unsqueeze of a [B, S, D] table)."""
        key = id(table4)
        if key in cache:
            return cache[key]
        table3 = _table3(table4, op)
        consts = [gs.Constant(unique_name(graph, f"{table3.name}_half_{n}"), np.array(v, np.int64))
                  for n, v in (("start", [0]), ("end", [d // 2]), ("axis", [-1]))]
        shape = list(table3.shape) if table3.shape is not None else None
        if shape:
            shape[-1] = d // 2
        half = gs.Variable(unique_name(graph, f"{table3.name}_half"), table3.dtype, shape)
        graph.nodes.append(gs.Node("Slice", unique_name(graph, f"Slice_{table3.name}_half"),
                                   inputs=[table3, *consts], outputs=[half]))
        cache[key] = half
        return half


def _table3(table4: gs.Tensor, op: str) -> gs.Tensor:
    """The [B, S, D] cos/sin table under the exporter's Unsqueeze(·, 1), checked to be
    ``op(Concat(f, f))`` (equal halves) so its first half is the standard half-size cache."""
    unsq = producer(table4)
    if unsq is None or unsq.op != "Unsqueeze":
        raise Reject(f"the {op.lower()} table is not Unsqueeze([B, S, D], 1)")
    axes = unsq.attrs.get("axes")
    if axes is None and len(unsq.inputs) > 1:
        axes = _ints(unsq.inputs[1])
    if list(axes or []) != [1]:
        raise Reject(f"the {op.lower()} table is unsqueezed on axes {axes}, expected [1]")
    table3 = unsq.inputs[0]
    if _halves_equal(table3, op) is None:
        raise Reject(f"cannot prove the two halves of the {op.lower()} table are equal")
    return table3


def _as_match(nodes: list[gs.Node]) -> Match:
    seen, unique = set(), []
    for n in nodes:
        if id(n) not in seen:
            seen.add(id(n))
            unique.append(n)
    return Match({}, unique)


def _mask_mode(mask: gs.Tensor, guarded: bool) -> str:
    """How the exporter's additive mask reaches Attention so the fused op computes what the export
    did on a query row whose every key is masked:

    * ``clamp``: without SDPA's NaN guard, or when no element can be -inf, such a row has uniform
      weights in the export (the lowest float is finite); ``Max(mask, -1e30)`` keeps it so in every
      runtime (see ``_clamped``).
    * ``pass``: with the guard and a mask built as ``Where(c, a, b)`` from -inf and small constants,
      the export gives zeros there and so does Attention for a row of -inf.
    * ``clamp+zero-dead-rows``: with the guard and a mask of unknown values: clamp, then zero the
      rows whose keys are all -inf (a ``Where`` after the op; needs a mask with one head)."""
    if not guarded or never_minus_inf(mask):
        return "clamp"
    node = producer(mask)
    if node is not None and node.op == "Where":
        values = [const_value(i) for i in node.inputs[1:]]
        if all(v is not None and v.size == 1 and (np.isneginf(v).all() or np.abs(v).max() < 1e30) for v in values):
            return "pass"
    if mask.shape is None or len(mask.shape) != 4 or mask.shape[1] != 1:
        raise Reject("a NaN-guarded softmax over a mask that may hold -inf needs a mask with one head axis")
    return "clamp+zero-dead-rows"


def _scale(m: Match) -> float:
    """The product of every scalar factor on the scores: on QKᵀ (Mul, or Div by √d) and on Q and K."""
    scale = 1.0
    if "scale.value" in m.bindings:
        scale = float(m["scale.value"].reshape(-1)[0])
    elif "divisor.value" in m.bindings:
        scale = 1.0 / float(m["divisor.value"].reshape(-1)[0])
    for key in ("q_scale", "k_scale", "k_scale_pre"):
        if key + ".value" in m.bindings:
            scale *= float(m[key + ".value"].reshape(-1)[0])
    return scale


def _check_transpose_3d(m: Match) -> None:
    """``Reshape(Transpose(Reshape(k, [-1, T, D]), [0, 2, 1]), [B, H, D, T])`` must be Kᵀ exactly:
    both reshape targets are read symbolically off ``Shape(k)``."""
    back = m["kt_back"]
    flat_node = producer(producer(back.inputs[0]).inputs[0])
    src = flat_node.inputs[0]
    if src.shape is None or len(src.shape) != 4:
        raise Reject("K is transposed through 3-D reshapes but its rank is not 4")
    k = (src, m["k_rep"])  # the same shape (src may be k_rep times a scalar)
    flat, back_dims = shape_entries(m["kt_flat_shape"]), shape_entries(m["kt_back_shape"])
    if flat is None or len(flat) != 3 or flat[0] != -1 or not (_is_dim(flat[1], 2, *k) and _is_dim(flat[2], 3, *k)):
        raise Reject("K is flattened to 3-D with a shape that is not [-1, T, D]")
    if back_dims is None or len(back_dims) != 4 or not all(_is_dim(e, i, *k) for e, i in zip(back_dims, (0, 1, 3, 2))):
        raise Reject("K is reshaped back to a shape that is not [B, H, D, T]")


def _is_dim(entry, i: int, *tensors: gs.Tensor) -> bool:
    """Whether a shape entry is provably dimension ``i`` of (one of) ``tensors``: a :class:`Dim`
    the same as it, or an int equal to its static size."""
    if isinstance(entry, Dim):
        return any(entry.same_as(t, i) for t in tensors)
    return isinstance(entry, int) and any(
        t.shape is not None and len(t.shape) > i and isinstance(t.shape[i], int) and entry == t.shape[i]
        for t in tensors)


class Dim(NamedTuple):
    """Dimension ``i`` of tensor ``t``, as a shape computation reads it (``Shape(t)[i]``)."""

    t: gs.Tensor
    i: int

    def same_as(self, t: gs.Tensor, i: int) -> bool:
        """Provably dimension ``i`` of ``t``: the same tensor's, or one that shape inference gave
        the same symbolic name (the model's declared dims, e.g. ``batch``, or an inferred one)."""
        if self.t is t and self.i == i:
            return True
        mine = self.t.shape[self.i] if self.t.shape is not None and len(self.t.shape) > self.i else None
        theirs = t.shape[i] if t.shape is not None and len(t.shape) > i else None
        return isinstance(mine, str) and mine == theirs


def shape_entries(t: gs.Tensor, depth: int = 8) -> list | None:
    """A 1-D int64 shape tensor's elements, read through Shape/Slice/Gather/Concat/Unsqueeze/
    Squeeze/Cast/Reshape (TorchScript and dynamo build reshape targets that way): each an int, a
    :class:`Dim` of some tensor, or None where unknown. None when not even the length is known."""
    v = const_value(t)
    if v is not None:
        return [int(x) for x in v.reshape(-1)] if v.dtype.kind in "iu" else None
    node = producer(t)
    entries = None if node is None or depth == 0 else _entries_of(node, depth)
    if entries is None and t.shape is not None and len(t.shape) == 1 and isinstance(t.shape[0], int):
        return [None] * t.shape[0]
    return entries


def _entries_of(node: gs.Node, depth: int) -> list | None:
    if node.op == "Shape":
        x = node.inputs[0]
        if x.shape is None:
            return None
        rank = len(x.shape)
        start, end = node.attrs.get("start", 0), node.attrs.get("end", rank)
        return [Dim(x, i) for i in range(rank)][slice(start, end)]
    if node.op in ("Unsqueeze", "Squeeze", "Cast", "Reshape", "Identity"):
        return shape_entries(node.inputs[0], depth - 1)
    if node.op == "Concat":
        parts = [shape_entries(i, depth - 1) for i in node.inputs]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if node.op == "Slice":
        base = shape_entries(node.inputs[0], depth - 1)
        bounds = [_ints(i) if i.name else None for i in node.inputs[1:]]
        if base is None or any(b is None or len(b) != 1 for b in bounds):
            return None
        start, end, axis, step = (bounds + [[0], [1]][len(bounds) - 2:])[:4]
        return base[slice(start[0], end[0], step[0])] if axis[0] in (0, -1) else None
    if node.op == "Gather" and node.attrs.get("axis", 0) == 0:
        base, idx = shape_entries(node.inputs[0], depth - 1), _ints(node.inputs[1])
        return None if base is None or idx is None else [base[i] for i in idx]
    return None


def _check_noop_reshape(m: Match) -> None:
    """The Reshape after probs·V must keep its [B, H, S, D] shape: every target element is the
    same dimension of the product (or of Q, whose batch and sequence it has) or a matching
    constant, with at most one -1."""
    out = m["pv"].outputs[0]
    q_side = (m["q_rot"], m["qk"].inputs[0])  # the output has Q's batch and sequence
    entries = shape_entries(m["pv_shape"])
    if out.shape is None or len(out.shape) != 4 or entries is None or len(entries) != 4:
        raise Reject("the attention output is reshaped to a shape that is not provably its own")
    if entries.count(-1) > 1:
        raise Reject("the attention output is reshaped with more than one -1")
    for i, e in enumerate(entries):
        if not (e == -1 or _is_dim(e, i, out) or (i in (0, 2) and _is_dim(e, i, *q_side))):
            raise Reject("the attention output is reshaped to a shape that is not provably its own")
