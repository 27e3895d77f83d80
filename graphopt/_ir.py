"""The IR: an onnx-graphsurgeon graph plus what a graph alone lacks.

:class:`Model` keeps the opset imports, the model-level metadata and where the
model came from. Weights stay where they are until a pass asks for their
values: tensors in external data files are wrapped in :class:`ExternalValues`,
which records the file, offset and length and memory-maps (copy-on-write) only
when ``.load()`` is called. Saving streams those bytes from the source file to
the new one, so a multi-GB model is never held in memory to be re-written.

Saving is atomic: everything is written to temporary files beside the target,
flushed, then renamed into place; on any failure the temporaries are removed
and no output file appears. The input file is opened read-only and never
written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import TensorProto
from onnx.external_data_helper import ExternalDataInfo, uses_external_data
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from graphopt._errors import ModelLoadError, ModelSaveError
from graphopt._wire import _GRAPH_INITIALIZER, _MODEL_GRAPH, _TENSOR_RAW_DATA, load_lazily

logger = logging.getLogger(__name__)

#: Protobuf refuses messages of 2 GiB or more; stay well clear of it.
PROTOBUF_LIMIT = 2**31 - 1
#: Models whose tensors add up to more than this are saved with external data.
EXTERNAL_DATA_THRESHOLD = 2**31 - 256 * 2**20
#: Tensors smaller than this stay inside the .onnx file when saving externally.
EXTERNAL_MIN_BYTES = 1024
#: Offsets in external data files are aligned so each tensor can be mmapped.
ALIGNMENT = 4096
_COPY_CHUNK = 64 * 2**20
#: Files at least this large are read without copying their inline weights (see _wire.py).
LAZY_LOAD_BYTES = 64 * 2**20

# onnx dtypes a numpy memmap can represent byte-for-byte.
_MEMMAPPABLE = {
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16,
    TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
    TensorProto.INT32, TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64,
    TensorProto.BOOL,
}
# 4-bit numpy dtypes (ml_dtypes) that ONNX stores two to a byte.
_PACKED_TYPES = {"int4", "uint4"}
# numpy scalar types whose arrays are an ONNX tensor's raw_data byte for byte.
_NUMPY_TYPES = {onnx.helper.tensor_dtype_to_np_dtype(t).type: t for t in _MEMMAPPABLE}


def array_view(t: gs.Constant) -> np.ndarray:
    """A constant's values without copying them where possible: a read-only view of an
    inline tensor's bytes, a memory map of an external one. Does not replace the lazy
    values (reading ``t.values`` would), so export stays byte-for-byte."""
    return values_view(t._values)


def sample_elements(t: gs.Constant, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Elements (rows[k], cols[k]) of a 2-D constant, without mapping an external one."""
    v = t._values
    if isinstance(v, ExternalValues) and v.data_type in _MEMMAPPABLE and len(v.tensor.dims) == 2:
        return v.elements(rows, cols)
    return np.ascontiguousarray(values_view(v)[rows, cols])


def values_view(v) -> np.ndarray:
    """:func:`array_view` of a constant's values object (lazy or an array)."""
    if isinstance(v, ConcatValues):
        return v.load()
    if isinstance(v, ExternalValues) or not isinstance(v, LazyValues):
        return v.view() if isinstance(v, ExternalValues) else np.asarray(v)
    tp = v.tensor
    if tp.HasField("raw_data") and tp.data_type in _MEMMAPPABLE:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tp.data_type)
        return np.frombuffer(tp.raw_data, dtype=dtype).reshape(tuple(tp.dims))
    return v.load()


#: Linux 5.14+: map every page of a file mapping at once (not in Python's mmap module yet).
_MADV_POPULATE_READ = 22


def populate(values: np.ndarray) -> None:
    """Before reading all of a memory-mapped array: map its pages in one call instead of one
    page fault per 4 KiB (~8 % of the quantize pass's arithmetic on a cached file). A no-op
    for arrays in memory and on kernels without it."""
    while values is not None and not isinstance(values, np.memmap):
        values = values.base if isinstance(values.base, np.ndarray) else None
    mm = getattr(values, "_mmap", None)
    if mm is not None:
        try:
            mm.madvise(_MADV_POPULATE_READ)
        except (OSError, ValueError, AttributeError):
            pass


def tensor_nbytes(t: TensorProto) -> int:
    """Bytes of a tensor's data as stored (packed for 4-bit types)."""
    numel = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    bits = {
        TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.FLOAT4E2M1: 4,
    }.get(t.data_type)
    if bits is not None:
        return (numel * bits + 7) // 8
    if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return 0
    return numel * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


class ExternalValues(LazyValues):
    """Values of one tensor stored in an external data file, read on demand.

    ``load()`` memory-maps the bytes copy-on-write, so a pass that reads a
    weight touches only the pages it reads and can never write to the source
    file. :meth:`iter_bytes` streams the raw bytes without mapping them, which
    keeps the resident set small while saving or hashing.
    """

    def __init__(self, tensor: TensorProto, base_dir: Path):
        super().__init__(tensor)
        info = ExternalDataInfo(tensor)
        self.path = (base_dir / info.location).resolve()
        self.offset = int(info.offset or 0)
        self.length = int(info.length) if info.length else tensor_nbytes(tensor)
        self.data_type = tensor.data_type
        self.loads = 0  # how often values were materialised (tests, stats)
        #: The bytes sit inside the .onnx file itself (an inline tensor read in place).
        self.inline = False

    def load(self) -> np.ndarray:
        """The values: a memory map of external data; a copy in memory for an inline tensor
        read in place (see :mod:`graphopt._wire`), as ``onnx.load`` would have made: kernels
        run faster on aligned anonymous memory than on page-cache pages."""
        values = self.view()
        return np.array(values) if self.inline or not values.flags.aligned else values

    def view(self) -> np.ndarray:
        """The values memory-mapped in place (possibly unaligned), never copied."""
        self.loads += 1
        shape = tuple(int(d) for d in self.tensor.dims)
        if self.data_type in _MEMMAPPABLE and self.length > 0:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(self.data_type)
            return np.memmap(self.path, dtype=dtype, mode="c", offset=self.offset, shape=shape)
        # Types numpy cannot map directly (bfloat16, float8, int4, ...): let onnx decode.
        copy = TensorProto()
        copy.CopyFrom(self.tensor)
        del copy.external_data[:]
        copy.data_location = TensorProto.DEFAULT
        copy.raw_data = b"".join(self.iter_bytes())
        return onnx.numpy_helper.to_array(copy)

    def elements(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The elements at (rows[k], cols[k]) of a 2-D tensor, each read with ``pread``: a few
        samples of a weight cost a few system calls, not a page fault (and a mapping) each."""
        dims = [int(d) for d in self.tensor.dims]
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.data_type))
        flat = (np.asarray(rows, np.int64) * dims[1] + np.asarray(cols, np.int64)) * dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            raw = b"".join(os.pread(fd, dtype.itemsize, self.offset + int(o)) for o in flat)
        finally:
            os.close(fd)
        if len(raw) != len(flat) * dtype.itemsize:
            raise ModelLoadError(f"external data file {self.path} ends early: tensor {self.tensor.name!r}")
        return np.frombuffer(raw, dtype=dtype)

    def iter_bytes(self, chunk: int = _COPY_CHUNK) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            left = self.length
            while left > 0:
                block = f.read(min(chunk, left))
                if not block:
                    raise ModelSaveError(
                        f"external data file {self.path} ends early: tensor {self.tensor.name!r} "
                        f"needs {self.length} bytes at offset {self.offset}"
                    )
                left -= len(block)
                yield block

    def __str__(self) -> str:
        return f"ExternalValues({self.path.name}@{self.offset}, shape={self.shape}, dtype={self.dtype})"


class BuiltValues(LazyValues):
    """Values graphopt made (not read from a file) whose TensorProto header is known at once
    and whose bytes, as ONNX stores them, come on demand from :meth:`payload`. Export and
    ``load()`` read ``tensor``, a complete TensorProto built when asked; saving writes the
    payload straight to the file (:meth:`write_to`) and export never touches it."""

    #: Whether the bytes are still being computed when made (see :class:`RawValues`).
    deferred = False

    def __init__(self, name: str, dims: list[int], data_type: int):
        from onnx_graphsurgeon.importers.onnx_importer import get_onnx_tensor_dtype

        self.header = TensorProto(name=name, dims=dims, data_type=data_type)
        self.shape = tuple(dims)
        self.dtype = get_onnx_tensor_dtype(self.header)
        self.nbytes = tensor_nbytes(self.header)

    def payload(self) -> np.ndarray:
        """The tensor's bytes as stored, as a C-contiguous array."""
        raise NotImplementedError

    def write_to(self, out) -> int:
        """Write the bytes to the file ``out``; returns how many."""
        out.write(memoryview(self.payload()).cast("B"))
        return self.nbytes

    @property
    def tensor(self) -> TensorProto:
        full = TensorProto()
        full.CopyFrom(self.header)
        full.raw_data = self.payload().tobytes()
        return full

    @tensor.setter
    def tensor(self, value: TensorProto) -> None:  # LazyValues.__init__ assigns it
        self.header = value

    def _sized(self, raw: np.ndarray) -> np.ndarray:
        if raw.nbytes != self.nbytes:
            raise ValueError(f"{self.header.name}: {raw.nbytes} bytes for a tensor of {self.nbytes}")
        return raw


class RawValues(BuiltValues):
    """Values already in ONNX's byte layout (e.g. packed INT4 codes) held in a numpy buffer.

    ``raw`` may also be a :class:`concurrent.futures.Future` of the buffer, still being computed
    (the quantize pass's arithmetic runs on a pool while the pipeline goes on): shape, dtype
    and size are known at once, the bytes are waited for when first read. Saving writes such
    payloads after the ready ones, in ``order`` (the order they were submitted), so the file
    is the same whichever finishes first and the disk is busy while they are computed."""

    def __init__(self, name: str, dims: list[int], data_type: int, raw: np.ndarray | Future,
                 order: int = 0):
        super().__init__(name, dims, data_type)
        #: Whether the bytes were given as a future (saving's order depends on it, not on
        #: whether they have been read since, so the file is always the same).
        self.deferred = isinstance(raw, Future)
        self._raw = raw if self.deferred else self._sized(np.ascontiguousarray(raw))
        self.order = order

    @property
    def raw(self) -> np.ndarray:
        """The bytes (waits for them if they are still being computed)."""
        if isinstance(self._raw, Future):
            self._raw = self._sized(np.ascontiguousarray(self._raw.result()).reshape(-1).view(np.uint8))
        return self._raw

    def payload(self) -> np.ndarray:
        return self.raw


class ConcatValues(BuiltValues):
    """2-D constants joined along their last axis (``matmul-merge``'s merged weight), kept as
    their parts: nothing is joined in memory until a reader asks for the values, and saving
    streams the joined rows a block at a time. A merged fp32 model is then never held twice."""

    #: Bytes of joined rows saving writes at a time.
    BLOCK_BYTES = 4 * 2**20

    def __init__(self, name: str, parts: list):
        shapes = [tuple(p.shape) for p in parts]  # lazy values and arrays both know shape and dtype
        dtype = np.dtype(parts[0].dtype)
        if any(len(sh) != 2 or sh[0] != shapes[0][0] for sh in shapes) or any(np.dtype(p.dtype) != dtype
                                                                                for p in parts):
            raise ValueError("ConcatValues joins 2-D arrays with the same rows and dtype")
        super().__init__(name, [int(shapes[0][0]), sum(int(sh[1]) for sh in shapes)],
                         onnx.helper.np_dtype_to_tensor_dtype(dtype))
        self.parts = list(parts)

    def load(self) -> np.ndarray:
        return np.concatenate([values_view(p) for p in self.parts], axis=1)

    def payload(self) -> np.ndarray:
        return self.load()

    def write_to(self, out) -> int:
        """Write the joined values' bytes to the file ``out``, a block of rows at a time."""
        views = [values_view(p) for p in self.parts]
        rows = max(1, self.BLOCK_BYTES // max(1, self.nbytes // max(1, self.shape[0])))
        for r0 in range(0, self.shape[0], rows):
            out.write(memoryview(np.concatenate([w[r0:r0 + rows] for w in views], axis=1)).cast("B"))
        return self.nbytes


@dataclass
class _Payload:
    """A constant's values as held (restored after export) and its bytes as written: an
    :class:`ExternalValues` (streamed from its file), an inline tensor's raw bytes or a
    C-contiguous numpy array."""

    values: object
    data: object


@dataclass
class Model:
    """An ONNX model being optimized: a graphsurgeon graph plus model-level facts."""

    graph: gs.Graph
    opset_imports: dict[str, int]
    ir_version: int = onnx.IR_VERSION
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata_props: dict[str, str] = field(default_factory=dict)
    #: Where the model was loaded from (None for a model built in memory).
    source: Path | None = None
    #: Whether the source stored weights in external data files.
    source_external_data: bool = False
    #: Per-pass statistics of every pipeline run on this model (appended).
    history: list = field(default_factory=list)
    #: Explanations passes left (why a candidate was not rewritten), with --explain.
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ load
    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, base_dir: Path | None = None,
                   source: Path | None = None) -> Model:
        """Wrap a ModelProto. Initializers with external data resolve against ``base_dir``."""
        # graphsurgeon warns on stdout about things graphopt handles itself (missing
        # opset imports, dtypes numpy lacks); keep only its errors.
        with G_LOGGER.suppress(G_LOGGER.ERROR):
            graph = gs.import_onnx(proto)
        for node_proto, node in zip(proto.graph.node, graph.nodes):
            meta = {p.key: p.value for p in node_proto.metadata_props if p.key.startswith("graphopt.")}
            if meta:
                node.meta = meta
        external = False
        if base_dir is not None:
            protos = {t.name: t for t in proto.graph.initializer}
            for tensor in graph.tensors().values():
                if not isinstance(tensor, gs.Constant):
                    continue
                values = tensor._values
                if isinstance(values, LazyValues) and uses_external_data(values.tensor):
                    tp = protos.get(tensor.name, values.tensor)
                    tensor._values = ExternalValues(tp, base_dir)
                    external = True
        return cls(
            graph=graph,
            opset_imports={o.domain: o.version for o in proto.opset_import},
            ir_version=proto.ir_version,
            producer_name=proto.producer_name,
            producer_version=proto.producer_version,
            domain=proto.domain,
            model_version=proto.model_version,
            doc_string=proto.doc_string,
            metadata_props={p.key: p.value for p in proto.metadata_props},
            source=source,
            source_external_data=external,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Model:
        """Load an ONNX file without reading its external weights."""
        path = Path(path)
        if not path.exists():
            raise ModelLoadError(f"cannot load {path}: no such file")
        if path.is_dir():
            raise ModelLoadError(f"cannot load {path}: it is a directory, expected an .onnx file")
        try:
            proto = load_lazily(path) if path.stat().st_size >= LAZY_LOAD_BYTES else None
            if proto is None:
                proto = onnx.load(str(path), load_external_data=False)
        except (DecodeError, RuntimeError, ValueError) as e:
            raise ModelLoadError(f"cannot load {path}: not an ONNX model ({type(e).__name__})") from e
        except OSError as e:
            raise ModelLoadError(f"cannot load {path}: {e.strerror or e}") from e
        if not proto.HasField("graph") or proto.ir_version == 0:
            raise ModelLoadError(f"cannot load {path}: not an ONNX model (no graph or IR version)")
        base_dir = path.resolve().parent
        for t in proto.graph.initializer:
            if uses_external_data(t):
                loc = base_dir / ExternalDataInfo(t).location
                if not loc.is_file():
                    raise ModelLoadError(
                        f"cannot load {path}: tensor {t.name!r} refers to external data "
                        f"{ExternalDataInfo(t).location!r}, which does not exist beside the model"
                    )
        try:
            model = cls.from_proto(proto, base_dir=base_dir, source=path.resolve())
        except Exception as e:  # graphsurgeon rejects some malformed graphs
            raise ModelLoadError(f"cannot load {path}: malformed graph ({type(e).__name__}: {e})") from e
        # Inline weights read in place are not external data: saving keeps them inline.
        external = [t._values for t in model.constants().values() if isinstance(t._values, ExternalValues)]
        for v in external:
            v.inline = v.path == model.source
        model.source_external_data = any(not v.inline for v in external)
        return model

    # ------------------------------------------------------------ inspection
    @property
    def nodes(self) -> list[gs.Node]:
        return self.graph.nodes

    def node_count(self) -> int:
        return len(self.graph.nodes)

    def op_histogram(self) -> Counter:
        return Counter(
            f"{n.domain}::{n.op}" if (n.domain or "") not in ("", "ai.onnx") else n.op
            for n in self.graph.nodes
        )

    def constants(self) -> dict[str, gs.Constant]:
        return {n: t for n, t in self.graph.tensors().items() if isinstance(t, gs.Constant)}

    def opset(self, domain: str = "") -> int | None:
        return self.opset_imports.get(domain)

    # ------------------------------------------------------------------ copy
    def copy(self) -> Model:
        """A copy whose graph can be edited freely. Weight arrays are shared, not copied:
        passes replace a constant's values, they never write into them."""
        graph = self.graph.copy()
        for old, new in zip(self.graph.nodes, graph.nodes):
            if hasattr(old, "meta"):
                new.meta = dict(old.meta)
        graph.producer_name = self.graph.producer_name
        graph.producer_version = self.graph.producer_version
        return dataclasses.replace(
            self, graph=graph, opset_imports=dict(self.opset_imports), metadata_props=dict(self.metadata_props),
            history=list(self.history), notes=list(self.notes),
        )

    # ---------------------------------------------------------------- export
    def to_onnx(self) -> onnx.ModelProto:
        """Export to a ModelProto. External weights stay external references to the source."""
        self.graph.toposort()
        self.graph.opset = self.opset_imports.get("", self.graph.opset)
        proto = gs.export_onnx(
            self.graph,
            do_type_check=False,
            opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in sorted(self.opset_imports.items())],
        )
        for node, node_proto in zip(self.graph.nodes, proto.graph.node):
            for k, v in getattr(node, "meta", {}).items():
                node_proto.metadata_props.add(key=k, value=str(v))
        proto.ir_version = self.ir_version
        proto.producer_name = self.producer_name
        proto.producer_version = self.producer_version
        proto.domain = self.domain
        proto.model_version = self.model_version
        proto.doc_string = self.doc_string
        del proto.metadata_props[:]
        for k, v in self.metadata_props.items():
            proto.metadata_props.add(key=k, value=v)
        return proto

    def to_onnx_without_weights(self, keep_below: int = EXTERNAL_MIN_BYTES) -> onnx.ModelProto:
        """A ModelProto where every weight of ``keep_below`` bytes or more is a typed graph
        input instead of an initializer: cheap to check and shape-infer on any model size."""
        swapped = []
        for t in self.constants().values():  # big weights: export dims and dtype only, never bytes
            v = t._values
            if isinstance(v, np.ndarray) and v.nbytes >= keep_below and v.dtype.kind in "biufc":
                dims, data_type = list(v.shape), onnx.helper.np_dtype_to_tensor_dtype(v.dtype)
            elif isinstance(v, BuiltValues) and v.nbytes >= keep_below:
                dims, data_type = list(v.header.dims), v.header.data_type
            elif isinstance(v, LazyValues) and not isinstance(v, (ExternalValues, BuiltValues)) and \
                    tensor_nbytes(v.tensor) >= keep_below:
                dims, data_type = list(v.tensor.dims), v.tensor.data_type
            else:
                continue
            stub = TensorProto(name=t.name, dims=dims, data_type=data_type)
            stub.data_location = TensorProto.EXTERNAL
            stub.external_data.add(key="location", value="<in memory>")
            swapped.append((t, v))
            t._values = LazyValues(stub)
        try:
            proto = self.to_onnx()
        finally:
            for t, v in swapped:
                t._values = v
        keep, moved = [], []
        for t in proto.graph.initializer:
            (moved if uses_external_data(t) or tensor_nbytes(t) >= keep_below else keep).append(t)
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
        for t in moved:
            proto.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        return proto

    # ------------------------------------------------------------------ save
    def _payloads(self) -> list[tuple[gs.Constant, _Payload, TensorProto]]:
        """Constants of at least ``EXTERNAL_MIN_BYTES`` whose bytes saving writes straight to
        the file instead of through a TensorProto copy, each with a data-less TensorProto to
        export in its place."""
        found = []
        for t in self.constants().values():
            v = t._values
            if isinstance(v, ExternalValues):
                payload, dims, data_type = v, list(v.tensor.dims), v.tensor.data_type
            elif isinstance(v, BuiltValues):
                if v.nbytes < EXTERNAL_MIN_BYTES and not v.deferred:  # deferred: not waited for by export
                    continue
                payload, dims, data_type = v, list(v.header.dims), v.header.data_type
            elif isinstance(v, LazyValues):
                tp = v.tensor
                if uses_external_data(tp) or not tp.HasField("raw_data") or tensor_nbytes(tp) < EXTERNAL_MIN_BYTES:
                    continue
                payload, dims, data_type = tp.raw_data, list(tp.dims), tp.data_type
            elif isinstance(v, np.ndarray) and v.dtype.name in _PACKED_TYPES:
                # 4-bit values read back as an array (gs's ``values`` replaces the lazy bytes with
                # one byte per element, which its exporter writes unpacked): pack them again.
                tp = onnx.numpy_helper.from_array(v, t.name)
                payload, dims, data_type = tp.raw_data, list(tp.dims), tp.data_type
            elif isinstance(v, np.ndarray) and v.dtype.type in _NUMPY_TYPES and v.dtype.isnative and \
                    v.nbytes >= EXTERNAL_MIN_BYTES:
                payload, dims, data_type = np.ascontiguousarray(v), list(v.shape), _NUMPY_TYPES[v.dtype.type]
            else:
                continue
            stub = TensorProto(name=t.name, dims=dims, data_type=data_type)
            stub.data_location = TensorProto.EXTERNAL
            stub.external_data.add(key="location", value="<payload>")
            found.append((t, _Payload(v, payload), stub))
        return found

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
        """Write the model atomically.

        ``external_data``: True writes tensors of at least 1 KiB to ``<name>.data``
        beside the model; False keeps everything in the .onnx file; None (default)
        chooses external data when the source used it or when the tensors would pass
        protobuf's 2 GiB limit.
        """
        path = Path(path)
        if path.exists() and path.is_dir():
            raise ModelSaveError(f"cannot save to {path}: it is a directory")
        if not path.parent.exists():
            raise ModelSaveError(f"cannot save to {path}: directory {path.parent} does not exist")
        payloads = self._payloads()
        for t, _, stub in payloads:
            t._values = LazyValues(stub)
        try:
            proto = self.to_onnx()
        except Exception as e:
            raise ModelSaveError(f"cannot save to {path}: export failed ({type(e).__name__}: {e})") from e
        finally:
            for t, payload, _ in payloads:
                t._values = payload.values
        sources = {t.name: payload.data for t, payload, _ in payloads}
        _fill_subgraphs(proto.graph, sources, top=True)
        total = sum(tensor_nbytes(t) for t in proto.graph.initializer)
        if external_data is None:
            external_data = self.source_external_data or total > EXTERNAL_DATA_THRESHOLD
        data_name = path.name + ".data"
        temps: list[Path] = []
        try:
            onnx_tmp = _temp_beside(path, temps)
            if external_data:
                data_tmp = _temp_beside(path.with_name(data_name), temps)
                _write_external(proto, sources, data_tmp, data_name)
                with open(onnx_tmp, "wb") as f:
                    f.write(proto.SerializeToString())
                    f.flush()
                    os.fsync(f.fileno())
            else:
                if total + proto.ByteSize() > PROTOBUF_LIMIT:
                    raise ModelSaveError("the model exceeds protobuf's 2 GiB limit; save with external_data=True")
                with open(onnx_tmp, "wb", buffering=0) as f, _Output(f) as out:
                    _write_inline(out, proto, sources)
                    out.sync()
            if external_data:
                os.replace(data_tmp, path.with_name(data_name))
            os.replace(onnx_tmp, path)
            temps.clear()
        except ModelSaveError as e:
            raise ModelSaveError(f"cannot save to {path}: {e}") from e
        except (OSError, ValueError) as e:
            raise ModelSaveError(f"cannot save to {path}: {type(e).__name__}: {e}") from e
        finally:
            for t in temps:
                t.unlink(missing_ok=True)
        logger.info("saved %s (%s)", path, "external data" if external_data else "inline")
        return path


class _Output:
    """An unbuffered output file whose written bytes start their way to the disk while saving
    goes on: every ``FLUSH_BYTES`` a background thread runs ``fdatasync`` (one at a time), so
    the final :meth:`sync` waits only for the tail instead of the whole file. On a disk that
    writes a few hundred MB/s this overlaps the flush with the copying and serialising that
    saving does anyway (the kernel would otherwise hold everything dirty until the end)."""

    FLUSH_BYTES = 64 * 2**20

    def __init__(self, f):
        self.f = f
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def fileno(self) -> int:
        return self.f.fileno()

    def tell(self) -> int:
        return self.f.tell()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        for i in range(0, len(view), self.FLUSH_BYTES):  # big payloads in slices, so flushing starts early
            part = view[i:i + self.FLUSH_BYTES]
            self.f.write(part)
            self.grew(len(part))
        return len(view)

    def grew(self, n: int) -> None:
        """Count ``n`` bytes written to the file (by :meth:`write` or by the kernel)."""
        self._pending += n
        if self._pending >= self.FLUSH_BYTES and (self._thread is None or not self._thread.is_alive()):
            self._pending = 0
            self._thread = threading.Thread(target=self._flush, name="graphopt-save-flush", daemon=True)
            self._thread.start()

    def _flush(self) -> None:
        try:
            os.fdatasync(self.f.fileno())
        except BaseException as e:  # noqa: BLE001 - re-raised by sync() on the saving thread
            self._error = e

    def sync(self) -> None:
        """Wait for the background flush, then make the whole file durable."""
        self.join()
        if self._error is not None:
            raise self._error
        os.fsync(self.f.fileno())

    def join(self) -> None:
        """Wait for the background flush (saving failed or is done): the file is not closed under it."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> _Output:
        return self

    def __exit__(self, *exc) -> None:
        self.join()


def _temp_beside(target: Path, temps: list[Path]) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the output should look like any new file
    os.close(fd)
    temps.append(Path(name))
    return Path(name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_external(proto: onnx.ModelProto, sources: dict[str, object], data_tmp: Path,
                    data_name: str) -> None:
    """Move every large initializer's bytes into ``data_tmp`` (payloads written straight from
    where they are, see :meth:`Model._payloads`) and point the protos at ``data_name``."""
    with open(data_tmp, "wb", buffering=0) as f, _Output(f) as out:
        _write_tensors(out, proto, sources, data_name)
        out.sync()


def _source(t: TensorProto, sources: dict[str, object]):
    """The payload an exported initializer stands for (None: its bytes are in the proto)."""
    return sources.get(t.name) if uses_external_data(t) else None


def _write_tensors(out: _Output, proto: onnx.ModelProto, sources: dict[str, object], data_name: str) -> None:
    """Write every large initializer's bytes to ``out`` and point its proto there."""
    for t in _write_order(proto.graph.initializer, sources):
        src = _source(t, sources)
        if isinstance(src, BuiltValues) and src.nbytes < EXTERNAL_MIN_BYTES:  # small, deferred: inline
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = src.payload().tobytes()
            continue
        if src is None and (not t.HasField("raw_data") or len(t.raw_data) < EXTERNAL_MIN_BYTES):
            continue  # small or typed-field tensors stay inline
        pos = out.tell()
        pad = (-pos) % ALIGNMENT
        out.write(b"\0" * pad)
        offset = pos + pad
        if src is not None:
            length = _write_payload(out, src)
        else:
            out.write(t.raw_data)
            length = len(t.raw_data)
            t.ClearField("raw_data")
        del t.external_data[:]
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=k, value=v)


def _write_inline(out, proto: onnx.ModelProto, sources: dict[str, object]) -> None:
    """Serialize ``proto`` to the unbuffered file ``out`` with each payload as its initializer's
    ``raw_data``, written straight from where it is (never one multi-GB bytes object).

    Protobuf fields may come in any order, so the model is written as its other fields, then
    the graph field: the graph's other fields, then every initializer."""
    head = onnx.ModelProto()
    head.CopyFrom(proto)
    head.ClearField("graph")
    body = onnx.GraphProto()
    body.CopyFrom(proto.graph)
    body.ClearField("initializer")
    pieces: list = [body.SerializeToString()]
    for t in _write_order(proto.graph.initializer, sources):
        src = _source(t, sources)
        if src is None:
            if uses_external_data(t):
                raise ModelSaveError(f"tensor {t.name!r} refers to external data graphopt did not load")
            data = t.SerializeToString()
            pieces.append(_key(_GRAPH_INITIALIZER) + _varint(len(data)) + data)
            continue
        header = TensorProto()
        header.CopyFrom(t)
        header.ClearField("external_data")
        header.ClearField("data_location")
        data = header.SerializeToString()
        n = _payload_length(src)
        raw_head = _key(_TENSOR_RAW_DATA) + _varint(n)
        pieces += [_key(_GRAPH_INITIALIZER) + _varint(len(data) + len(raw_head) + n) + data + raw_head, src]
    size = sum(len(p) if isinstance(p, bytes) else _payload_length(p) for p in pieces)
    out.write(head.SerializeToString() + _key(_MODEL_GRAPH) + _varint(size))
    for p in pieces:
        if isinstance(p, bytes):
            out.write(p)
        else:
            _write_payload(out, p)


def _write_order(initializers, sources: dict[str, object]) -> list[TensorProto]:
    """Initializers in the order their bytes are written: those ready as they come, then those
    still being computed (deferred :class:`BuiltValues`) in the order they were submitted."""
    def deferred(t) -> bool:
        src = _source(t, sources)
        return isinstance(src, BuiltValues) and src.deferred

    later = sorted((t for t in initializers if deferred(t)), key=lambda t: sources[t.name].order)
    return [t for t in initializers if not deferred(t)] + later


def _fill_subgraphs(graph: onnx.GraphProto, sources: dict[str, object], top: bool = False) -> None:
    """Initializers of subgraphs (If/Loop bodies) get their payloads inline; only the main
    graph's are written straight to the file."""
    if not top:
        for t in graph.initializer:
            src = _source(t, sources)
            if src is not None and {e.key: e.value for e in t.external_data}.get("location") == "<payload>":
                del t.external_data[:]
                t.data_location = TensorProto.DEFAULT
                if isinstance(src, BuiltValues):
                    src = src.payload()
                t.raw_data = b"".join(src.iter_bytes()) if isinstance(src, ExternalValues) else bytes(
                    memoryview(src).cast("B") if isinstance(src, np.ndarray) else src)
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _fill_subgraphs(g, sources)


def _key(field: int) -> bytes:
    """The key of a length-delimited protobuf field."""
    return _varint(field << 3 | 2)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _payload_length(src) -> int:
    if isinstance(src, ExternalValues):
        return src.length
    if isinstance(src, BuiltValues):
        return src.nbytes
    return src.nbytes if isinstance(src, np.ndarray) else len(src)


def _write_payload(out, src) -> int:
    """Write one payload to the unbuffered file ``out``; external data is copied by the kernel
    (``copy_file_range``) where it can be, else streamed."""
    if isinstance(src, BuiltValues):
        return src.write_to(out)
    if not isinstance(src, ExternalValues):
        data = memoryview(src).cast("B") if isinstance(src, np.ndarray) else src
        out.write(data)
        return len(data)
    left = src.length
    try:
        with open(src.path, "rb", buffering=0) as f:
            offset = src.offset
            while left > 0:
                n = os.copy_file_range(f.fileno(), out.fileno(), min(left, _COPY_CHUNK), offset)
                if n == 0:
                    break
                offset += n
                left -= n
                out.grew(n)
    except (OSError, AttributeError):
        if left != src.length:  # partly copied: not safe to fall back
            raise
    if left == src.length:
        for block in src.iter_bytes():
            out.write(block)
        left = 0
    if left:
        raise ModelSaveError(f"external data file {src.path} ends early: tensor {src.tensor.name!r} "
                             f"needs {src.length} bytes at offset {src.offset}")
    return src.length


def load(path: str | os.PathLike) -> Model:
    """Load an ONNX model. External weights are not read until a pass needs them."""
    return Model.load(path)
