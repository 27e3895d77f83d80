"""Block-wise weight-only quantization to standard QDQ (``DequantizeLinear`` with ``block_size``).

Which weights (constants, at least ``quant_min_elements`` elements, 1024 by default):

1. ``MatMul(x, W)`` — W [K, N], blocks along K (axis 0, the reduction axis);
2. ``Gemm(x, W)`` — blocks along W's reduction axis (1 with ``transB``);
3. the LM head — the MatMul whose result is a graph output (through casts/bias) —
   with its own bits and block size (``quant_lm_bits``, default 8; ``quant_lm_block``);
4. the embedding table ``Gather(E, ids)`` — E [V, H], blocks along H (axis 1), with
   ``quant_embed_bits`` (default: unquantized) / ``quant_embed_block``;
5. a tied matrix (``Gather(E)`` and ``MatMul(x, Transpose(E))``, as the dynamo exporter
   writes it or tie-embedding-dedupe leaves it) is quantized **once**, along H, which is
   the LM head's reduction axis too, with the LM-head setting: both uses read the same
   dequantized matrix, so the model cannot disagree with itself.

Options (``ctx.options``; the CLI's ``--quant-*`` flags): ``quant_bits`` 4 or 8 (the pass
does nothing without it), ``quant_block`` (power of two ≥ 16, default 32),
``quant_symmetric`` (default True; False adds zero points and uses UINT4/UINT8),
``quant_scale_dtype`` (float32 default, or float16), ``quant_method``: ``rtn``
(round to nearest), ``search`` (per-block clipping search with a least-squares scale, in
the spirit of llama.cpp's error-minimising scales) or ``activation`` (``search`` with the
error weighted per input channel by mean squared activations collected by running the
model on the CPU backend with generated inputs), ``quant_include`` / ``quant_exclude``
(fnmatch patterns on weight names), ``quant_min_elements``.

A reduction axis that is not a multiple of the block size ends in a partial block: the
scale has ``ceil(K / block)`` rows, as the DequantizeLinear spec allows; onnxruntime and
onnx's reference implementation both accept it.

Per weight the pass records the relative RMS error and SQNR of the dequantized weight
(``PassResult.details``), which the CLI prints and writes to the report.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt._errors import GraphoptError
from graphopt._ir import Model, array_view
from graphopt._opset import ensure_opset
from graphopt._pipeline import Pass, PassContext, PassResult
from graphopt.pattern import producer
from graphopt.rewrite import Namer, remove_dead

logger = logging.getLogger(__name__)

OPSET = 21  # blocked DequantizeLinear with INT4/UINT4
# Candidate clipping factors for the search (1.0 = the block's extreme value); each candidate's
# scale is then refined by least squares, so the grid only has to land near the optimum.
_SEARCH = np.linspace(1.1, 0.6, 21)


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    block: int
    symmetric: bool = True
    scale_dtype: str = "float32"
    method: str = "rtn"

    def check(self, what: str) -> None:
        if self.bits not in (4, 8):
            raise GraphoptError(f"{what}: {self.bits}-bit weights are not supported (use 4 or 8)")
        if self.block < 16 or self.block & (self.block - 1):
            raise GraphoptError(f"{what}: block size {self.block} is not a power of two >= 16")
        if self.method not in ("rtn", "search", "activation"):
            raise GraphoptError(f"{what}: unknown method {self.method!r} (rtn, search, activation)")
        if self.scale_dtype not in ("float32", "float16"):
            raise GraphoptError(f"{what}: scale dtype {self.scale_dtype!r} (float32 or float16)")


# ------------------------------------------------------------------ the math
def quantize_blocks(w: np.ndarray, spec: QuantSpec, importance: np.ndarray | None = None,
                    stats: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize ``w`` [K, N] in blocks of ``spec.block`` rows (along axis 0).

    Returns integer codes [K, N] (int8 holding the 4-bit range when bits=4; uint8 when
    asymmetric), scales [ceil(K/B), N] and zero points (same shape) or None.
    ``importance`` [K] weights the squared error per row for the search. If ``stats`` is
    given it receives the relative RMS error and SQNR of the dequantized weight.

    Symmetric blocks use the whole signed range: the block's largest-magnitude value maps
    to the most negative code (-8 for 4 bits), so the scale may be negative — one more
    level than ``amax / 7`` (the layout of llama.cpp's Q4_0 and onnxruntime's quantizer).
    """
    k, n = w.shape
    b = spec.block
    nb = math.ceil(k / b)
    pad = nb * b - k
    wf = np.asarray(w, dtype=np.float32)
    if pad:
        wf = np.concatenate([wf, np.zeros((pad, n), np.float32)])
    blocks = wf.reshape(nb, b, n)
    if spec.method == "rtn" and importance is None:  # one pass, no search
        q, sc, z = _quantize_with(blocks, spec, 1.0)
        if stats is not None:
            _stats(blocks, q, sc, z, stats)
        return _pack(q, sc, z, spec, k, n)
    imp = np.ones((nb, b, 1), np.float32)
    if importance is not None:
        imp = np.concatenate([importance.astype(np.float32), np.zeros(pad, np.float32)]).reshape(nb, b, 1)
        imp = imp / max(float(imp.mean()), 1e-12) + 1e-3
    if pad:
        imp[-1, b - pad:, :] = 0.0  # padding rows never count
    best_err = best_q = best_s = best_z = None
    candidates = [(f, False) for f in _SEARCH] + ([(f, True) for f in _SEARCH] if spec.symmetric else [])
    for f, flip in candidates:
        q, sc, z = _quantize_with(blocks, spec, f, flip)
        if spec.symmetric:  # least-squares scale for these codes
            num = (imp * blocks * q).sum(axis=1, keepdims=True)
            den = (imp * q * q).sum(axis=1, keepdims=True)
            sc = np.where(den > 0, num / np.maximum(den, 1e-30), sc)
        deq = (q - (z if z is not None else 0)) * sc
        err = (imp * (blocks - deq) ** 2).sum(axis=1, keepdims=True)
        if best_err is None:
            best_err, best_q, best_s, best_z = err, q, sc, z
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_q = np.where(better, q, best_q)
        best_s = np.where(better, sc, best_s)
        if z is not None:
            best_z = np.where(better, z, best_z)
    if stats is not None:
        _stats(blocks, best_q, best_s, best_z, stats)
    return _pack(best_q, best_s, best_z, spec, k, n)


def _pack(q, sc, z, spec: QuantSpec, k: int, n: int):
    nb = sc.shape[0]
    codes = q.reshape(-1, n)[:k].astype(np.int8 if spec.symmetric else np.uint8)
    zeros = z.reshape(nb, n).astype(np.uint8) if z is not None else None
    return codes, sc.reshape(nb, n).astype(spec.scale_dtype), zeros


_STATS_ELEMENTS = 2**22


def _stats(blocks, q, sc, z, stats: dict) -> None:
    """Relative RMS error and SQNR; on big weights from an evenly strided sample of columns
    (a few million elements pin the ratio down to well under 1%)."""
    step = max(1, blocks.size // _STATS_ELEMENTS)
    if step > 1:
        blocks, q, sc = blocks[..., ::step], q[..., ::step], sc[..., ::step]
        z = z[..., ::step] if z is not None else None
    diff = (q - z) * sc if z is not None else q * sc
    np.subtract(blocks, diff, out=diff)
    flat, ref_flat = diff.reshape(-1), blocks.reshape(-1)
    err, ref = float(np.dot(flat, flat)), float(np.dot(ref_flat, ref_flat))
    rel = math.sqrt(err / ref) if ref > 0 else 0.0
    stats.update(rel_rms_error=rel, sqnr_db=(20 * math.log10(1 / rel)) if rel > 0 else float("inf"))


def _quantize_with(blocks: np.ndarray, spec: QuantSpec, f: float, flip: bool = False):
    if spec.symmetric:
        levels = 2 ** (spec.bits - 1)  # codes -levels .. levels-1
        hi, lo = blocks.max(axis=1, keepdims=True), blocks.min(axis=1, keepdims=True)
        extreme = np.where(hi >= -lo, hi, lo) * f  # the signed value of largest magnitude
        # the extreme on the -levels code (one more level), or with ``flip`` on +(levels - 1)
        divisor = (levels - 1) if flip else -levels
        sc = np.where(extreme != 0, extreme / divisor, 1.0).astype(np.float32)
        q = blocks * (1.0 / sc)
        np.rint(q, out=q)
        np.clip(q, -levels, levels - 1, out=q)
        return q, sc, None
    qmax = 2 ** spec.bits - 1
    lo = np.minimum(blocks.min(axis=1, keepdims=True), 0) * f
    hi = np.maximum(blocks.max(axis=1, keepdims=True), 0) * f
    sc = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
    z = np.clip(np.rint(-lo / sc), 0, qmax)
    q = np.clip(np.rint(blocks / sc) + z, 0, qmax)
    return q, sc, z


def dequantize_blocks(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, block: int) -> np.ndarray:
    k = codes.shape[0]
    s = np.repeat(scales.astype(np.float32), block, axis=0)[:k]
    z = np.repeat(zeros.astype(np.float32), block, axis=0)[:k] if zeros is not None else 0.0
    return (codes.astype(np.float32) - z) * s


def error_stats(w: np.ndarray, deq: np.ndarray) -> dict[str, float]:
    diff = float(np.sqrt(np.mean((w.astype(np.float64) - deq) ** 2)))
    ref = float(np.sqrt(np.mean(w.astype(np.float64) ** 2)))
    rel = diff / ref if ref > 0 else 0.0
    return {"rel_rms_error": rel, "sqnr_db": (20 * math.log10(1 / rel)) if rel > 0 else float("inf")}


def _tensor(name: str, values: np.ndarray, bits: int, signed: bool) -> gs.Constant:
    """An initializer holding packed 4-bit (or 8-bit) codes, exported without re-encoding."""
    if bits == 4:
        values = values.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4)
    proto = onnx.numpy_helper.from_array(np.ascontiguousarray(values), name)
    return gs.Constant(name, LazyValues(proto))


# ------------------------------------------------------------------ the pass
@dataclass
class _Use:
    weight: gs.Constant
    axis: int  # the reduction axis of the weight as stored
    role: str  # "linear", "lm_head", "embedding", "tied"
    activation: gs.Tensor | None = None  # the MatMul input, for activation-aware scales


def _reaches_output(t: gs.Tensor, outputs: set[int], hops: int = 3) -> bool:
    if id(t) in outputs:
        return True
    if hops == 0:
        return False
    return any(c.op in ("Add", "Cast", "Identity", "Reshape") and _reaches_output(c.outputs[0], outputs, hops - 1)
               for c in t.outputs if c.outputs)


class Quantize(Pass):
    name = "quantize"
    summary = "block-wise weight-only quantization (4/8 bit) to standard DequantizeLinear"
    after = ("constant-folding", "initializer-dedupe", "tie-embedding-dedupe", "rmsnorm-fuse", "attention-fuse")
    before = ("dead-code-elimination",)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        bits = ctx.option("quant_bits")
        if bits is None:
            return PassResult(False, {"skipped_not_requested": 1})
        block = int(ctx.option("quant_block", 32))
        common = dict(symmetric=bool(ctx.option("quant_symmetric", True)),
                      scale_dtype=str(ctx.option("quant_scale_dtype", "float32")),
                      method=str(ctx.option("quant_method", "rtn")))
        specs = {"linear": QuantSpec(int(bits), block, **common),
                 "lm_head": QuantSpec(int(ctx.option("quant_lm_bits", 8)), int(ctx.option("quant_lm_block", block)),
                                      **common)}
        embed_bits = ctx.option("quant_embed_bits")
        if embed_bits is not None:
            specs["embedding"] = QuantSpec(int(embed_bits), int(ctx.option("quant_embed_block", block)), **common)
        specs["tied"] = specs["lm_head"]
        for role, spec in specs.items():
            spec.check(f"quantize ({role})")
        uses = self._find(model, ctx)
        if not uses:
            if ctx.option("quant_include"):
                raise GraphoptError(f"quantize: no weight matches --quant-include {ctx.option('quant_include')!r}")
            return PassResult(False, {"quantized": 0})
        reason = ensure_opset(model, OPSET)
        if reason:
            raise GraphoptError(f"quantize needs opset {OPSET} for blocked DequantizeLinear: {reason}")
        uses = self._find(model, ctx)  # an upgrade re-creates the graph
        importance = self._importance(model, uses) if common["method"] == "activation" else {}
        details, counts, saved = [], {"quantized": 0}, 0
        names = Namer(model.graph)
        for use in uses:
            spec = specs.get(use.role)
            if spec is None:
                continue
            info = self._quantize(model.graph, use, spec, importance.get(id(use.weight)), names)
            details.append(info)
            counts["quantized"] += 1
            counts[f"{use.role}"] = counts.get(use.role, 0) + 1
            saved += info["bytes_before"] - info["bytes_after"]
        remove_dead(model.graph)
        counts["bytes_saved"] = saved
        return PassResult(counts["quantized"] > 0, counts, details={"weights": details})

    # ------------------------------------------------------------- find
    def _find(self, model: Model, ctx: PassContext) -> list[_Use]:
        graph = model.graph
        min_elements = int(ctx.option("quant_min_elements", 1024))
        include = ctx.option("quant_include")
        exclude = ctx.option("quant_exclude")
        include = [include] if isinstance(include, str) else include
        exclude = [exclude] if isinstance(exclude, str) else (exclude or [])
        outputs = {id(t) for t in graph.outputs}
        found: dict[int, _Use] = {}

        def wanted(w: gs.Tensor) -> bool:
            if not isinstance(w, gs.Constant) or len(w.shape) != 2 or int(np.prod(w.shape)) < min_elements:
                return False
            if np.dtype(w.dtype).kind != "f":
                return False
            if include and not any(fnmatch.fnmatch(w.name, p) for p in include):
                return False
            return not any(fnmatch.fnmatch(w.name, p) for p in exclude)

        for node in graph.nodes:
            if node.op == "MatMul" and len(node.inputs) == 2:
                w = node.inputs[1]
                head = _reaches_output(node.outputs[0], outputs)
                src = producer(w)
                if src is not None and src.op == "Transpose" and list(src.attrs.get("perm", [])) == [1, 0]:
                    e = src.inputs[0]  # MatMul(x, Transpose(E)): reduction along E's axis 1
                    if wanted(e):
                        role = "tied" if any(c.op == "Gather" for c in e.outputs) else ("lm_head" if head else "linear")
                        found[id(e)] = _Use(e, 1, role, node.inputs[0])
                elif wanted(w) and len(w.outputs) == 1:
                    found[id(w)] = _Use(w, 0, "lm_head" if head else "linear", node.inputs[0])
            elif node.op == "Gemm" and len(node.inputs) >= 2 and wanted(node.inputs[1]) and len(node.inputs[1].outputs) == 1:
                axis = 1 if int(node.attrs.get("transB", 0)) else 0
                if not int(node.attrs.get("transA", 0)):
                    found[id(node.inputs[1])] = _Use(node.inputs[1], axis, "linear", node.inputs[0])
            elif node.op == "Gather" and int(node.attrs.get("axis", 0)) == 0 and wanted(node.inputs[0]):
                e = node.inputs[0]
                if id(e) not in found and all(c.op == "Gather" for c in e.outputs):
                    found[id(e)] = _Use(e, 1, "embedding")
        return list(found.values())

    # --------------------------------------------------------- activations
    def _importance(self, model: Model, uses: list[_Use]) -> dict[int, np.ndarray]:
        """Mean squared activation per input channel of each weight, from a CPU-backend run."""
        from graphopt._api import compile as compile_model
        from graphopt._inputs import InputSpec, build_inputs

        probe = model.copy()
        wanted = {u.activation.name: u for u in uses if u.activation is not None}
        tensors = probe.graph.tensors()
        extra = [tensors[n] for n in wanted if n in tensors and not isinstance(tensors[n], gs.Constant)]
        for t in extra:
            if t.dtype is None:
                t.dtype = np.float32
        probe.graph.outputs = list(probe.graph.outputs) + [t for t in extra if t not in probe.graph.outputs]
        feeds = build_inputs(probe, InputSpec(batch=2, seq=16, past=8, left_pad=0, seed=1))
        out = compile_model(probe, "cpu").run(feeds)
        result = {}
        for name, use in wanted.items():
            if name in out:
                x = out[name].astype(np.float64)
                result[id(use.weight)] = np.mean(x.reshape(-1, x.shape[-1]) ** 2, axis=0)
        return result

    # ------------------------------------------------------------- rewrite
    def _quantize(self, graph: gs.Graph, use: _Use, spec: QuantSpec, importance: np.ndarray | None,
                  unique_name) -> dict:
        w = use.weight
        values = array_view(w)  # no copy of the float weight
        mat = values if use.axis == 0 else values.T  # reduction axis first
        if importance is not None and importance.shape[0] != mat.shape[0]:
            importance = None
        stats: dict = {}
        codes, scales, zeros = quantize_blocks(mat, spec, importance, stats)
        if use.axis == 1:
            codes, scales = codes.T, scales.T
            zeros = zeros.T if zeros is not None else None
        base = w.name
        q = _tensor(unique_name(f"{base}_q{spec.bits}"), codes, spec.bits, spec.symmetric)
        s = gs.Constant(unique_name(f"{base}_scale"), np.ascontiguousarray(scales))
        inputs = [q, s]
        if zeros is not None:
            inputs.append(_tensor(unique_name(f"{base}_zero_point"), zeros, spec.bits, False))
        out_dtype = np.dtype(w.dtype)
        deq_t = gs.Variable(unique_name(f"{base}_dequantized"), out_dtype, list(w.shape))
        attrs = {"axis": use.axis, "block_size": spec.block}
        if np.dtype(spec.scale_dtype) != out_dtype:
            attrs["output_dtype"] = onnx.helper.np_dtype_to_tensor_dtype(out_dtype)
        node = gs.Node("DequantizeLinear", unique_name(f"DequantizeLinear_{base}"), attrs=attrs,
                       inputs=inputs, outputs=[deq_t])
        node.meta = {"graphopt.rule": f"quantize-{use.role}-int{spec.bits}-b{spec.block}"}
        graph.nodes.append(node)
        for consumer in list(w.outputs):
            if consumer is not node:
                consumer.inputs = [deq_t if t is w else t for t in consumer.inputs]
        before = values.nbytes
        after = (codes.size * spec.bits + 7) // 8 + scales.nbytes + (
            (zeros.size * spec.bits + 7) // 8 if zeros is not None else 0)
        return {"name": base, "role": use.role, "shape": list(w.shape), "bits": spec.bits, "block": spec.block,
                "axis": use.axis, "method": spec.method, "bytes_before": int(before), "bytes_after": int(after),
                **stats}
