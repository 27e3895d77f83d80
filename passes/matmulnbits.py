"""``--quant-format matmulnbits``: the quantize pass's weights in onnxruntime's own format.

``MatMul(A, DequantizeLinear(codes, scale[, zero point]))`` with 4- or 8-bit codes blocked
along the reduction axis (and the tied LM head's ``MatMul(A, Transpose(DequantizeLinear(E)))``)
becomes ``com.microsoft.MatMulNBits(A, B, scales[, zero_points])``:

* ``B``: uint8 ``[N, ceil(K / block), block · bits / 8]``, column n's codes made unsigned
  (signed codes + 2^(bits-1), which is MatMulNBits' default zero point, so a symmetric
  weight needs none), 4-bit codes two per byte, low nibble first; a partial last block is
  padded with zero codes;
* ``scales``: ``[N · ceil(K / block)]``; ``zero_points`` (asymmetric only): uint8, 4-bit
  ones packed two per byte per column.

Why: onnxruntime's CUDA execution provider cannot run a blocked INT4 ``DequantizeLinear``
(onnxruntime-gpu 1.31: "Unsupported quantization type"), but runs ``MatMulNBits``; on CPU
onnxruntime makes the same kernel of the QDQ form itself. The codes and scales are the
quantize pass's, bit for bit. A ``Gather`` of a quantized embedding stays QDQ, and a
backend that does not declare ``MatMulNBits`` gets the decomposition back at legalization
(``passes/decompositions.py``). The pass refuses a target that declares neither form.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt._errors import GraphoptError
from graphopt._ir import Model, array_view
from graphopt._pipeline import Pass, PassContext, PassResult
from graphopt.passes._blockquant import pack_int4

MS = "com.microsoft"
FORMATS = ("qdq", "matmulnbits")
_CODE_TYPES = {"int4": (4, True), "uint4": (4, False), "int8": (8, True), "uint8": (8, False)}


def _codes(t: gs.Constant) -> tuple[np.ndarray, int, bool] | None:
    """The codes as int8/uint8 numbers, their bits and signedness (None: not a 4/8-bit weight).
    Read without replacing the constant's stored (packed) values, which the QDQ form may still use."""
    values = array_view(t)
    kind = _CODE_TYPES.get(values.dtype.name)
    if kind is None or values.ndim != 2:
        return None
    return values.astype(np.int8 if kind[1] else np.uint8), kind[0], kind[1]


def _pack_rows(u: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes ``[..., n]`` (n even for 4 bits) → bytes ``[..., n · bits / 8]``, low nibble first."""
    return u if bits == 8 else pack_int4(u).reshape(u.shape[:-1] + (u.shape[-1] // 2,))


def pack_matmulnbits(codes_nk: np.ndarray, scales_nb: np.ndarray, zeros_nb: np.ndarray | None, bits: int,
                     signed: bool, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Column-major codes ``[N, K]``, scales and zero points ``[N, blocks]`` → MatMulNBits' B,
    scales and zero points (see the module docstring)."""
    n, k = codes_nk.shape
    blocks = -(-k // block)
    u = codes_nk.astype(np.int16) + (1 << (bits - 1)) if signed else codes_nk.astype(np.int16)
    padded = np.zeros((n, blocks * block), np.uint8)
    padded[:, :k] = u.astype(np.uint8)
    b = _pack_rows(padded.reshape(n, blocks, block), bits)
    zp = None
    if zeros_nb is not None:
        z = zeros_nb.astype(np.uint8)
        if bits == 4 and blocks % 2:
            z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
        zp = _pack_rows(z, bits).reshape(-1)
    return np.ascontiguousarray(b), np.ascontiguousarray(scales_nb.reshape(-1)), zp


class MatMulNBitsFormat(Pass):
    name = "matmulnbits-format"
    summary = "quantized DequantizeLinear → MatMul as onnxruntime's com.microsoft MatMulNBits (--quant-format)"
    after = ("quantize",)
    before = ("dead-code-elimination",)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        fmt = str(ctx.option("quant_format", "qdq"))
        if fmt not in FORMATS:
            raise GraphoptError(f"quant format {fmt!r} is not one of {', '.join(FORMATS)}")
        if fmt == "qdq":
            return PassResult(False)
        target = ctx.target
        if target is not None and not target.supports_op("MatMulNBits", MS, 1) \
                and not target.supports_op("DequantizeLinear", "", 21):
            raise GraphoptError(f"--quant-format matmulnbits: target {target.name!r} runs neither "
                                f"com.microsoft MatMulNBits nor DequantizeLinear-21")
        graph = model.graph
        accuracy = ctx.option("quant_accuracy_level")
        if accuracy is not None and (isinstance(accuracy, bool) or not isinstance(accuracy, int)
                                     or accuracy not in range(5)):
            raise GraphoptError(f"quant accuracy level {accuracy!r} is not one of 0, 1, 2, 3, 4 "
                                "(onnxruntime MatMulNBits: 0 float activations, 4 int8 activations)")
        packed: dict[tuple[int, bool], tuple] = {}
        converted = 0
        for node in list(graph.nodes):
            if node.op != "MatMul" or node.domain or len(node.inputs) != 2:
                continue
            a, w = node.inputs
            src = w.inputs[0] if len(w.inputs) == 1 else None
            transposed = False
            if src is not None and src.op == "Transpose" and not src.domain \
                    and list(src.attrs.get("perm", [1, 0])) == [1, 0]:
                transposed, w = True, src.inputs[0]
                src = w.inputs[0] if len(w.inputs) == 1 else None
            if src is None or src.op != "DequantizeLinear" or src.domain:
                continue
            key = (id(src), transposed)
            if key not in packed:
                packed[key] = self._pack(src, transposed, a)
            if packed[key] is None:
                continue
            b, scales, zeros, k, n, bits, block = packed[key]
            inputs = [a, b, scales] + ([zeros] if zeros is not None else [])
            attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
            if accuracy is not None:
                attrs["accuracy_level"] = int(accuracy)
            out = node.outputs[0]
            node.inputs.clear()
            node.outputs.clear()
            nb = gs.Node("MatMulNBits", f"{node.name}_nbits", attrs=attrs, inputs=inputs, outputs=[out], domain=MS)
            nb.meta = {"graphopt.rule": f"matmulnbits-int{bits}-b{block}"}
            graph.nodes.append(nb)
            converted += 1
        if converted:
            model.opset_imports.setdefault(MS, 1)
            graph.cleanup(remove_unused_graph_inputs=False)
            graph.toposort()
        return PassResult(bool(converted), {"converted": converted})

    @staticmethod
    def _pack(dq: gs.Node, transposed: bool, a: gs.Tensor) -> tuple | None:
        """MatMulNBits' constants for this DequantizeLinear read as a MatMul's B (transposed: B = DQ^T)."""
        ins = list(dq.inputs)
        codes_t, scale_t = ins[0], ins[1]
        zero_t = ins[2] if len(ins) > 2 and ins[2].name else None
        block = int(dq.attrs.get("block_size", 0))
        axis = int(dq.attrs.get("axis", 1))
        if not isinstance(codes_t, gs.Constant) or not isinstance(scale_t, gs.Constant) or block < 16 \
                or (zero_t is not None and not isinstance(zero_t, gs.Constant)):
            return None
        got = _codes(codes_t)
        if got is None or axis % 2 != (1 if transposed else 0):
            return None
        codes, bits, signed = got
        scales = array_view(scale_t)
        if scales.dtype != np.float32 or a.dtype is None or np.dtype(a.dtype) != np.float32:
            return None  # MatMulNBits' scales have A's type
        zeros = _codes(zero_t)[0] if zero_t is not None else None
        if zeros is not None and signed:
            return None  # signed codes with explicit zero points: not this pass's output
        # codes_nk [N, K]: as stored when transposed (E [V, H] read as E^T), else the transpose of [K, N]
        codes_nk = codes if transposed else codes.T
        scales_nb = scales if transposed else scales.T
        zeros_nb = (zeros if transposed else zeros.T) if zeros is not None else None
        n, k = codes_nk.shape
        b, s, z = pack_matmulnbits(codes_nk, scales_nb, zeros_nb, bits, signed, block)
        name = dq.name or codes_t.name
        b_t = gs.Constant(f"{name}_nbits_B{'T' if transposed else ''}", b)
        s_t = gs.Constant(f"{name}_nbits_scales{'T' if transposed else ''}", s)
        z_t = gs.Constant(f"{name}_nbits_zero_points{'T' if transposed else ''}", z) if z is not None else None
        return b_t, s_t, z_t, k, n, bits, block
