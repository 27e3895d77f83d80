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
model on the CPU backend with generated inputs) or ``gptq`` (the output error of each
MatMul on calibration activations, :mod:`graphopt.passes._gptq`: ``quant_calib_tokens``
rows, 16384 by default, of generated inputs run on the CPU backend; weights without a
MatMul input, e.g. an embedding table, use ``search``; ``quant_gptq_order`` ``auto``
(default), ``natural`` or ``act`` is GPTQ's row order; ``quant_sequential`` makes it
sequential with the float model's outputs as the target, see :meth:`Quantize._sequential`),
``quant_include`` /
``quant_exclude`` (fnmatch patterns on weight names), ``quant_min_elements``.

A reduction axis that is not a multiple of the block size ends in a partial block: the
scale has ``ceil(K / block)`` rows, as the DequantizeLinear spec allows; onnxruntime and
onnx's reference implementation both accept it.

Per weight the pass records the relative RMS error and SQNR of the dequantized weight
(``PassResult.details``), which the CLI prints and writes to the report.

The arithmetic runs on a thread pool and, except for ``gptq``, in the background: the pass
rewrites the graph with constants whose bytes are futures (:class:`graphopt._ir.RawValues`)
and returns, so the passes after it and saving (which writes the ready weights first and
flushes them to disk meanwhile) overlap it. Whatever reads the values waits for them; the
pass's details are complete when read (:attr:`graphopt.PassStats.details` waits); a failed
computation is a one-line :class:`GraphoptError` for whoever reads it. The pass's recorded
time is therefore its own, not the arithmetic's.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from graphopt._errors import GraphoptError
from graphopt._ir import Model, RawValues, array_view, populate, tensor_nbytes, values_view
from graphopt._memory import reuse_freed_memory
from graphopt._opset import ensure_opset
from graphopt._pipeline import Pass, PassContext, PassResult
from graphopt.pattern import producer
from graphopt.passes._blockquant import QuantSpec, Quantized, dequantize_blocks, pack_int4, quantize_matrix
from graphopt.passes._gptq import Calibration, gptq_matrix
from graphopt.rewrite import Namer, remove_dead

logger = logging.getLogger(__name__)

OPSET = 21  # blocked DequantizeLinear with INT4/UINT4
_INT_TYPES = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
              (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8}


# ------------------------------------------------------------------ the math
def quantize_blocks(w: np.ndarray, spec: QuantSpec, importance: np.ndarray | None = None,
                    stats: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize ``w`` [K, N] in blocks of ``spec.block`` rows (along axis 0).

    Returns integer codes [K, N] (int8 holding the 4-bit range when bits=4; uint8 when
    asymmetric), scales [ceil(K/B), N] and zero points (same shape) or None.
    ``importance`` [K] weights the squared error per row for the search. If ``stats`` is
    given it receives the relative RMS error and SQNR of the dequantized weight (see
    :mod:`graphopt.passes._blockquant` for the arithmetic).
    """
    q = quantize_matrix(w, spec, importance)
    if stats is not None:
        stats.update(q.stats())
    return q.codes, q.scales.astype(spec.scale_dtype), q.zeros


def error_stats(w: np.ndarray, deq: np.ndarray) -> dict[str, float]:
    diff = float(np.sqrt(np.mean((w.astype(np.float64) - deq) ** 2)))
    ref = float(np.sqrt(np.mean(w.astype(np.float64) ** 2)))
    rel = diff / ref if ref > 0 else 0.0
    return {"rel_rms_error": rel, "sqnr_db": (20 * math.log10(1 / rel)) if rel > 0 else float("inf")}


def _layout(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Codes computed reduction-axis-first, in the weight's own layout (4-bit: packed)."""
    if axis == 1:
        values = values.T
    return pack_int4(values) if bits == 4 else np.ascontiguousarray(values)


# ------------------------------------------------------------------ the pass
@dataclass
class _Use:
    weight: gs.Constant
    axis: int  # the reduction axis of the weight as stored
    role: str  # "linear", "lm_head", "embedding", "tied"
    activation: gs.Tensor | None = None  # the MatMul input, for activation-aware scales
    #: The weight's values object, taken when the job is queued: the graph's constants may be
    #: swapped for stubs meanwhile (an opset upgrade exports the graph without its weights).
    values: object = None


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
                      method=str(ctx.option("quant_method", "rtn")),
                      order=str(ctx.option("quant_gptq_order", "auto")))
        specs = {"linear": QuantSpec(int(bits), block, **common),
                 "lm_head": QuantSpec(int(ctx.option("quant_lm_bits", 8)), int(ctx.option("quant_lm_block", block)),
                                      **common)}
        embed_bits = ctx.option("quant_embed_bits")
        if embed_bits is not None:
            specs["embedding"] = QuantSpec(int(embed_bits), int(ctx.option("quant_embed_block", block)), **common)
        specs["tied"] = specs["lm_head"]
        for role, spec in specs.items():
            spec.check(f"quantize ({role})")
        if common["method"] == "gptq":
            _calib_tokens(ctx)  # a bad value is an error before any work
        else:
            for key in ("quant_sequential", "quant_gptq_order"):
                if ctx.option(key, None) not in (None, False):
                    raise GraphoptError(f"quantize: {key} is a gptq option (--quant-method gptq)")
        uses = self._find(model, ctx)
        if not uses:
            if ctx.option("quant_include"):
                raise GraphoptError(f"quantize: no weight matches --quant-include {ctx.option('quant_include')!r}")
            return PassResult(False, {"quantized": 0})
        workers = max(1, min(len(uses), int(ctx.option("quant_threads", os.cpu_count() or 1))))
        # Every tile's temporaries are ~1 MiB: above glibc's initial mmap threshold each would be a
        # fresh mapping, zero-filled page by page and unmapped again, the threads contending for
        # the address-space lock. graphopt's allocator setting keeps them on the heap.
        reuse_freed_memory()
        # The arithmetic runs on a thread pool (numpy releases the GIL), biggest weights first,
        # in the background: the graph is rewritten with constants whose shapes are known and
        # whose bytes are futures, and the pass returns while the pool works, so the arithmetic
        # overlaps the passes after it and saving (which writes the ready weights first);
        # readers of the values wait. rtn and search need nothing from the graph, so they start
        # before the opset upgrade; gptq's factorisations can fail, so it waits here, where a
        # failure names the pass.
        pool = ThreadPoolExecutor(workers, thread_name_prefix="graphopt-quantize")
        jobs: dict[tuple, _Job] = {}
        try:
            if common["method"] in ("rtn", "search"):
                self._submit(pool, jobs, uses, specs, {})
            reason = ensure_opset(model, OPSET)
            if reason:
                raise GraphoptError(f"quantize needs opset {OPSET} for blocked DequantizeLinear: {reason}")
            uses = self._find(model, ctx)  # an upgrade re-creates the graph
            if common["method"] == "activation":
                importance = self._importance(model, uses)
            elif common["method"] == "gptq" and ctx.option("quant_sequential", False):
                importance = self._sequential(model, uses, specs, _calib_tokens(ctx))
            elif common["method"] == "gptq":
                importance = self._calibrate(model, uses, _calib_tokens(ctx))
            else:
                importance = {}
            self._submit(pool, jobs, uses, specs, importance)  # whatever the upgrade changed, or all
        except BaseException:
            for job in jobs.values():
                job.future.cancel()
            raise
        finally:
            pool.shutdown(wait=False)  # the workers finish the queue, then exit
        names = Namer(model.graph)
        details, counts, saved, used = [], {"quantized": 0}, 0, []
        for use in uses:
            job = jobs.get(_key(use))
            if job is None:
                continue  # a role without a setting (the embedding table unless asked for)
            self._rewrite(model.graph, use, specs[use.role], job.outputs, names)
            details.append(job.info)
            used.append(job.future)
            counts["quantized"] += 1
            counts[f"{use.role}"] = counts.get(use.role, 0) + 1
            saved += job.info["bytes_before"] - job.info["bytes_after"]
        kept = {id(f) for f in used}
        for job in jobs.values():
            if id(job.future) not in kept:
                job.future.cancel()  # started before an upgrade that changed the weight's use
        _RUNNING.update(used)
        for f in used:
            f.add_done_callback(_RUNNING.discard)
        if common["method"] == "gptq":
            for f in used:
                f.result()
            used = []
        remove_dead(model.graph)
        counts["bytes_saved"] = saved
        return PassResult(counts["quantized"] > 0, counts, details={"weights": details}, pending=used)

    @staticmethod
    def _submit(pool: ThreadPoolExecutor, jobs: dict, uses: list[_Use], specs: dict[str, QuantSpec],
                importance: dict) -> None:
        """Queue the arithmetic of every use not queued yet, biggest weights first."""
        todo = [u for u in uses if u.role in specs and _key(u) not in jobs]
        for use in sorted(todo, key=lambda u: -int(np.prod(u.weight.shape))):
            spec = specs[use.role]
            outputs = _Outputs.of(use, spec)
            info = _entry(use, spec, outputs)
            future = pool.submit(_job, dataclasses.replace(use, values=use.weight._values), spec,
                                 importance.get(id(use.weight)), outputs, info)
            jobs[_key(use)] = _Job(future, outputs, info)

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

        wanted = {u.activation.name: u for u in uses if u.activation is not None}
        probe, _ = _probe(model, wanted)
        feeds = build_inputs(probe, InputSpec(batch=2, seq=16, past=8, left_pad=0, seed=1))
        out = compile_model(probe, "cpu").run(feeds)
        result = {}
        for name, use in wanted.items():
            if name in out:
                x = out[name].astype(np.float64)
                result[id(use.weight)] = np.mean(x.reshape(-1, x.shape[-1]) ** 2, axis=0)
        return result

    def _calibrate(self, model: Model, uses: list[_Use], tokens: int) -> dict[int, Calibration]:
        """GPTQ's sums of each weight's MatMul input over ``tokens`` activation rows, from
        CPU-backend runs on generated inputs (batch 32 × 32 new tokens after 32 past ones,
        seeds 1000, 1001, …: not the seeds of graphopt's other generated inputs)."""
        from graphopt._api import compile as compile_model
        from graphopt._inputs import InputSpec, build_inputs

        wanted: dict[str, list[_Use]] = {}
        for u in uses:
            if u.activation is not None and u.role != "embedding":
                wanted.setdefault(u.activation.name, []).append(u)
        probe, extra = _probe(model, wanted)
        if not extra:
            return {}
        exe = compile_model(probe, "cpu")
        sums: dict[str, Calibration] = {}
        rows = 0
        for run in range(_MAX_CALIB_RUNS):
            out = exe.run(build_inputs(probe, InputSpec(batch=32, seq=32, past=32, left_pad=0, seed=1000 + run)))
            for t in extra:
                x = out[t.name]
                sums.setdefault(t.name, Calibration.empty(x.shape[-1])).add(x)
            rows = min(c.rows for c in sums.values())
            if rows >= tokens:
                break
        logger.info("quantize: gptq calibration on %d activation rows (%d runs)", rows, run + 1)
        return {id(u.weight): sums[name] for name, us in wanted.items() if name in sums for u in us}

    def _sequential(self, model: Model, uses: list[_Use], specs: dict[str, QuantSpec],
                    tokens: int) -> dict[int, Quantized]:
        """Sequential GPTQ with the float model's outputs as the target: the MatMul inputs are
        taken in graph order; each group of weights sharing an input is quantized on that input
        *as the model quantized so far computes it* (X̂, the earlier weights replaced by their
        dequantized values), towards what the float model computes from its own input (X):
        W' = W + α·Δ, Δ the least-squares step of X̂·W' ≈ X·W (``(X̂ᵀX̂)⁻¹·X̂ᵀX·W − W`` on all
        but the last calibration batch) and α ∈ [0, 1] the step that best predicts that held-out
        batch, then GPTQ of W' under X̂ᵀX̂. Each weight so absorbs the part of the earlier
        weights' error its input can express, instead of adding its own to it. Two runs of a
        truncated model (float and quantized so far) per group and calibration batch: minutes
        on a large model (the float run is repeated per group rather than keeping every group's
        X, gigabytes on a 150 M model). The embedding table and a tied matrix's embedding use
        are not compensated (they come first)."""
        from graphopt._api import compile as compile_model
        from graphopt._inputs import InputSpec, build_inputs

        groups: dict[str, list[_Use]] = {}
        for u in uses:
            if u.activation is not None and u.role in specs and u.role != "embedding":
                groups.setdefault(u.activation.name, []).append(u)
        model.graph.toposort()
        depth = {t.name: i for i, n in enumerate(model.graph.nodes) for t in n.outputs}
        done: dict[str, np.ndarray] = {}  # weight name -> dequantized values, as stored
        result: dict[int, Quantized] = {}
        rows_per_run = 32 * 32
        runs = max(1, min(_MAX_CALIB_RUNS, -(-tokens // rows_per_run)))
        for name in sorted(groups, key=lambda n: depth.get(n, -1)):
            ref = _truncated(model, name, {})
            exe_ref = compile_model(ref, "cpu")
            exe_q = compile_model(_truncated(model, name, done), "cpu") if done else exe_ref
            k, cal, cross, held = 0, None, None, None
            for run in range(runs):
                feeds = build_inputs(model, InputSpec(batch=32, seq=32, past=32, left_pad=0, seed=1000 + run))
                feeds = {t.name: feeds[t.name] for t in ref.graph.inputs if t.name in feeds}
                x = exe_ref.run(feeds)[name]
                xq = exe_q.run(feeds)[name] if exe_q is not exe_ref else x
                x = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
                xq = xq.reshape(-1, xq.shape[-1]).astype(np.float32, copy=False)
                if cal is None:
                    k = x.shape[-1]
                    cal, cross = Calibration.empty(k), np.zeros((k, k), np.float64)
                cal.add(xq)  # the Hessian: every row
                if run == runs - 1 and runs > 1:
                    held = (xq, x)  # the last batch checks the least squares fitted on the others
                else:
                    cross += xq.T.astype(np.float64) @ x
            hessian, damp = cal.hessian()
            gram = cal.xtx.astype(np.float64)
            if held is not None:
                gram -= held[0].T.astype(np.float64) @ held[0]
            gram[np.diag_indices(k)] += _LSQ_RIDGE * max(float(np.trace(gram)) / k, 1e-30)
            for use in groups[name]:
                spec = specs[use.role]
                values = array_view(use.weight)
                w = (values if use.axis == 0 else values.T).astype(np.float64)
                if w.shape[0] != k or not np.isfinite(hessian).all():
                    continue  # left to the plain path (search)
                target = w
                if held is not None and np.isfinite(cross).all():
                    # W' = W + α·Δ: Δ from the least squares, α ∈ [0, 1] the step that best predicts
                    # the held-out batch (closed form): with few rows per input channel the fit is
                    # noise, and α goes to 0 instead of making the weight worse.
                    delta = np.linalg.solve(gram, cross @ w) - w
                    xq_h, x_h = (a.astype(np.float64) for a in held)
                    a, b = (xq_h - x_h) @ w, xq_h @ delta
                    bb = float(np.sum(b * b))
                    alpha = min(1.0, max(0.0, -float(np.sum(a * b)) / bb)) if bb > 0 else 0.0
                    target = w + alpha * delta
                q = gptq_matrix(target.astype(np.float32), hessian, spec, damp)
                deq = dequantize_blocks(q.codes, q.scales, q.zeros, spec.block)
                d = w - deq  # the error figure is against the weight, not the target
                result[id(use.weight)] = dataclasses.replace(q, err2=float(np.sum(d * d)), ref2=float(np.sum(w * w)))
                deq = deq.astype(values.dtype)
                done[use.weight.name] = deq if use.axis == 0 else np.ascontiguousarray(deq.T)
        logger.info("quantize: sequential gptq over %d inputs, %d calibration rows each", len(groups),
                    runs * rows_per_run)
        return result

    # ------------------------------------------------------------- rewrite
    def _rewrite(self, graph: gs.Graph, use: _Use, spec: QuantSpec, outs: _Outputs, unique_name) -> None:
        w = use.weight
        base = w.name
        inputs = [outs.constant("codes", unique_name(f"{base}_q{spec.bits}")),
                  outs.constant("scales", unique_name(f"{base}_scale"))]
        if not spec.symmetric:
            inputs.append(outs.constant("zeros", unique_name(f"{base}_zero_point")))
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


def _key(use: _Use) -> tuple:
    """What a use's job depends on: the same key before and after an opset upgrade means the
    same arithmetic (the upgrade keeps weights' values, names and uses)."""
    return use.weight.name, use.axis, use.role


def _entry(use: _Use, spec: QuantSpec, outs: _Outputs) -> dict:
    """A weight's report entry; its job adds the error figures."""
    w = use.weight
    before = int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize
    after = sum(tensor_nbytes(onnx.TensorProto(dims=outs.dims[k], data_type=outs.types[k])) for k in outs.dims)
    return {"name": w.name, "role": use.role, "shape": list(w.shape), "bits": spec.bits, "block": spec.block,
            "axis": use.axis, "method": spec.method, "bytes_before": int(before), "bytes_after": int(after)}


@dataclass
class _Job:
    future: Future
    outputs: _Outputs
    info: dict


@dataclass
class _Outputs:
    """The constants one weight's job fills: a future per tensor, with its dims and ONNX type
    (known before the arithmetic runs)."""

    futures: dict[str, Future]
    dims: dict[str, list[int]]
    types: dict[str, int]

    @classmethod
    def of(cls, use: _Use, spec: QuantSpec) -> _Outputs:
        shape = [int(d) for d in use.weight.shape]
        blocks = list(shape)
        blocks[use.axis] = -(-shape[use.axis] // spec.block)
        dims = {"codes": shape, "scales": blocks}
        types = {"codes": _INT_TYPES[spec.bits, spec.symmetric],
                 "scales": onnx.helper.np_dtype_to_tensor_dtype(np.dtype(spec.scale_dtype))}
        if not spec.symmetric:
            dims["zeros"], types["zeros"] = blocks, _INT_TYPES[spec.bits, False]
        return cls({k: Future() for k in dims}, dims, types)

    def constant(self, key: str, name: str) -> gs.Constant:
        """The constant of one output; saving writes it in the order the jobs are queued."""
        return gs.Constant(name, RawValues(name, self.dims[key], self.types[key], self.futures[key],
                                           order=-int(np.prod(self.dims["codes"]))))

    def fail(self, error: BaseException) -> None:
        for f in self.futures.values():
            if not f.done():
                f.set_exception(error)


_MAX_CALIB_RUNS = 1024

#: Background jobs not finished yet. A child forked meanwhile would wait forever for futures
#: whose threads it does not have, so a fork first lets them finish.
_RUNNING: set[Future] = set()


def _finish_running() -> None:
    for f in list(_RUNNING):
        if not f.cancelled():
            f.exception()  # waits; the error, if any, stays with the future's readers


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_finish_running)


def _probe(model: Model, names) -> tuple[Model, list[gs.Tensor]]:
    """A copy of ``model`` that also outputs the activations named in ``names`` (those that exist
    and are not constants), and those tensors."""
    probe = model.copy()
    tensors = probe.graph.tensors()
    extra = [tensors[n] for n in names if n in tensors and not isinstance(tensors[n], gs.Constant)]
    for t in extra:
        if t.dtype is None:
            t.dtype = np.float32
    probe.graph.outputs = list(probe.graph.outputs) + [t for t in extra if t not in probe.graph.outputs]
    return probe, extra


#: Relative ridge of the sequential least squares (X̂ᵀX̂ is well determined with thousands of
#: rows; larger values bias the target visibly at 8 bits).
_LSQ_RIDGE = 1e-6


def _truncated(model: Model, output: str, replaced: dict[str, np.ndarray]) -> Model:
    """A copy of ``model`` that computes only ``output``, with the constants in ``replaced``
    holding the given values (the dequantized weights of sequential gptq)."""
    probe, extra = _probe(model, [output])
    for name, t in probe.constants().items():
        if name in replaced:
            t.values = replaced[name]
    probe.graph.outputs = extra
    probe.graph.cleanup(remove_unused_graph_inputs=True)
    return probe


def _calib_tokens(ctx: PassContext) -> int:
    tokens = ctx.option("quant_calib_tokens", 16384)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise GraphoptError(f"quantize: quant_calib_tokens must be a positive integer, got {tokens!r}")
    return tokens


def _job(use: _Use, spec: QuantSpec, importance: np.ndarray | Calibration | None, outs: _Outputs,
         info: dict) -> None:
    """One weight's arithmetic on a pool thread: adds its error figures to its report entry
    ``info``, then fills the futures of its constants (codes, scales, zero points, as ONNX
    stores them)."""
    try:
        q, codes, zeros = _compute(use, spec, importance)
        scales = q.scales.astype(spec.scale_dtype)
        arrays = {"codes": codes, "scales": np.ascontiguousarray(scales.T if use.axis == 1 else scales)}
        if zeros is not None:
            arrays["zeros"] = zeros
        info.update(q.stats())
        for key, f in outs.futures.items():
            f.set_result(arrays[key])
    except Exception as e:  # whoever reads the values (saving, a backend) gets it, one line
        error = GraphoptError(f"quantize: {use.weight.name}: {type(e).__name__}: {e}")
        outs.fail(error)
        raise error from e


def _compute(use: _Use, spec: QuantSpec, importance: np.ndarray | Calibration | None) -> tuple:
    """The arithmetic of one weight (no graph access: runs on a worker thread): the result,
    and codes and zero points as they will be stored."""
    if isinstance(importance, Quantized):  # computed already (sequential gptq): only the layout
        q = importance
    else:
        q = _arithmetic(use, spec, importance)
    zeros = _layout(q.zeros, spec.bits, use.axis) if q.zeros is not None else None
    return q, q.codes.reshape(-1) if q.packed else _layout(q.codes, spec.bits, use.axis), zeros


def _arithmetic(use: _Use, spec: QuantSpec, importance: np.ndarray | Calibration | None) -> Quantized:
    """Quantize the weight's values (read in place, never copied whole) by ``spec``."""
    values = values_view(use.values)  # taken when the job was queued
    populate(values)
    mat = values if use.axis == 0 else values.T  # reduction axis first
    q = None
    if isinstance(importance, Calibration):
        hessian, damp = importance.hessian() if importance.xtx.shape[0] == mat.shape[0] else (None, 0.0)
        q = gptq_matrix(mat, hessian, spec, damp) if hessian is not None and np.isfinite(hessian).all() else None
        importance = None  # without a usable calibration (non-finite activations): the scale search
    if q is None:
        if spec.method == "gptq":  # no calibration for this weight (an embedding table): the scale search
            spec = dataclasses.replace(spec, method="search")
        if importance is not None and importance.shape[0] != mat.shape[0]:
            importance = None
        q = quantize_matrix(mat, spec, importance, pack=use.axis == 0)
    return q
