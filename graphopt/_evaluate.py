"""Proving a graph right: ``verify`` (compare two models) and ``generate`` (greedy decoding)."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from graphopt._api import _as_model, compile, get_backend
from graphopt._backend import Backend, Executable
from graphopt._errors import GraphoptError
from graphopt._inputs import PAST_RE, InputSpec, build_inputs, has_kv_cache
from graphopt._ir import Model

logger = logging.getLogger(__name__)


@dataclass
class OutputDiff:
    name: str
    shape: tuple
    max_abs: float
    max_rel: float
    cosine: float
    top1: float | None  # argmax agreement over the last axis (logits-like outputs)
    ok: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VerifyReport:
    target: str
    atol: float
    rtol: float
    outputs: list[OutputDiff] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def to_dict(self) -> dict:
        return {"target": self.target, "atol": self.atol, "rtol": self.rtol, "ok": self.ok,
                "outputs": [o.to_dict() for o in self.outputs]}


def compare(name: str, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> OutputDiff:
    if got.shape != ref.shape:
        return OutputDiff(name, tuple(got.shape), float("inf"), float("inf"), float("nan"), None, False)
    g, r = got.astype(np.float64).reshape(-1), ref.astype(np.float64).reshape(-1)
    diff = np.abs(g - r)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / np.maximum(np.abs(r), 1e-12)).max()) if diff.size else 0.0
    denom = float(np.linalg.norm(g) * np.linalg.norm(r))
    cosine = float(g @ r / denom) if denom > 0 else float(np.array_equal(g, r))
    top1 = None
    if "logit" in name.lower() and ref.ndim >= 2 and ref.shape[-1] > 1 and ref.dtype.kind == "f":
        top1 = float(np.mean(np.argmax(got, axis=-1) == np.argmax(ref, axis=-1)))
    ok = bool(np.allclose(got, ref, atol=atol, rtol=rtol, equal_nan=True))
    return OutputDiff(name, tuple(ref.shape), max_abs, max_rel, cosine, top1, ok)


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise GraphoptError(f"cannot read inputs from {path}: {e}") from e


def _check_feeds(exe_inputs: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = [n for n in exe_inputs if n not in feeds]
    if missing:
        raise GraphoptError(f"inputs lack {', '.join(missing)} (given: {', '.join(sorted(feeds)) or 'none'})")
    return {n: feeds[n] for n in exe_inputs}


def input_names(model: Model) -> list[str]:
    return [t.name for t in model.graph.inputs]


def verify(reference: Model | str | os.PathLike, candidate: Model | str | os.PathLike, target: str | Backend = "cpu",
           *, inputs: dict[str, np.ndarray] | None = None, atol: float = 1e-4, rtol: float = 1e-4,
           spec: InputSpec | None = None) -> VerifyReport:
    """Run ``reference`` in onnxruntime and ``candidate`` on ``target``; compare every output.

    Without ``inputs``, valid ones are built from the reference graph (token ids in the
    vocabulary, a left-padded row, consistent positions and KV-cache lengths).
    """
    ref_model, cand_model = _as_model(reference), _as_model(candidate)
    backend = get_backend(target)
    if inputs is None:
        spec = spec or InputSpec(seq=1 if has_kv_cache(ref_model) else 8, past=7)
        inputs = build_inputs(ref_model, spec)
    ref_exe = compile(ref_model, "onnxruntime")
    cand_exe = compile(cand_model, backend)
    ref_out = ref_exe.run(_check_feeds(input_names(ref_model), inputs))
    cand_out = cand_exe.run(_check_feeds(input_names(cand_model), inputs))
    report = VerifyReport(backend.name, atol, rtol)
    for name, ref in ref_out.items():
        if name not in cand_out:
            report.outputs.append(OutputDiff(name, tuple(ref.shape), float("inf"), float("inf"), float("nan"),
                                             None, False))
            continue
        report.outputs.append(compare(name, cand_out[name], ref, atol, rtol))
    return report


# ------------------------------------------------------------------ generate
def _past_inputs(model: Model) -> list[tuple[str, str]]:
    """(past input name, matching present output name), in layer order."""
    pairs = []
    outputs = {t.name for t in model.graph.outputs}
    for t in model.graph.inputs:
        m = PAST_RE.match(t.name)
        if m:
            present = f"present.{m.group(1)}.{m.group(2)}"
            if present not in outputs:
                raise GraphoptError(f"input {t.name} has no matching output {present}")
            pairs.append((t.name, present))
    return pairs


class StaticKV:
    """Fixed-size KV buffers for a decode loop: every decode step has the same input shapes.

    The past fed to each step is ``capacity - 1`` slots long; ``attention_mask`` (length
    ``capacity``) marks the slots that hold real tokens, ``position_ids`` carries each new
    token's true position, and the graph appends the new token's keys/values in the last
    slot. After the step that entry is moved to the first free slot. Attention over keys
    does not depend on their order, so the logits are those of the growing cache: this
    holds for models whose mask comes from ``attention_mask`` plus causality (Llama,
    Qwen, Gemma, Phi), not for sliding-window masks computed from key positions, which
    is why :meth:`check` compares the first static step with a dynamic one.
    """

    def __init__(self, pairs: list[tuple[str, str]], capacity: int, copy: Any = None):
        self.pairs = pairs
        self.capacity = capacity
        #: ``copy(list of (dst, src))``: an engine's batched copy (``CudaExecutable.copy_many``)
        self.copy = copy
        self.length = 0  # slots holding real tokens
        self.past: dict[str, Any] = {}

    def start(self, presents: dict[str, Any]) -> None:
        """Copies a (prefill) step's present KV into the buffers, on the host, once."""
        for name, present in self.pairs:
            kv = np.asarray(_to_host(presents[present]))
            b, h, n, d = kv.shape
            if n >= self.capacity - 1:
                raise GraphoptError(f"static KV cache: {n} tokens do not fit a capacity of {self.capacity}")
            buf = np.zeros((b, h, self.capacity - 1, d), kv.dtype)
            buf[:, :, :n] = kv
            self.past[name] = buf
            self.length = n

    def feeds(self, token: int, names: set[str]) -> dict[str, Any]:
        if self.length >= self.capacity - 1:
            raise GraphoptError(f"static KV cache full ({self.capacity} slots)")
        feeds: dict[str, Any] = {"input_ids": np.array([[token]], dtype=np.int64), **self.past}
        if "attention_mask" in names:
            mask = np.zeros((1, self.capacity), dtype=np.int64)
            mask[0, :self.length] = 1
            mask[0, -1] = 1
            feeds["attention_mask"] = mask
        if "position_ids" in names:
            feeds["position_ids"] = np.array([[self.length]], dtype=np.int64)
        return feeds

    def advance(self, out: dict[str, Any]) -> None:
        """Moves each present's last slot (the new token) into the first free slot; the
        presents (arrays of this step's outputs, host or device) become the next past."""
        moves = []
        for name, present in self.pairs:
            kv = out[present]
            moves.append((kv[:, :, self.length], kv[:, :, self.capacity - 1]))
            self.past[name] = kv[:, :, :self.capacity - 1]
        if self.copy is not None:
            self.copy(moves)
        else:
            for dst, src in moves:
                dst[...] = src
        self.length += 1


def _growing_step(exe: Executable, static_out: dict, past: dict, token: int, position: int, names: set[str],
                  presents: frozenset[str]) -> dict | None:
    """Runs the first fixed-shape decode step again with the growing cache: None when the logits
    agree, else that step's outputs (decoding goes on from them, without the static cache)."""
    feeds = {"input_ids": np.array([[token]], dtype=np.int64), **past,
             "attention_mask": np.ones((1, position + 1), dtype=np.int64)}
    if "position_ids" in names:
        feeds["position_ids"] = np.array([[position]], dtype=np.int64)
    out = exe.step(feeds, keep=presents)
    want = np.asarray(_to_host(out["logits"]))
    got = np.asarray(_to_host(static_out["logits"]))
    scale = max(float(np.abs(want).max()), 1.0)
    return None if got.shape == want.shape and float(np.abs(got - want).max()) <= 1e-3 * scale else out


def static_kv_slots(tokens: int, steps: int) -> int:
    """A static KV capacity for ``tokens`` already in the cache and ``steps`` more (multiple of 64)."""
    return -(-(tokens + steps + 2) // 64) * 64


def _to_host(value: Any) -> np.ndarray:
    return value.get() if hasattr(value, "get") and not isinstance(value, np.ndarray) else np.asarray(value)


def generate(model: Model | str | os.PathLike, prompt_ids: list[int], max_new_tokens: int,
             target: str | Backend = "cpu", *, executable: Executable | None = None,
             eos_token_id: int | None = None, static_kv: int | None = None) -> list[int]:
    """Greedy decoding, batch 1, with the KV cache when the model has one.

    Models without ``past_key_values.*`` inputs are re-run on the whole sequence each step.
    ``static_kv``: decode steps after the prompt use fixed-size KV buffers of this many
    slots (:class:`StaticKV`), so every step has the same shapes (what a CUDA graph replays).
    """
    m = _as_model(model)
    names = set(input_names(m))
    if "input_ids" not in names or "logits" not in {t.name for t in m.graph.outputs}:
        raise GraphoptError("generate needs a model with an 'input_ids' input and a 'logits' output "
                            "(Hugging Face / optimum I/O names)")
    if not prompt_ids:
        raise GraphoptError("the prompt is empty")
    exe = executable or compile(m, target)
    pairs = _past_inputs(m)
    if static_kv is not None and (not pairs or "attention_mask" not in names):
        raise GraphoptError("static_kv needs a model with a KV cache and an attention_mask input")
    shapes = {t.name: t.shape for t in m.graph.inputs}
    dtypes = {t.name: (np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)) for t in m.graph.inputs}
    tokens = list(prompt_ids)
    past: dict[str, np.ndarray] = {}
    for name, _ in pairs:  # an empty cache: [1, kv_heads, 0, head_dim]
        dims = [d if isinstance(d, int) else 1 for d in (shapes[name] or [1, 1, 0, 1])]
        past[name] = np.zeros((1, dims[1], 0, dims[3]), dtype=dtypes[name])
    new: list[int] = []
    presents = frozenset(present for _, present in pairs)  # the KV cache may stay in the backend's memory
    static = StaticKV(pairs, static_kv, getattr(exe, "copy_many", None)) if static_kv is not None else None
    step_ids = tokens
    for i in range(max_new_tokens):
        if static is not None and i > 0:
            feeds = static.feeds(step_ids[0], names)
        elif pairs:
            p = len(tokens) - len(step_ids)
            feeds = {"input_ids": np.array([step_ids], dtype=np.int64)}
            total = p + len(step_ids)
            feeds.update(past)
        else:
            p, total = 0, len(tokens)
            feeds = {"input_ids": np.array([tokens], dtype=np.int64)}
            step_ids = tokens
        if static is None or i == 0:
            if "attention_mask" in names:
                feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
            if "position_ids" in names:
                feeds["position_ids"] = np.arange(p, total, dtype=np.int64)[None, :]
        out = exe.step(feeds, keep=presents)
        if static is not None and i == 1:
            growing = _growing_step(exe, out, past, step_ids[0], len(tokens) - 1, names, presents)
            if growing is not None:
                logger.warning("static KV cache: the first fixed-shape step disagrees with a growing cache "
                               "(a mask that depends on key positions, e.g. a sliding window); decoding without it")
                static, out = None, growing
        token = int(np.argmax(out["logits"][0, -1]))
        new.append(token)
        tokens.append(token)
        if static is not None and i > 0:
            static.advance(out)
        else:
            if static is not None:
                static.start(out)
            for name, present in pairs:
                past[name] = out[present]
        step_ids = [token]
        if eos_token_id is not None and token == eos_token_id:
            break
    return new
