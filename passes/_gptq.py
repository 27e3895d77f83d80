"""GPTQ (Frantar et al., 2022): block quantization that minimises the layer's *output* error
``‖X·W − X·Q‖²`` on calibration activations X instead of the weight error.

W [K, N] is quantized one reduction row at a time, in block order; each block's scale (and
zero point) is chosen by graphopt's scale search when the block starts, on the rows as the
earlier rows' errors have already updated them. Each row's rounding error is then spread
over the rows not yet quantized through the Cholesky factor of H⁻¹ (H = 2·XᵀX / rows),
batched lazily ``LAZY`` rows at a time so that most of the work is one matrix product.

The Hessian comes from a finite sample: with a few thousand rows and K in the thousands,
its small eigenvalues are noise, and on inputs that are close to isotropic plain GPTQ
with the usual dampening (0.01 × mean diagonal) is *worse* than the scale search on new
inputs. :class:`Calibration` therefore keeps Σ‖x‖⁴ too, and the dampening is the
Ledoit–Wolf shrinkage of the sample covariance towards a multiple of the identity (never
below 0.01): large where the sample cannot tell H from isotropic, small where it can.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from graphopt.passes._blockquant import QuantSpec, Quantized, _asymmetric, _search_symmetric, dequantize_blocks

#: Rows updated together before the error is pushed to the remaining rows by one matmul.
LAZY = 128
#: The smallest relative dampening (the paper's 1 %).
MIN_DAMP = 0.01


@dataclass
class Calibration:
    """Sums over calibration rows x of one MatMul input: XᵀX [K, K] (float32), Σ‖x‖⁴, rows."""

    xtx: np.ndarray
    norm4: float
    rows: int

    def add(self, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
        self.xtx += x.T @ x
        sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
        self.norm4 += float(sq @ sq)
        self.rows += x.shape[0]

    @classmethod
    def empty(cls, k: int) -> Calibration:
        return cls(np.zeros((k, k), np.float32), 0.0, 0)

    def hessian(self) -> tuple[np.ndarray, float]:
        """H = 2·XᵀX / rows (float64) and the relative dampening: the Ledoit–Wolf shrinkage
        ``α`` of the covariance towards ``mean(diag)·I`` as ``α / (1 − α)``, at least MIN_DAMP."""
        s = self.xtx.astype(np.float64) / max(self.rows, 1)
        k = s.shape[0]
        mu = float(np.trace(s)) / k
        fro = float(np.sum(s * s))
        delta = fro - mu * mu * k  # ‖S − μI‖²
        beta = min(max((self.norm4 / max(self.rows, 1) - fro) / max(self.rows, 1), 0.0), delta)
        alpha = beta / delta if delta > 0 else 1.0
        return 2.0 * s, max(MIN_DAMP, alpha / max(1.0 - alpha, 1e-6))


def gptq_matrix(w: np.ndarray, hessian: np.ndarray, spec: QuantSpec, damp: float = MIN_DAMP) -> Quantized:
    """Quantize ``w`` [K, N] (blocks of ``spec.block`` rows along axis 0) minimising the
    output error under ``hessian`` [K, K]; ``damp`` is relative to the mean diagonal.

    ``spec.order``: ``natural`` takes the rows in order, each block's scale searched when the block
    starts (on rows the earlier errors updated); ``act`` ("act-order", GPTQ's ``desc_act``
    with static groups) takes them by decreasing ``diag(H)``, the inputs that carry most
    energy first while the most rows are left to absorb their error, with every block's scale
    searched up front on the weights; ``auto`` runs both and keeps the one with the smaller
    output error ``tr(DᵀHD)``, D the weight error. Neither order wins everywhere: on the tiny
    fixtures auto keeps act-order for most weights, on llama-150m's near-isotropic inputs
    natural order.
    Codes are unpacked (``_layout`` packs them); the error figure is the weight error."""
    order = spec.order
    work = np.array(w, dtype=np.float32, order="C")
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0  # an input channel that is always zero: its weights do not matter
    h[dead, dead] = 1.0
    work[dead] = 0.0
    ref = np.asarray(w, dtype=np.float64)
    best = None
    for act in ((False, True) if order == "auto" else (order == "act",)):
        codes, scales, zeros = _gptq(work, h, spec, damp, act)
        d = ref - dequantize_blocks(codes, scales, zeros, spec.block)
        # auto: the output error decides (dead channels, h's 1 on the diagonal, add the same to both)
        out_err = float(np.einsum("ij,ij->", d, h @ d)) if order == "auto" else 0.0
        if best is None or out_err < best[0]:
            best = (out_err, codes, scales, zeros, d, "act" if act else "natural")
    _, codes, scales, zeros, d, kept = best
    return Quantized(codes, scales, zeros.astype(np.uint8) if zeros is not None else None,
                     float(np.sum(d * d)), float(np.sum(ref * ref)), order=kept)


def _gptq(w: np.ndarray, h: np.ndarray, spec: QuantSpec, damp: float, act: bool):
    """GPTQ's row loop over ``w`` (float32, not modified) in natural or act order; returns
    codes [K, N] (unpacked), scales and zero points [ceil(K / block), N] (float)."""
    k, n = w.shape
    b = spec.block
    nb = math.ceil(k / b)
    levels = 2 ** (spec.bits - 1)
    lo, hi = (-levels, levels - 1) if spec.symmetric else (0, 2 ** spec.bits - 1)
    codes = np.empty((k, n), np.int8 if spec.symmetric else np.uint8)
    scales = np.empty((nb, n), np.float32)
    zeros = None if spec.symmetric else np.empty((nb, n), np.float32)
    if act:  # static groups: every block's parameters from the weights before any update
        for g in range(nb):
            scales[g], z = _block_params(w[g * b:(g + 1) * b], spec)
            if zeros is not None:
                zeros[g] = z
        perm = np.argsort(-np.diag(h), kind="stable")
        work, u = w[perm], _inverse_factor(h[np.ix_(perm, perm)], damp)
    else:
        perm = np.arange(k)
        work, u = w.copy(), _inverse_factor(h, damp)
    lazy = max(LAZY - LAZY % b, b)
    sc = z = None
    for r0 in range(0, k, lazy):
        r1 = min(k, r0 + lazy)
        part = work[r0:r1].copy()
        err = np.zeros_like(part)
        for i in range(r1 - r0):
            r = r0 + i
            row = perm[r]
            if not act and r % b == 0:  # natural order: the block starts here (lazy is a multiple of b)
                sc, z = _block_params(part[i:i + b], spec)
                scales[r // b] = sc
                if zeros is not None:
                    zeros[r // b] = z
            elif act:
                sc, z = scales[row // b], zeros[row // b] if zeros is not None else None
            x = part[i]
            q = np.rint(x / sc)
            if z is not None:
                q += z
            np.clip(q, lo, hi, out=q)
            codes[row] = q
            deq = (q - z) * sc if z is not None else q * sc
            e = (x - deq) / u[r, r]
            part[i + 1:] -= np.outer(u[r, r + 1:r1], e)
            err[i] = e
        if r1 < k:
            work[r1:] -= u[r0:r1, r1:].T @ err
    return codes, scales, zeros


def _inverse_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """The upper Cholesky factor U of (H + damp·mean(diag H)·I)⁻¹ = UᵀU: row i of U carries
    row i's error forward. A factorisation that fails numerically is retried with ten
    times the dampening (up to twice the mean diagonal)."""
    mean = float(np.mean(np.diag(h)))
    while True:
        damped = h.copy()
        damped[np.diag_indices(h.shape[0])] += damp * mean
        try:
            return np.linalg.cholesky(np.linalg.inv(damped)).T.astype(np.float32)
        except np.linalg.LinAlgError:
            if damp >= 1.0:
                raise
            damp = min(1.0, damp * 10)


def _block_params(rows: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (and zero point) of one block from its current rows, by the scale search."""
    b, n = spec.block, rows.shape[1]
    if rows.shape[0] < b:  # a partial last block: zero rows do not move the search
        rows = np.concatenate([rows, np.zeros((b - rows.shape[0], n), np.float32)])
    xb = rows.reshape(1, b, n)
    if spec.symmetric:
        _, sc = _search_symmetric(xb, spec.bits, None)
        return sc[0], None
    _, sc, z = _asymmetric(xb, spec.bits, None, True)
    return sc[0], z[0]
