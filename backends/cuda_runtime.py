"""Compiling and running a graph on the ``cuda`` backend (CuPy, or numpy when emulated).

Compile (once):

1. every node is checked against the declared table; ``DequantizeLinear → MatMul/Gather``
   on constant weights becomes one dequant-matmul / dequant-gather step whose weight is
   repacked (column-major packed codes, :class:`~graphopt.backends.cuda_kernels.GemvWeight`)
   and uploaded once;
2. every tensor is classified:

   - **constant**: computed from initializers only. Small ones are folded on the host now;
   - **static**: computed from constants and *shapes* (``Shape``/``Size`` outputs): the
     shape arithmetic exporters emit. It runs on the host with the cpu backend's kernels
     and depends only on the input shapes, so its values are cached per input-shape
     signature: a repeated shape (every decode step at a fixed past length, every
     captured step) skips the host work entirely;
   - **dynamic**: depends on input values; runs on the device.

3. steps are ordered, intermediates freed after their last use; weights go to the device
   once (CuPy's memory pool; one non-blocking stream).

Run: inputs are uploaded, host steps run only for a new shape signature, device steps
run their kernels. A ``Concat`` that appends new keys/values to a ``past_key_values``
input and is the matching ``present`` output (the KV cache) writes *in place* into a
buffer with spare capacity when its past is the latest view of that buffer (what a
decode loop passes back, see ``run(..., keep=...)``), so a decode step copies one
token's keys, not the whole cache.

With ``graphs=True`` on a GPU, a step whose input shapes repeat is captured in a CUDA
graph on its second occurrence and replayed afterwards (inputs are copied into the
captured buffers, outputs out of them, each in one ``multi_copy`` launch); any
device-to-host read in the step (a shape that depends on input values) makes the step
uncapturable, and it keeps running op by op. An op that breaks a capture (a library call
that synchronises: CuPy refuses cuBLAS under capture, which is why decode-sized matmuls
have kernels of their own) is found by trying and runs between two graphs
(``exe.capture_problems`` names it).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt._backend import op_version
from graphopt._errors import BackendError
from graphopt._ir import Model
from graphopt.backends import cuda_kernels as ck
from graphopt.backends import cuda_ops
from graphopt.backends.cpu import (INTERNAL_DOMAIN, Slots, SlotExecutable, _knode, check_nodes, const_values, invoke,
                                   plan_frees, store)
from graphopt.backends.cpu_fused import _as_int, fuse_dequant_matmul
from graphopt.backends.cpu_kernels import find_kernel
from graphopt.backends.cuda_fusion import _is_f32, fuse_elementwise
from graphopt.backends.cuda_kernels import GemvWeight
from graphopt.backends.cuda_ops import PARAMS, Device

logger = logging.getLogger(__name__)

#: Constant-only results up to this size are folded at compile time (bigger ones, e.g. a
#: transposed tied embedding, stay lazy device views instead of second copies).
FOLD_BYTES = 1 << 20
#: Shape signatures whose static values are kept (decode steps at growing past lengths each have one).
SIGNATURE_CACHE = 8
#: A step with more steps than this that break a capture runs op by op.
MAX_EAGER_STEPS = 16
#: Extra KV-cache capacity (tokens) allocated when an in-place append buffer must grow.
KV_GROW = 256

CONST, STATIC, DYNAMIC = 0, 1, 2
#: How a step reads one input: as it is; downloaded (a device value the host needs); a static
#: value read as a parameter on the host; a static value uploaded for the device.
READ, DOWNLOAD, STATIC_PARAM, STATIC_DATA = 0, 1, 2, 3


@dataclass
class Step:
    name: str
    op: str
    fn: Any
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    host: bool
    free: tuple[int, ...] = ()
    kv: str = ""  # "concat": a KV-cache Concat; "attention": an Attention reading past_key/past_value
    actions: tuple[int, ...] = ()
    knode: Any = None


@dataclass
class _Signature:
    """What a shape signature's first run left for later runs."""

    values: dict[int, Any] = field(default_factory=dict)  # static slot -> its device copy
    params: dict[int, Any] = field(default_factory=dict)  # static slot -> host value read as a parameter
    graph: Any = None  # the captured plan (CUDA graphs and eager steps) and its buffers
    uncapturable: str | None = None
    eager: set[int] = field(default_factory=set)  # device steps that broke a capture: run between graphs


#: Downloads from 256 KiB go through pinned host memory (several times the bandwidth of a copy
#: into pageable memory: a prefill's logits are 300 MB for a 150k vocabulary).
PINNED_DOWNLOAD = 1 << 18


def _transfer(device: Device):
    xp = device.xp
    if device.emulated:
        return (lambda a: np.array(a, copy=True)), (lambda a: np.asarray(a))

    def download(a):
        if not isinstance(a, xp.ndarray) or a.nbytes < PINNED_DOWNLOAD:  # host values (shape outputs) too
            return xp.asnumpy(a)
        import cupyx

        a = xp.ascontiguousarray(a)
        out = cupyx.empty_pinned(a.shape, a.dtype)  # from CuPy's pinned memory pool: reused once freed
        a.get(out=out)
        return out
    return (lambda a: xp.asarray(a)), download


def _fold_transposed_dequant(model: Model) -> int:
    """``MatMul(x, Transpose(DequantizeLinear(W)))`` where every user of the dequantized W
    is such a Transpose or a Gather (a tied embedding quantized once): turned into
    ``DequantMatMul`` nodes marked ``transposed`` that read W directly, and dequant-gathers."""
    graph = model.graph
    count = 0
    outputs = {id(t) for t in graph.outputs}
    for dq in list(graph.nodes):
        if dq.op != "DequantizeLinear" or not isinstance(dq.inputs[0], gs.Constant) or len(dq.outputs) != 1:
            continue
        if len(dq.inputs[0].shape or ()) != 2 or id(dq.outputs[0]) in outputs:
            continue
        users = list(dq.outputs[0].outputs)
        transposes = [u for u in users if u.op == "Transpose" and list(u.attrs.get("perm", [1, 0])) == [1, 0]]
        gathers = [u for u in users if u.op == "Gather" and u.inputs[0] is dq.outputs[0]
                   and int(u.attrs.get("axis", 0)) == 0]
        if not transposes or len(transposes) + len(gathers) != len(users):
            continue
        if not all(id(t.outputs[0]) not in outputs and t.outputs[0].outputs and all(
                m.op == "MatMul" and m.inputs[1] is t.outputs[0] and m.inputs[0] is not t.outputs[0]
                for m in t.outputs[0].outputs) for t in transposes):
            continue
        ins = list(dq.inputs) + [gs.Variable.empty()] * (3 - len(dq.inputs))
        attrs = {"axis": int(dq.attrs.get("axis", 1)), "block_size": int(dq.attrs.get("block_size", 0)),
                 "transposed": 1, "n": int(dq.inputs[0].shape[0])}
        for t in transposes:
            for m in list(t.outputs[0].outputs):
                new = gs.Node("DequantMatMul", name=f"{m.name or 'matmul'}__dqT", domain=INTERNAL_DOMAIN,
                              attrs=dict(attrs), inputs=[m.inputs[0], *ins[:3]], outputs=list(m.outputs))
                m.inputs.clear()
                m.outputs.clear()
                graph.nodes.append(new)
                count += 1
        for g in gathers:
            new = gs.Node("DequantGather", name=f"{g.name or 'gather'}__dqT", domain=INTERNAL_DOMAIN,
                          attrs=dict(attrs), inputs=[*ins[:3], g.inputs[1]], outputs=list(g.outputs))
            g.inputs.clear()
            g.outputs.clear()
            graph.nodes.append(new)
            count += 1
    if count:
        graph.cleanup(remove_unused_graph_inputs=False)
        model.opset_imports.setdefault(INTERNAL_DOMAIN, 1)
    return count


def _fold_epilogues(model: Model) -> int:
    """``Add(DequantMatMul(x, W), b)`` with b a float32 constant vector of the output width (a
    projection's bias), and ``Add(DequantMatMul(...), r)`` with r a float32 tensor of the output's
    own shape (a residual), become the dequant-matmul's epilogue: one launch instead of two or three.
    The same for a float32 ``MatMul`` on a constant weight (``MatMulEpilogue``: the GEMV kernel's
    epilogue for decode rows, cuBLAS and additions otherwise)."""
    graph = model.graph
    outputs = {t.name for t in graph.outputs}
    count = 0
    for m in list(graph.nodes):
        plain = m.op == "MatMul" and not m.domain and _constant_f32_matrix(m)
        if plain:  # a float32 MatMul on a constant weight: MatMulEpilogue (x, W, extras), if an Add folds
            m.op, m.domain, m.attrs = "MatMulEpilogue", INTERNAL_DOMAIN, {"n": int(m.inputs[1].shape[1])}
        elif m.op != "DequantMatMul" or m.domain != INTERNAL_DOMAIN or len(m.inputs) < 3:
            continue
        while m.op == "DequantMatMul" and len(m.inputs) < 4:
            m.inputs.append(gs.Variable.empty())
        parts = [p for p in str(m.attrs.get("epilogue", "")).split(",") if p]
        width = int(m.attrs["n"])
        while True:
            y = m.outputs[0]
            if y.name in outputs or len(y.outputs) != 1:
                break
            add = y.outputs[0]
            if add.op != "Add" or add.domain or len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
                break
            other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
            out = add.outputs[0]
            if "bias" not in parts and isinstance(other, gs.Constant) and other.values.dtype == np.float32 \
                    and other.values.size == width and other.values.shape[-1:] == (width,) \
                    and other.values.ndim <= _rank(y, m.inputs[0]):  # the Add keeps y's rank
                role = "bias"
            elif ("resid" not in parts and not isinstance(other, gs.Constant) and _is_f32(other)
                  and y.shape is not None and other.shape is not None and out.shape is not None
                  and list(other.shape) == list(y.shape) == list(out.shape)):
                role = "resid"
            else:
                break
            add.inputs.clear()
            add.outputs.clear()
            m.inputs.append(other)
            m.outputs[0] = out
            parts.append(role)
            count += 1
        if parts:
            m.attrs["epilogue"] = ",".join(parts)
        elif plain:  # nothing to fold: stays a MatMul
            m.op, m.domain, m.attrs = "MatMul", "", {}
    if count:
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.toposort()
    return count


def _rank(y: gs.Tensor, x: gs.Tensor) -> int:
    """A matmul result's rank: known, or that of its input x (a 2-D weight keeps it); -1 if neither."""
    if y.shape is not None:
        return len(y.shape)
    return len(x.shape) if x.shape is not None else -1


def _constant_f32_matrix(m: gs.Node) -> bool:
    w = m.inputs[1] if len(m.inputs) == 2 else None
    return (isinstance(w, gs.Constant) and len(w.shape) == 2 and np.dtype(w.dtype) == np.float32
            and _is_f32(m.inputs[0]) and len(m.outputs) == 1)


def _quant_weight(node: gs.Node, device: Device) -> GemvWeight:
    ins = list(node.inputs)
    if node.op == "DequantMatMul":
        wq, scale, zp = ins[1], ins[2], ins[3] if len(ins) > 3 else None
    else:
        wq, scale, zp = ins[0], ins[1], ins[2] if len(ins) > 2 else None
    zv = const_values(zp) if zp is not None and zp.name else None
    attrs = dict(node.attrs)
    # a tied matrix read transposed by the LM head, or a gather reading rows of W [V, H]: columns of W^T
    transposed = bool(attrs.get("transposed", 0)) or node.op == "DequantGather"
    w = cuda_ops.gemv_weight(const_values(wq), const_values(scale), zv, attrs, device.xp, transposed=transposed)
    if w is None:
        raise BackendError(f"cuda: node {node.name!r} ({node.op}): quantization blocks along the output axis are "
                           f"not supported by the dequant-matmul kernel")
    return w


class CudaExecutable(SlotExecutable):
    def __init__(self, device: Device, steps: list[Step], n_slots: int, constants: dict[int, Any],
                 inputs: dict[str, int], outputs: dict[str, int], classes: list[int], rewrites: dict[str, int],
                 graphs: bool, weight_bytes: int):
        super().__init__(steps, n_slots, constants, inputs, outputs, rewrites)
        self.device = device
        self.classes = classes
        self.graphs = graphs
        self.weight_bytes = weight_bytes
        self._upload, self._download = _transfer(device)
        self._signatures: OrderedDict[tuple, _Signature] = OrderedDict()
        self._kv_buffers: dict[tuple, tuple[Any, int]] = {}  # (step, key|value) -> (buffer, committed length)
        self._stream = None if device.emulated else device.xp.cuda.Stream(non_blocking=True)
        self.stats = {"host_steps_run": 0, "device_steps_run": 0, "kv_in_place": 0, "kv_copied": 0,
                      "downloads": 0, "graph_replays": 0, "graph_captures": 0, "graph_eager_steps": 0}
        self.capture_problems: list[str] = []  # why a step was not (or only partly) captured
        out_slots = sorted(set(outputs.values()))
        self._static_out = [i for i in out_slots if classes[i] == STATIC]  # shape-only graph outputs
        self._device_out = [i for i in out_slots if classes[i] != STATIC]
        self._copy_layouts: dict[tuple, tuple | None] = {}  # copy_many's plans by (shape, strides, dtype)
        self._graphs = _EmulatedCapture(self) if device.emulated else _StreamCapture(device.xp, self._stream)
        self._plain_kv = False  # KV appends as plain concatenations (CUDA-graph warm-up and capture)
        for i, step in enumerate(steps):  # KV-cache steps append through the in-place buffers
            if step.kv == "attention":
                step.fn = cuda_ops.attention_op(step.knode, device, concat=self._kv_concat(i))
            elif step.kv == "concat":
                step.fn = self._kv_concat(i, "")

    # ---------------------------------------------------------------- running
    def run(self, feeds: dict[str, Any], keep: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
        """Outputs as numpy arrays, except those named in ``keep``, which stay device arrays
        (pass them back as inputs: a KV cache then never leaves the device)."""
        self.check_feeds(feeds)
        if self._stream is None:
            return self._outputs(self._execute(feeds), keep)
        xp = self.device.xp
        caller = xp.cuda.get_current_stream()
        self._stream.wait_event(caller.record())  # the caller's work on its feeds comes first
        with self._stream:  # downloads too: asnumpy waits for this stream, not the null stream
            out = self._outputs(self._execute(feeds), keep)
        caller.wait_event(self._stream.record())  # and the caller's work on kept outputs after
        return out

    def _outputs(self, env: list[Any], keep) -> dict[str, Any]:
        return {name: env[slot] if name in keep else _contiguous(self._download(env[slot]))
                for name, slot in self.output_slots.items()}

    def step(self, feeds: dict[str, Any], keep: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
        return self.run(feeds, keep=keep)

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    def _signature(self, feeds: dict[str, Any]) -> tuple:
        return tuple((name, tuple(feeds[name].shape), str(feeds[name].dtype)) for name in self.input_slots)

    def _execute(self, feeds: dict[str, Any]) -> list[Any]:
        key = self._signature(feeds)
        sig = self._signatures.get(key)
        if sig is not None:
            self._signatures.move_to_end(key)
            if self.graphs and sig.uncapturable is None:
                return self._replay(sig, feeds)
        env = self._feed(feeds)
        if sig is None:
            sig = _Signature()
            self._walk(env, sig, run_host=True)
            for slot in self._static_out:
                sig.params[slot] = env[slot]
            self._signatures[key] = sig
            while len(self._signatures) > SIGNATURE_CACHE:
                _, old = self._signatures.popitem(last=False)
                if old.graph is not None and self._stream is not None:
                    self._stream.synchronize()  # never destroy a graph that may still be running
        else:
            self._walk(env, sig, run_host=False)
            self._static_outputs(env, sig)
        return env

    def _feed(self, feeds: dict[str, Any]) -> list[Any]:
        env = list(self._base)
        for name, slot in self.input_slots.items():
            value = feeds[name]
            env[slot] = value if self._on_device(value) else self._upload(np.asarray(value))
        return env

    def _static_outputs(self, env: list[Any], sig: _Signature) -> list[Any]:
        """Graph outputs computed from shapes alone come from the signature's record."""
        for slot in self._static_out:
            env[slot] = sig.params[slot]
        return env

    def _on_device(self, value: Any) -> bool:
        if self.device.emulated:  # numpy stands in for device memory: our KV buffers are "on the device"
            base = getattr(value, "base", None)
            return base is not None and any(base is buf for buf, _ in self._kv_buffers.values())
        return isinstance(value, self.device.xp.ndarray)

    def _walk(self, env: list[Any], sig: _Signature, run_host: bool, capturing: bool = False) -> None:
        """Runs the steps. A fresh signature (``run_host``) runs host steps too and records the
        static values device steps read; later runs of that signature take them from ``sig``."""
        for step in self.steps:
            if step.host and not run_host:
                continue
            self._run_step(step, env, sig, run_host)
            if not capturing:
                for slot in step.free:
                    env[slot] = None

    def _run_step(self, step: Step, env: list[Any], sig: _Signature, run_host: bool) -> Any:
        args = []
        for pos, s in enumerate(step.inputs):
            if s < 0:
                args.append(None)
                continue
            action = step.actions[pos]
            if action == READ:
                v = env[s]
            elif action == DOWNLOAD:  # a parameter computed on the device: a sync
                v = self._download(env[s])
                self.stats["downloads"] += 1
                if sig.uncapturable is None:
                    sig.uncapturable = f"{step.name} ({step.op}) reads a device value on the host"
            elif action == STATIC_PARAM:
                if run_host:
                    v = sig.params[s] = env[s]
                else:
                    v = sig.params[s]
            else:  # STATIC_DATA: host value used on the device, uploaded once per signature
                v = sig.values.get(s)
                if v is None:
                    v = sig.values[s] = self._upload(np.asarray(env[s]))
            args.append(v)
        self.stats["host_steps_run" if step.host else "device_steps_run"] += 1
        result = invoke("cuda", step.name, step.op, step.fn, args)
        store(env, step.outputs, result)
        return result

    # ---------------------------------------------------------------- KV cache in place
    def _kv_concat(self, index: int, which: str | None = None):
        """``(past, new, which) -> present`` for an Attention step; with ``which``, ``(past, new)``."""
        if which is not None:
            return lambda past, new: self._kv_append((index, which), past, new)
        return lambda past, new, which: self._kv_append((index, which), past, new)

    def _kv_append(self, index: tuple, past: Any, new: Any) -> Any:
        """``Concat([past, new], axis=2)`` of a KV cache, in place when ``past`` is the latest
        view of this step's buffer and the buffer has room; otherwise into a new buffer
        with ``KV_GROW`` tokens to spare. Views handed out earlier are never written.
        While a CUDA graph is warmed up and captured, a plain concatenation (fixed addresses)."""
        xp = self.device.xp
        if self._plain_kv:
            return xp.concatenate((past, new), axis=2)
        length, add = past.shape[2], new.shape[2]
        held = self._kv_buffers.get(index)
        if held is not None:
            buf, committed = held
            if (past.base is buf and committed == length and buf.shape[2] >= length + add
                    and buf.shape[:2] == past.shape[:2] and buf.shape[3] == past.shape[3]
                    and ck.pointer(past) == ck.pointer(buf)):
                buf[:, :, length:length + add] = new
                self._kv_buffers[index] = (buf, length + add)
                self.stats["kv_in_place"] += 1
                return buf[:, :, :length + add]
        b, h, _, dim = past.shape
        buf = xp.empty((b, h, length + add + KV_GROW, dim), dtype=past.dtype)
        buf[:, :, :length] = past
        buf[:, :, length:length + add] = new
        self._kv_buffers[index] = (buf, length + add)
        self.stats["kv_copied"] += 1
        return buf[:, :, :length + add]

    # ---------------------------------------------------------------- CUDA graphs
    def _replay(self, sig: _Signature, feeds: dict[str, Any]) -> list[Any]:
        xp = self.device.xp
        if sig.graph is None:  # second sighting: capture (this call's results come from the capture's run)
            # A private pool: memory the captured kernels use (intermediates, scratch) is never
            # handed to anything else while the graph lives, since every replay writes it.
            pool, private = self._graphs.private_memory()
            with private:
                inputs = {n: xp.asarray(feeds[n]).copy() for n in self.input_slots}
                env = list(self._base)
                for name, slot in self.input_slots.items():
                    env[slot] = inputs[name]
                if self.device.kernels is not None:
                    self.device.kernels.warm()
                self._plain_kv = True  # no KV buffers swapped by the warm-up or the capture
                plan = None
                try:
                    self._walk(env, sig, run_host=False)  # warm-up (cuBLAS handles, pool blocks) outside capture
                    env = None  # the warm-up's blocks serve the capture
                    if sig.uncapturable is None:
                        plan, env = self._capture(sig, inputs)
                finally:
                    self._plain_kv = False
            if plan is None:  # this call's results op by op, in ordinary memory (the private pool goes now)
                logger.info("cuda: %s", sig.uncapturable)
                self.capture_problems.append(sig.uncapturable)
                env = self._feed(feeds)
                self._walk(env, sig, run_host=False)
                return self._static_outputs(env, sig)
            sig.graph = (plan, inputs, env, pool)
            self.stats["graph_captures"] += 1
            self.stats["graph_eager_steps"] += len(sig.eager)
        else:
            plan, inputs, env, _ = sig.graph
            moves = []
            for name, buf in inputs.items():
                value = feeds[name]
                if self._on_device(value):
                    if value is not buf:
                        moves.append((buf, value))
                else:
                    self._graphs.set(buf, value)
            self.copy_many(moves)  # device inputs (a KV cache) in one launch
            self._launch(plan, env, sig)
            self.stats["graph_replays"] += 1
        # Outputs leave the captured buffers (one launch for all): the next replay overwrites those,
        # and arrays of the private pool must not outlive it.
        result = list(env)
        moves = []
        for i in self._device_out:
            if env[i] is not None:
                result[i] = self.device.xp.empty(env[i].shape, env[i].dtype)
                moves.append((result[i], env[i]))
        self.copy_many(moves)
        return self._static_outputs(result, sig)

    def copy_many(self, moves: list[tuple[Any, Any]]) -> None:
        """``dst[...] = src`` for every pair of device arrays, in one ``multi_copy`` launch where
        the layouts allow (:func:`~graphopt.backends.cuda_kernels.copy_row`); a decode step moves
        dozens of KV slices, each otherwise its own launch."""
        rows, rest = [], []
        array = self.device.xp.ndarray
        layouts = self._copy_layouts
        for dst, src in moves:
            if not (isinstance(dst, array) and isinstance(src, array)) or dst.shape != src.shape \
                    or dst.dtype != src.dtype:
                rest.append((dst, src))
                continue
            key = (dst.shape, dst.strides, src.strides, dst.dtype)
            layout = layouts.get(key, False)
            if layout is False:  # planned once per layout: a decode step repeats the same few
                if len(layouts) > 4096:
                    layouts.clear()
                row = ck.copy_row(dst, src)
                layout = layouts[key] = row[2:] if row is not None else None
            if layout is None:
                rest.append((dst, src))
            else:
                rows.append((ck.pointer(src), ck.pointer(dst), *layout))
        if rows:
            table = np.array(rows, dtype=np.int64)
            if self.device.kernels is None:
                ck.multi_copy_twin(table)
            else:
                self.device.kernels.multi_copy(table)
        for dst, src in rest:
            dst[...] = src

    def _capture(self, sig: _Signature, inputs: dict[str, Any]) -> tuple[list | None, list[Any]]:
        """Captures the device steps in CUDA graphs, launching each as soon as it is captured, so
        the call that captures also computes its results. A step that breaks the capture (an op
        that synchronises, e.g. a pageable host copy inside a library call) is found by trying:
        it is marked *eager*, the capture starts over, and from then on the step runs op by op
        between two graphs, its results copied into the buffers the next graph reads. Returns
        ``(plan, env)``; ``plan`` is ``None`` when the step cannot be captured at all."""
        api = self._graphs
        while True:
            env = list(self._base)  # the previous attempt's arrays are dropped: their blocks serve this one
            for name, slot in self.input_slots.items():
                env[slot] = inputs[name]
            plan: list[tuple] = []
            capturing = False
            broke = None
            for i, step in enumerate(self.steps):
                if step.host:
                    continue
                if i in sig.eager:
                    if capturing:
                        plan.append(("graph", self._end_capture()))
                        capturing = False
                    self._run_step(step, env, sig, run_host=False)
                    plan.append(("eager", i, tuple(env[o] if o >= 0 else None for o in step.outputs)))
                    continue
                if not capturing:
                    api.begin()
                    capturing = True
                try:
                    self._run_step(step, env, sig, run_host=False)
                    api.ran(step, env, sig)
                except Exception as e:  # noqa: BLE001 - any failure under capture: try the step eagerly
                    broke = (i, e)
                    break
            if broke is None:
                if capturing:
                    plan.append(("graph", self._end_capture()))
                return plan, env
            api.abort()
            i, e = broke
            reason = f"{self.steps[i].name} ({self.steps[i].op}) broke the capture: {type(e).__name__}: {e}"
            if i in sig.eager or len(sig.eager) >= MAX_EAGER_STEPS:
                sig.uncapturable = reason
                return None, None
            sig.eager.add(i)
            self.capture_problems.append(reason + " (runs op by op between graphs)")
            logger.info("cuda: %s", reason)

    def _end_capture(self) -> Any:
        graph = self._graphs.end()
        self._graphs.launch(graph)  # the segment runs now too: what follows reads its results
        return graph

    def _launch(self, plan: list[tuple], env: list[Any], sig: _Signature) -> None:
        self._plain_kv = True
        try:
            for item in plan:
                if item[0] == "graph":
                    self._graphs.launch(item[1])
                    continue
                _, i, targets = item
                step = self.steps[i]
                scratch = list(env)
                self._run_step(step, scratch, sig, run_host=False)
                for slot, target in zip(step.outputs, targets):
                    if target is not None and scratch[slot] is not target:
                        target[...] = scratch[slot]
        finally:
            self._plain_kv = False


class _StreamCapture:
    """CUDA-graph capture on the executable's CuPy stream."""

    def __init__(self, xp: Any, stream: Any):
        self.xp, self.stream = xp, stream

    def private_memory(self) -> tuple[Any, Any]:
        pool = self.xp.cuda.MemoryPool()
        return pool, self.xp.cuda.using_allocator(pool.malloc)

    def begin(self) -> None:
        self.stream.begin_capture()

    def ran(self, step: Step, env: list[Any], sig: _Signature) -> None:
        if not self.xp.cuda.runtime.streamIsCapturing(self.stream.ptr):  # raises once invalidated
            raise BackendError("the stream is no longer capturing")

    def end(self) -> Any:
        return self.stream.end_capture()

    def abort(self) -> None:
        try:
            self.stream.end_capture()
        except Exception:  # noqa: BLE001 - an invalidated capture refuses to end cleanly
            pass

    def launch(self, graph: Any) -> None:
        graph.launch(stream=self.stream)

    def set(self, buf: Any, value: Any) -> None:
        buf.set(_contiguous(value), stream=self.stream)


class _EmulatedCapture:
    """numpy's stand-in (``CudaBackend(emulate=True, graphs=True)``), so the capture logic runs in
    tests without a GPU: a "graph" is the list of steps run while capturing, and launching it
    runs them again on the captured env, writing into the arrays of the capture (so outputs
    alias fixed buffers as on a GPU). ``refuse``: op types that break a capture the way a
    cuBLAS call does under CuPy."""

    def __init__(self, exe: CudaExecutable) -> None:
        self.exe = exe
        self.recording: list | None = None
        self.refuse: set[str] = set()

    def private_memory(self) -> tuple[Any, Any]:
        import contextlib

        return None, contextlib.nullcontext()

    def begin(self) -> None:
        self.recording = []

    def ran(self, step: Step, env: list[Any], sig: _Signature) -> None:
        if step.op in self.refuse:
            raise BackendError(f"{step.op} is refused under capture (emulated)")
        self.recording.append((step, env, sig))

    def end(self) -> list:
        recording, self.recording = self.recording, None
        return recording

    def abort(self) -> None:
        self.recording = None

    def launch(self, graph: list) -> None:
        # As a real graph does, every step writes into the arrays it produced at capture (views of
        # other buffers follow them), so outputs alias the captured buffers as they would on a GPU.
        for step, env, sig in graph:
            scratch = list(env)
            self.exe._run_step(step, scratch, sig, run_host=False)
            for slot in step.outputs:
                if slot < 0:
                    continue
                old, new = env[slot], scratch[slot]
                if (isinstance(old, np.ndarray) and isinstance(new, np.ndarray) and old.shape == new.shape
                        and old.dtype == new.dtype):
                    if not np.shares_memory(old, new):
                        old[...] = new
                else:
                    env[slot] = new

    def set(self, buf: Any, value: Any) -> None:
        buf[...] = value


def _contiguous(a: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (``np.ascontiguousarray`` makes them 1-d)."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous else np.array(a, order="C")


# ------------------------------------------------------------------ compile
def _classify(graph: gs.Graph, inputs: set[str]) -> dict[str, int]:
    cls: dict[str, int] = {}
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Constant):
            cls[name] = CONST
    for name in inputs:
        cls[name] = DYNAMIC
    for node in graph.nodes:
        ins = [cls.get(t.name, DYNAMIC) for t in node.inputs if t.name]
        if node.op in ("Shape", "Size") and not node.domain:
            c = STATIC if ins and ins[0] != CONST else CONST
        elif node.domain == INTERNAL_DOMAIN:
            c = DYNAMIC
        else:
            c = max(ins) if ins else CONST
        for t in node.outputs:
            if t.name:
                cls[t.name] = c
    return cls


def _fold_constants(model: Model, classes: dict[str, int]) -> int:
    """Runs constant-only nodes whose outputs are small on the host now; they become initializers."""
    graph = model.graph
    folded = 0
    values: dict[str, np.ndarray] = {}
    for node in list(graph.nodes):
        if not node.outputs or any(classes.get(t.name) != CONST for t in node.outputs if t.name):
            continue
        if any(t.name and not isinstance(t, gs.Constant) and t.name not in values for t in node.inputs):
            continue
        spec = find_kernel(node.op, node.domain or "", op_version(node.op, node.domain or "",
                                                                   model.opset(node.domain or "")))
        if spec is None:
            continue
        args = [None if not t.name else values[t.name] if t.name in values else const_values(t)
                for t in node.inputs]
        try:
            result = spec.factory(_knode(node, model))(*args)
        except Exception:  # leave it to run time, which reports the error with the node's name
            continue
        results = result if isinstance(result, tuple) else (result,)
        if sum(np.asarray(r).nbytes for r in results) > FOLD_BYTES:
            continue
        for t, r in zip(node.outputs, results):
            if t.name:
                values[t.name] = np.asarray(r)
        folded += 1
    if not values:
        return 0
    for node in list(graph.nodes):
        if all(t.name in values or not t.name for t in node.outputs):
            for t in node.outputs:
                if t.name:
                    const = gs.Constant(t.name, _contiguous(values[t.name]))
                    for user in list(t.outputs):
                        for j, inp in enumerate(user.inputs):
                            if inp is t:
                                user.inputs[j] = const
                    for j, out in enumerate(graph.outputs):
                        if out is t:
                            graph.outputs[j] = const
            node.outputs.clear()
            node.inputs.clear()
    graph.cleanup(remove_unused_graph_inputs=False)
    return folded


def _kv_kind(node: gs.Node, graph_inputs: set[str], graph_outputs: set[str]) -> str:
    """"concat": ``Concat(past, new)`` along the sequence axis of a rank-4 graph input, giving a
    graph output (a KV cache, whatever its names); "attention": ``Attention`` with past key/value
    graph inputs and present graph outputs. Appending in place is safe for any such step: it
    only happens when the past is the latest view of the step's own buffer."""
    if node.op == "Concat" and len(node.inputs) == 2 and node.outputs[0].name in graph_outputs:
        past = node.inputs[0]
        axis = int(node.attrs.get("axis", 0))
        rank = len(past.shape) if past.shape is not None else 4
        if past.name in graph_inputs and rank == 4 and axis % 4 == 2:
            return "concat"
    if node.op == "Attention" and not node.domain and len(node.inputs) >= 6 and len(node.outputs) >= 3:
        pasts, presents = node.inputs[4:6], node.outputs[1:3]
        if all(t.name in graph_inputs for t in pasts) and \
                all(t.name in graph_outputs for t in presents):
            return "attention"
    return ""


def compile_model(model: Model, device: Device, check, graphs: bool = False, fuse: bool = True) -> CudaExecutable:
    work = model.copy()
    check_nodes("cuda", work, check)
    rewrites = {"tied_dequant_matmul": _fold_transposed_dequant(work),
                "dequant_matmul": fuse_dequant_matmul(work, pack=False)}
    rewrites["dequant_epilogues"] = _fold_epilogues(work)
    graph = work.graph
    graph.toposort()
    graph_inputs = {t.name for t in graph.inputs}
    rewrites["folded_constants"] = _fold_constants(work, _classify(graph, graph_inputs))
    graph.toposort()
    classes = _classify(graph, graph_inputs)
    if fuse:
        rewrites["elementwise_fused"] = fuse_elementwise(work, lambda name: classes.get(name) == DYNAMIC)
        classes = _classify(graph, graph_inputs)
    upload, _ = _transfer(device)

    slots = Slots()
    slot = slots.slot

    inputs = {t.name: slot(t.name) for t in graph.inputs}
    outputs_names = {t.name for t in graph.outputs}
    constants: dict[int, Any] = {}
    on_device: dict[str, bool] = {name: True for name in inputs}
    weight_bytes = 0
    steps: list[Step] = []

    def constant_slot(t: gs.Constant, for_device: bool, k_major: bool = False) -> str:
        """Constants read on the host keep their name; a device copy gets its own slot. ``k_major``:
        a float32 matrix a MatMul multiplies by, stored transposed (each column's K values
        contiguous: what the GEMV kernel reads) and handed out as the transposed view of that."""
        nonlocal weight_bytes
        k_major = k_major and for_device and len(t.shape) == 2 and np.dtype(t.dtype) == np.float32
        name = (f"{t.name}@device" + ("T" if k_major else "")) if for_device else t.name
        if slot(name) not in constants:  # loaded once, however many nodes read it
            values = _contiguous(const_values(t))
            if for_device and values.dtype.name in ("int4", "uint4"):  # CuPy has no 4-bit dtype
                values = _as_int(values)
            if k_major:
                constants[slot(name)] = upload(np.ascontiguousarray(values.T)).T
            else:
                constants[slot(name)] = upload(values) if for_device else values
            if for_device:
                weight_bytes += values.nbytes
            on_device[name] = for_device
        return name

    for node in graph.nodes:
        domain = node.domain or ""
        knode = _knode(node, work)
        shape_op = node.op in ("Shape", "Size") and not domain
        host = shape_op or (bool(node.outputs) and classes.get(node.outputs[0].name, DYNAMIC) == STATIC)
        names: list[str] = []
        actions: list[int] = []
        kv = ""
        if host:
            spec = find_kernel(node.op, domain, op_version(node.op, domain, work.opset(domain)))
            if spec is None:
                raise BackendError(f"cuda: no host kernel for {node.op} (node {node.name!r})")
            fn = spec.factory(knode)
            for t in node.inputs:
                name = constant_slot(t, False) if isinstance(t, gs.Constant) else t.name
                names.append(name)
                actions.append(DOWNLOAD if name and on_device.get(name) and not shape_op else READ)
        else:
            op = cuda_ops.DEVICE_OPS.get((domain, node.op))
            if op is None:
                raise BackendError(f"cuda: no device kernel for {node.op} (node {node.name!r})")
            kv = _kv_kind(node, graph_inputs, outputs_names)
            fn = None if kv else op.factory(knode, device)  # KV steps get their function from the executable
            params = PARAMS.get(node.op, frozenset())
            ins = list(node.inputs)
            def device_input(pos: int, t: gs.Tensor) -> None:
                param = pos in params
                if isinstance(t, gs.Constant):
                    k_major = pos == 1 and ((node.op == "MatMul" and not domain)
                                            or (node.op == "MatMulEpilogue" and domain == INTERNAL_DOMAIN))
                    names.append(constant_slot(t, not param, k_major=k_major))
                    actions.append(READ)
                    return
                names.append(t.name)
                if not t.name:
                    actions.append(READ)
                elif param:
                    actions.append(DOWNLOAD if on_device.get(t.name, True) else STATIC_PARAM)
                else:
                    actions.append(READ if on_device.get(t.name, True) else STATIC_DATA)

            if node.op in ("DequantMatMul", "DequantGather"):  # the prepared weight replaces its constant operands
                consts = tuple(t.name for t in ins[:4] if isinstance(t, gs.Constant))
                flip = int(node.attrs.get("transposed", 0)) or node.op == "DequantGather"
                wname = f"{'+'.join(consts)}::gemv{'T' if flip else ''}"  # a tied matrix is laid out once
                if slot(wname) not in constants:
                    w = _quant_weight(node, device)
                    weight_bytes += w.nbytes
                    constants[slot(wname)] = w
                on_device[wname] = True
                if node.op == "DequantMatMul":  # x, the weight, then the epilogue's bias / residual
                    device_input(0, ins[0])
                    names.append(wname)
                    actions.append(READ)
                    for pos, t in enumerate(ins[4:], start=4):
                        device_input(pos, t)
                else:  # the weight, then the ids
                    names.append(wname)
                    actions.append(READ)
                    device_input(len(ins) - 1, ins[-1])
            else:
                for pos, t in enumerate(ins):
                    device_input(pos, t)
        for t in node.outputs:
            if t.name:
                on_device[t.name] = not host
        steps.append(Step(node.name, node.op, fn, tuple(slot(n) if n else -1 for n in names),
                          tuple(slot(t.name) if t.name else -1 for t in node.outputs), host,
                          kv=kv, actions=tuple(actions), knode=knode))
    for t in graph.outputs:  # a graph output that is a constant
        if isinstance(t, gs.Constant):
            constant_slot(t, False)
    outputs = {t.name: slot(t.name) for t in graph.outputs}
    classes_by_slot = [DYNAMIC] * len(slots)
    for name, s in slots.items():
        classes_by_slot[s] = classes.get(name, CONST if s in constants else DYNAMIC)
    plan_frees(steps, set(outputs.values()) | set(constants) | set(inputs.values()))
    n_host = sum(st.host for st in steps)
    logger.debug("cuda: %d steps (%d on the host), %d slots, %d constants", len(steps), n_host, len(slots),
                 len(constants))
    if not device.emulated:  # the uploads (on the null stream) are done before any step reads them
        device.xp.cuda.Device().synchronize()
    rewrites["host_steps"] = n_host
    rewrites["device_steps"] = len(steps) - n_host
    return CudaExecutable(device, steps, len(slots), constants, inputs, outputs, classes_by_slot, rewrites,
                          graphs, weight_bytes)

