"""Read an ONNX file without copying its inline weights.

``onnx.load`` copies every initializer's ``raw_data`` into the parsed message (and each
access from Python copies it again), which costs more than quantizing a model whose
weights are inline. This module walks the protobuf wire format of the file instead
(``ModelProto.graph`` -> ``GraphProto.initializer`` -> ``TensorProto.raw_data``), parses
everything except the big payloads, and describes each payload as external data that
lives in the model file itself (location, offset, length), so :class:`ExternalValues`
memory-maps it like any external tensor.

Only the main graph's initializers are treated so; anything the walk does not expect
makes :func:`load_lazily` return None and the caller falls back to ``onnx.load``.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import onnx
from onnx import TensorProto

#: Payloads at least this large stay in the file; smaller ones are parsed as usual.
MIN_PAYLOAD = 1 << 20

_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, value start, value end, field start) of each field in buf[start:end];
    the value span is the payload of a length-delimited field."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
            value = pos
        elif wire == 1:
            value, pos = pos, pos + 8
        elif wire == 2:
            n, value = _varint(buf, pos)
            pos = value + n
        elif wire == 5:
            value, pos = pos, pos + 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield key >> 3, value, pos, first
    if pos != end:
        raise ValueError("truncated protobuf field")


def load_lazily(path: Path) -> onnx.ModelProto | None:
    """The model in ``path`` with every inline ``raw_data`` of ``MIN_PAYLOAD`` bytes or more
    left in the file and described as external data (location: the file's own name); None
    when the file holds no such payload or has an unexpected layout."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            return _split(buf, path.name)
        except (ValueError, IndexError):
            return None


def _split(buf, name: str) -> onnx.ModelProto | None:
    head, graph_parts, tensors = [], [], []
    found = False
    for field, value, end, first in _fields(buf, 0, len(buf)):
        if field != _MODEL_GRAPH:
            head.append(buf[first:end])
            continue
        for g_field, g_value, g_end, g_first in _fields(buf, value, end):
            if g_field != _GRAPH_INITIALIZER:
                graph_parts.append(buf[g_first:g_end])
                continue
            parts, payload = [], None
            for t_field, t_value, t_end, t_first in _fields(buf, g_value, g_end):
                if t_field == _TENSOR_RAW_DATA and t_end - t_value >= MIN_PAYLOAD:
                    payload = (t_value, t_end - t_value)
                else:
                    parts.append(buf[t_first:t_end])
            found |= payload is not None
            tensors.append((b"".join(parts), payload))
    if not found:
        return None
    proto = onnx.ModelProto.FromString(b"".join(head))
    proto.graph.MergeFromString(b"".join(graph_parts))
    for data, payload in tensors:
        t = proto.graph.initializer.add()
        t.MergeFromString(data)
        if payload is not None:
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", name), ("offset", str(payload[0])), ("length", str(payload[1]))):
                t.external_data.add(key=k, value=v)
    return proto
