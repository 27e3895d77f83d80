"""Proving a graph right: ``verify`` (compare two models) and ``generate`` (greedy decoding)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np

from graphopt._api import _as_model, compile, get_backend
from graphopt._backend import Backend, Executable
from graphopt._errors import GraphoptError
from graphopt._inputs import PAST_RE, InputSpec, build_inputs, has_kv_cache
from graphopt._ir import Model


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


def generate(model: Model | str | os.PathLike, prompt_ids: list[int], max_new_tokens: int,
             target: str | Backend = "cpu", *, executable: Executable | None = None,
             eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding, batch 1, with the KV cache when the model has one.

    Models without ``past_key_values.*`` inputs are re-run on the whole sequence each step.
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
    shapes = {t.name: t.shape for t in m.graph.inputs}
    dtypes = {t.name: (np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)) for t in m.graph.inputs}
    tokens = list(prompt_ids)
    past: dict[str, np.ndarray] = {}
    for name, _ in pairs:  # an empty cache: [1, kv_heads, 0, head_dim]
        dims = [d if isinstance(d, int) else 1 for d in (shapes[name] or [1, 1, 0, 1])]
        past[name] = np.zeros((1, dims[1], 0, dims[3]), dtype=dtypes[name])
    new: list[int] = []
    presents = frozenset(present for _, present in pairs)  # the KV cache may stay in the backend's memory
    step_ids = tokens
    for _ in range(max_new_tokens):
        if pairs:
            p = len(tokens) - len(step_ids)
            feeds = {"input_ids": np.array([step_ids], dtype=np.int64)}
            total = p + len(step_ids)
            feeds.update(past)
        else:
            p, total = 0, len(tokens)
            feeds = {"input_ids": np.array([tokens], dtype=np.int64)}
            step_ids = tokens
        if "attention_mask" in names:
            feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(p, total, dtype=np.int64)[None, :]
        out = exe.step(feeds, keep=presents)
        token = int(np.argmax(out["logits"][0, -1]))
        new.append(token)
        tokens.append(token)
        for name, present in pairs:
            past[name] = out[present]
        step_ids = [token]
        if eos_token_id is not None and token == eos_token_id:
            break
    return new
