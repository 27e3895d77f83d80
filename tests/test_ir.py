"""IR: loading (lazy external weights), saving (atomic, external data), copying."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphopt
from graphopt._ir import ExternalValues

from conftest import make_mlp, run_ort, save_external

_OPENED: list[str] = []
_RECORD = [False]


def _audit(event, args):
    if _RECORD[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


class _FileAccess:
    """Record every file Python opens inside the block (audit hook)."""

    def __enter__(self):
        _OPENED.clear()
        _RECORD[0] = True
        return _OPENED

    def __exit__(self, *exc):
        _RECORD[0] = False


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_does_not_read_external_weights(tmp_path):
    path = save_external(make_mlp(hidden=128), tmp_path / "m.onnx")
    data = str(tmp_path / "m.onnx.data")
    with _FileAccess() as opened:
        model = graphopt.load(path)
        consts = model.constants()
        info = [(t.shape, t.dtype) for t in consts.values()]  # metadata only
    assert not any(p.endswith("m.onnx.data") for p in opened), opened
    assert info
    w0 = consts["w0"]
    lazy = w0._values
    assert isinstance(lazy, ExternalValues) and lazy.loads == 0
    values = w0.values  # now the bytes are asked for
    assert lazy.loads == 1
    assert isinstance(values, np.memmap)
    expected = onnx.numpy_helper.to_array(make_mlp(hidden=128).graph.initializer[0])
    np.testing.assert_array_equal(values, expected)
    assert os.path.samefile(lazy.path, data)


def test_lazy_values_are_copy_on_write(tmp_path):
    path = save_external(make_mlp(), tmp_path / "m.onnx")
    before = _sha(tmp_path / "m.onnx.data")
    model = graphopt.load(path)
    w = model.constants()["w0"].values
    w[:] = 0.0  # a careless pass writing into a weight
    assert _sha(tmp_path / "m.onnx.data") == before


def test_round_trip_inline_and_outputs_match(tmp_path, mlp_proto):
    src = tmp_path / "in.onnx"
    onnx.save(mlp_proto, str(src))
    digest = _sha(src)
    model = graphopt.load(src)
    out = model.save(tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx.data").exists()
    assert _sha(src) == digest  # input never modified
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(out, {"x": x})["y"], run_ort(src, {"x": x})["y"])
    reloaded = onnx.load(str(out))
    assert reloaded.producer_name == "graphopt-tests"
    assert {o.domain: o.version for o in reloaded.opset_import} == {"": 18}


def test_big_inline_weights_are_read_in_place(tmp_path, mlp_proto, monkeypatch):
    """Past LAZY_LOAD_BYTES a file's inline weights are memory-mapped where they lie (no
    protobuf copy); values, saving (streamed, still inline) and outputs are unchanged."""
    import graphopt._ir as ir
    import graphopt._wire as wire

    monkeypatch.setattr(ir, "LAZY_LOAD_BYTES", 0)
    monkeypatch.setattr(wire, "MIN_PAYLOAD", 1024)
    src = tmp_path / "in.onnx"
    onnx.save(mlp_proto, str(src))
    model = graphopt.load(src)
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in mlp_proto.graph.initializer}
    lazy = {n: t._values for n, t in model.constants().items() if isinstance(t._values, ExternalValues)}
    assert sorted(lazy) == ["w0", "w1", "w2"] and all(v.path == src.resolve() for v in lazy.values())
    assert not model.source_external_data  # saved inline again, like the source
    for name, t in model.constants().items():
        assert np.array_equal(t.values, expected[name]) and t.values.dtype == expected[name].dtype
    out = model.save(tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx.data").exists()
    reloaded = onnx.load(str(out))
    onnx.checker.check_model(reloaded)
    assert {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in reloaded.graph.initializer} == \
        {n: a.tobytes() for n, a in expected.items()}
    assert reloaded.producer_name == "graphopt-tests"
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(out, {"x": x})["y"], run_ort(src, {"x": x})["y"])


def test_save_streams_external_data_to_new_location(tmp_path):
    src_dir, dst_dir = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    dst_dir.mkdir()
    src = save_external(make_mlp(), src_dir / "m.onnx")
    digests = {p.name: _sha(p) for p in src_dir.iterdir()}
    model = graphopt.load(src)
    out = model.save(dst_dir / "opt.onnx")  # auto: the source used external data
    assert (dst_dir / "opt.onnx.data").is_file()
    proto = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"opt.onnx.data"}
    assert all(t.name for t in proto.graph.initializer)
    assert {p.name: _sha(p) for p in src_dir.iterdir()} == digests
    # still loadable and numerically identical after the source is gone
    for p in src_dir.iterdir():
        p.unlink()
    x = np.ones((2, 64), np.float32)
    ref = run_ort(save_external(make_mlp(), tmp_path / "ref.onnx"), {"x": x})
    np.testing.assert_array_equal(run_ort(out, {"x": x})["y"], ref["y"])


def test_save_external_data_explicitly(tmp_path, mlp_proto):
    model = graphopt.Model.from_proto(mlp_proto)
    out = model.save(tmp_path / "m.onnx", external_data=True)
    proto = onnx.load(str(out), load_external_data=False)
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t.name for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert sorted(external) == ["w0", "w1", "w2"]
    assert sorted(inline) == ["half", "two"]  # tiny tensors stay inline
    offsets = [int(e.value) for t in proto.graph.initializer for e in t.external_data if e.key == "offset"]
    assert all(o % 4096 == 0 for o in offsets)


def test_large_models_switch_to_external_data(tmp_path, mlp_proto, monkeypatch):
    import graphopt._ir as ir

    monkeypatch.setattr(ir, "EXTERNAL_DATA_THRESHOLD", 10_000)  # pretend 10 kB is "over 2 GB"
    out = graphopt.Model.from_proto(mlp_proto).save(tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    monkeypatch.setattr(ir, "EXTERNAL_DATA_THRESHOLD", 10**12)
    graphopt.Model.from_proto(mlp_proto).save(tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()
    assert out.is_file()


def test_failed_save_leaves_no_file(tmp_path):
    src = save_external(make_mlp(), tmp_path / "m.onnx")
    model = graphopt.load(src)
    # The external data shrinks under our feet: streaming it must fail mid-save.
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:5000])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(graphopt.ModelSaveError, match=r"cannot save to .*out.onnx: external data file .* ends early"):
        model.save(out_dir / "out.onnx", external_data=True)
    assert list(out_dir.iterdir()) == []
    with pytest.raises(graphopt.ModelSaveError):
        model.save(out_dir / "out.onnx", external_data=False)
    assert list(out_dir.iterdir()) == []


def test_failed_save_keeps_previous_output(tmp_path, mlp_proto):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")
    model = graphopt.Model.from_proto(mlp_proto)
    model.graph.nodes[0].inputs[1].values = np.zeros((3, 3), dtype=object)  # cannot be serialized
    with pytest.raises(graphopt.ModelSaveError):
        model.save(target)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_save_flushes_in_the_background(tmp_path, monkeypatch, external):
    """Every FLUSH_BYTES written, a background fdatasync starts (one at a time); the bytes are the
    same as a save that flushes only at the end, and both files still get a final fsync."""
    import graphopt._ir as ir

    src = save_external(make_mlp(hidden=96), tmp_path / "m.onnx")  # external: streamed by copy_file_range
    graphopt.load(src).save(tmp_path / "plain.onnx", external_data=external)
    calls, running = [], []
    real = os.fdatasync

    def fdatasync(fd):
        running.append(fd)
        calls.append(len(running))
        real(fd)
        running.remove(fd)

    monkeypatch.setattr(ir._Output, "FLUSH_BYTES", 4096)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    graphopt.load(src).save(tmp_path / "flushed.onnx", external_data=external)
    assert calls and max(calls) == 1  # 3 weights of 36 KiB: flushed while saving, never two at once
    suffix = ".onnx.data" if external else ".onnx"
    assert (tmp_path / f"flushed{suffix}").read_bytes() == (tmp_path / f"plain{suffix}").read_bytes()


def test_failed_background_flush_fails_the_save(tmp_path, monkeypatch):
    import graphopt._ir as ir

    model = graphopt.Model.from_proto(make_mlp(hidden=96))
    monkeypatch.setattr(ir._Output, "FLUSH_BYTES", 4096)

    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(graphopt.ModelSaveError, match=r"cannot save to .*out.onnx: OSError: \[Errno 5\] Input/output error"):
        model.save(tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: d / "missing.onnx", r"cannot load .*missing.onnx: no such file"),
        (lambda d: d, r"it is a directory"),
        (lambda d: _write(d / "t.onnx", b"hello, not a model"), r"not an ONNX model"),
        (lambda d: _write(d / "e.onnx", b""), r"not an ONNX model"),
    ],
    ids=["missing", "directory", "text", "empty"],
)
def test_load_errors(tmp_path, setup, message):
    with pytest.raises(graphopt.ModelLoadError, match=message):
        graphopt.load(setup(tmp_path))


def test_load_error_missing_external_data(tmp_path):
    src = save_external(make_mlp(), tmp_path / "m.onnx")
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(graphopt.ModelLoadError, match=r"refers to external data 'm.onnx.data', which does not exist"):
        graphopt.load(src)


def test_copy_is_independent(mlp_proto):
    model = graphopt.Model.from_proto(mlp_proto)
    clone = model.copy()
    clone.graph.nodes.pop()
    clone.opset_imports[""] = 23
    assert model.node_count() == len(mlp_proto.graph.node)
    assert model.opset() == 18
    assert clone.node_count() == model.node_count() - 1


def test_fixture_set_is_complete():
    from conftest import FIXTURE_MODELS

    names = {p.name for p in FIXTURE_MODELS}
    expected = {f"{m}-{e}-{g}.onnx" for m in ("llama", "qwen2") for e in ("dynamo", "torchscript")
                for g in ("prefill", "decode")}
    assert expected <= names, f"missing fixtures: {sorted(expected - names)}; run tests/fixtures/export.py"
    for p in FIXTURE_MODELS:
        assert p.with_suffix(".npz").is_file(), p


def test_sample_elements_reads_external_weights_without_mapping_them(tmp_path):
    from graphopt._ir import sample_elements

    src = save_external(make_mlp(), tmp_path / "m.onnx")  # onnx.save moves the proto's data out
    external = {t.name: t for t in graphopt.load(src).constants().values()}
    memory = {t.name: t for t in graphopt.Model.from_proto(make_mlp()).constants().values()}
    rows, cols = np.array([0, 63, 5, 5]), np.array([0, 63, 17, 0])
    for name in ("w0", "w2"):
        assert isinstance(external[name]._values, ExternalValues)
        expected = np.asarray(memory[name].values)[rows, cols]
        np.testing.assert_array_equal(sample_elements(external[name], rows, cols), expected)
        np.testing.assert_array_equal(sample_elements(memory[name], rows, cols), expected)
        assert external[name]._values.loads == 0  # never mapped
