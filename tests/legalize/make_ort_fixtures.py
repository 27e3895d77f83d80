"""Write ``tests/fixtures/ort-*.onnx``: fixtures run through onnxruntime's own tools.

These are the models graphopt must take from onnxruntime users: the output of
onnxruntime's transformers optimizer (``com.microsoft`` fused ops) and of its
``MatMulNBitsQuantizer`` (``com.microsoft::MatMulNBits``). The tests
(``tests/legalize/test_ort_tool_models.py``) run them on graphopt's cpu backend, which
legalizes them, against onnxruntime on the same model; inputs and torch outputs come
from the source fixture's ``.npz``.

Run from the repository root (about 2 s)::

    python tests/legalize/make_ort_fixtures.py            # writes into tests/fixtures/
    python tests/legalize/make_ort_fixtures.py --out DIR

Needs onnxruntime plus what its tools import: ``sympy`` (the transformers optimizer's
symbolic shape inference) and ``onnx-ir`` (the quantizer). Not torch:
``optimize_model(opt_level=2)`` imports torch only to read ``torch.version.hip`` when it
picks a GPU provider, so without torch a stand-in module answers that (CPU only here).

File names have a single ``-`` so the ``*-*-*.onnx`` glob of exported fixtures in
``tests/conftest.py`` does not pick them up.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import onnx

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@dataclass(frozen=True)
class OrtFixture:
    source: str  # the exported fixture it is made of (its .npz holds inputs and torch outputs)
    #: onnxruntime.transformers.optimizer.optimize_model(model_type=…, opt_level=…), or None
    model_type: str | None = None
    opt_level: int = 2
    #: MatMulNBitsQuantizer (4 bits, block 32, accuracy_level 0), symmetric or with zero points; None: not run
    nbits_symmetric: bool | None = None
    #: contrib ops onnxruntime's tools wrote (op → count), checked by the tests
    contrib: tuple[tuple[str, int], ...] = ()

    @property
    def quantized(self) -> bool:
        return self.nbits_symmetric is not None


MS = "com.microsoft"
FIXTURES_MADE = {
    # transformers optimizer on an opset-18 dynamo export
    "ort-qwen2_dynamo_decode_fused": OrtFixture(
        "qwen2-dynamo-decode", model_type="qwen3",
        contrib=(("SimplifiedLayerNormalization", 1), (f"{MS}::SkipSimplifiedLayerNormalization", 4),
                 (f"{MS}::QuickGelu", 2))),
    # transformers optimizer, then 4-bit MatMulNBits with zero points, on an opset-17 torchscript export
    # (no value_info on intermediates: types must be inferred again between split-back nodes)
    "ort-qwen2_torchscript_decode_fused_nbits4": OrtFixture(
        "qwen2-torchscript-decode", model_type="qwen3", nbits_symmetric=False,
        contrib=(("SimplifiedLayerNormalization", 1), (f"{MS}::SkipSimplifiedLayerNormalization", 4),
                 (f"{MS}::QuickGelu", 2), (f"{MS}::MatMulNBits", 15))),
    # symmetric 4-bit MatMulNBits alone
    "ort-llama_dynamo_decode_nbits4": OrtFixture(
        "llama-dynamo-decode", nbits_symmetric=True, contrib=((f"{MS}::MatMulNBits", 15),)),
}

NUM_HEADS, HIDDEN = 4, 64  # tests/fixtures/README.md: the shared config


@contextlib.contextmanager
def _torch_stand_in():
    if importlib.util.find_spec("torch") is not None:
        yield
        return
    stub = types.ModuleType("torch")
    stub.version = types.SimpleNamespace(hip=None, cuda=None)
    sys.modules["torch"] = stub
    try:
        yield
    finally:
        if sys.modules.get("torch") is stub:
            del sys.modules["torch"]


def build(name: str) -> onnx.ModelProto:
    """The model ``name`` as onnxruntime's tools make it from its source fixture."""
    spec = FIXTURES_MADE[name]
    source = str(FIXTURES / f"{spec.source}.onnx")
    model = onnx.load(source)
    if spec.model_type is not None:
        from onnxruntime.transformers.optimizer import optimize_model

        with _torch_stand_in():  # given a path: from a ModelProto it loses the weights on the way
            model = optimize_model(source, model_type=spec.model_type, num_heads=NUM_HEADS, hidden_size=HIDDEN,
                                   opt_level=spec.opt_level, use_gpu=False).model
    if spec.quantized:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=spec.nbits_symmetric,
                                         accuracy_level=0)
        quantizer.process()
        model = quantizer.model.model
    model.producer_name = "graphopt-tests (onnxruntime tools)"
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIXTURES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in FIXTURES_MADE:
        path = args.out / f"{name}.onnx"
        onnx.save(build(name), str(path))
        print(f"{path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
