"""The ``cuda`` backend's hand-written kernels: CUDA C sources, their launchers and array twins.

Each kernel exists twice:

- a ``RawKernel`` (CUDA C in :data:`SOURCES`, compiled by CuPy's NVRTC on first use);
- a *twin* written with array-module operations (``xp`` is ``cupy`` or ``numpy``) that
  computes the same result. The twin is the reference the GPU tests compare the
  kernel with, and what the backend runs when it emulates the device with numpy
  (``CudaBackend(emulate=True)``, how CI tests the backend's logic without a GPU).

Kernels (float32 activations; row-major contiguous arrays):

- ``rms_norm``: one block per row, ``y = x * rsqrt(mean(x²) + eps) * w``;
- ``softmax_rows``: one block per row of the last axis, max-subtracted;
- ``dq_gemv``: ``y[m, n] = Σ_k x[m, k] · W[k, n]`` for a block-quantized weight stored
  *column-major* (:class:`GemvWeight`): one warp per output column reads that
  column's packed 4- or 8-bit codes contiguously (coalesced 32-bit words), unpacks
  and scales them in registers and keeps up to ``GEMV_MAX_ROWS`` rows of ``x`` in
  flight, so the weight is read once per call and never materialised in float;
- ``dq_unpack``: the same weight dequantized to a float32 ``[K, n1 - n0]`` tile, the
  prefill path (tiles of columns, then a cuBLAS matmul).

Importing this module never imports CuPy; sources compile for the device at hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Rows of X one GEMV launch handles; more rows (prefill) take the dequantize-tile + cuBLAS path.
GEMV_MAX_ROWS = 8
#: Threads per block of the row kernels.
ROW_THREADS = 256
#: Warps (output columns) per block of the GEMV kernel.
GEMV_WARPS = 4

_COMMON = r"""
#define NEG_INF __int_as_float(0xff800000)
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Reduces over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* shared) {
    v = MAX ? warp_max(v) : warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = (threadIdx.x < (blockDim.x >> 5)) ? shared[threadIdx.x] : (MAX ? NEG_INF : 0.0f);
    if (warp == 0) v = MAX ? warp_max(v) : warp_sum(v);
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    v = shared[0];
    __syncthreads();
    return v;
}
__device__ __forceinline__ float block_sum(float v, float* shared) { return block_reduce<false>(v, shared); }
__device__ __forceinline__ float block_max(float v, float* shared) { return block_reduce<true>(v, shared); }
"""

_RMS_NORM = r"""
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ y, const int n, const float eps) {
    __shared__ float shared[32];
    const long long row = blockIdx.x;
    const float* xr = x + row * n;
    float* yr = y + row * n;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { const float v = xr[i]; acc += v * v; }
    const float inv = rsqrtf(block_sum(acc, shared) / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * inv * w[i];
}
"""

_SOFTMAX = r"""
extern "C" __global__ void softmax_rows(const float* __restrict__ x, float* __restrict__ y, const int n) {
    __shared__ float shared[32];
    const long long row = blockIdx.x;
    const float* xr = x + row * n;
    float* yr = y + row * n;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, xr[i]);
    m = block_max(m, shared);
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { const float e = __expf(xr[i] - m); yr[i] = e; s += e; }
    // a row of -inf only (fully masked) gives NaN, as the ONNX decomposition does
    const float inv = 1.0f / block_sum(s, shared);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] *= inv;
}
"""

# codes: [N, words] uint32, column n's K codes packed along K (BITS=4: 8 per word, low nibble first;
# BITS=8: 4 per word, low byte first). scale / zero: [N, nblk] float32; a value is (code - zero) * scale.
_DQ = r"""
template <int BITS, bool SIGNED>
__device__ __forceinline__ float code_at(unsigned int word, int j) {
    if (BITS == 4) {
        int c = (word >> (4 * j)) & 0xF;
        if (SIGNED) c = (c ^ 8) - 8;
        return (float)c;
    } else {
        int c = (word >> (8 * j)) & 0xFF;
        if (SIGNED) c = (c ^ 128) - 128;
        return (float)c;
    }
}

template <int BITS, bool SIGNED, bool ZERO, int ROWS>
__device__ void dq_gemv_impl(const float* __restrict__ x, const unsigned int* __restrict__ codes,
                             const float* __restrict__ scale, const float* __restrict__ zero,
                             const float* __restrict__ bias, const float* __restrict__ resid,
                             float* __restrict__ y, const int m, const int k, const int n,
                             const int words, const int block, const int nblk) {
    constexpr int PER = 32 / BITS;
    const int lane = threadIdx.x & 31;
    const int col = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (col >= n) return;
    const unsigned int* cw = codes + (long long)col * words;
    const float* sc = scale + (long long)col * nblk;
    const float* zp = ZERO ? zero + (long long)col * nblk : nullptr;
    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
    // 16-byte loads (4 words per lane, coalesced across the warp) when the column's words allow it;
    // its base is then 16-byte aligned too (words % 4 == 0). Otherwise one word per lane.
    const int vec = (words & 3) == 0 ? 4 : 1;
    // a word's codes all in one quantization block, and x rows 16-byte aligned: the fast path below
    const bool whole = block % PER == 0 && (k & 3) == 0 && (reinterpret_cast<unsigned long long>(x) & 15) == 0;
    for (int w0 = lane * vec; w0 < words; w0 += 32 * vec) {
        unsigned int buf[4] = {0u, 0u, 0u, 0u};
        if (vec == 4) {
            const uint4 q4 = *reinterpret_cast<const uint4*>(cw + w0);
            buf[0] = q4.x; buf[1] = q4.y; buf[2] = q4.z; buf[3] = q4.w;
        } else {
            buf[0] = cw[w0];
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {  // constant indices keep buf in registers
            if (u >= vec) break;
            const unsigned int word = buf[u];
            const int k0 = (w0 + u) * PER;
            if (whole && k0 + PER <= k) {  // the word's PER codes share one block: one scale, x in 16-byte loads
                const int b = k0 / block;
                const float s = sc[b], z = ZERO ? zp[b] : 0.0f;
                float part[ROWS][PER / 4];
#pragma unroll
                for (int r = 0; r < ROWS; ++r)
#pragma unroll
                    for (int h = 0; h < PER / 4; ++h) part[r][h] = 0.0f;
#pragma unroll
                for (int h = 0; h < PER / 4; ++h) {
                    const float c0 = code_at<BITS, SIGNED>(word, 4 * h) - z, c1 = code_at<BITS, SIGNED>(word, 4 * h + 1) - z;
                    const float c2 = code_at<BITS, SIGNED>(word, 4 * h + 2) - z, c3 = code_at<BITS, SIGNED>(word, 4 * h + 3) - z;
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) {
                        if (r < m) {
                            const float4 x4 = *reinterpret_cast<const float4*>(x + (long long)r * k + k0 + 4 * h);
                            part[r][h] = x4.x * c0 + x4.y * c1 + x4.z * c2 + x4.w * c3;
                        }
                    }
                }
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    float t = 0.0f;
#pragma unroll
                    for (int h = 0; h < PER / 4; ++h) t += part[r][h];
                    acc[r] += t * s;
                }
                continue;
            }
#pragma unroll
            for (int j = 0; j < PER; ++j) {
                const int kk = k0 + j;
                if (kk >= k) break;
                const int b = kk / block;
                float v = code_at<BITS, SIGNED>(word, j);
                if (ZERO) v -= zp[b];
                v *= sc[b];
#pragma unroll
                for (int r = 0; r < ROWS; ++r) if (r < m) acc[r] += x[(long long)r * k + kk] * v;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        float s = warp_sum(acc[r]);
        if (lane == 0 && r < m) {  // epilogue: + bias[col] + resid[r, col] (null pointers: none)
            if (bias) s += bias[col];
            if (resid) s += resid[(long long)r * n + col];
            y[(long long)r * n + col] = s;
        }
    }
}

template <int BITS, bool SIGNED, bool ZERO>
__device__ void dq_unpack_impl(const unsigned int* __restrict__ codes, const float* __restrict__ scale,
                               const float* __restrict__ zero, float* __restrict__ out, const int k,
                               const int n0, const int cols, const int words, const int block,
                               const int nblk) {
    // out[kk, c] for c in [0, cols): one thread per element, consecutive threads along columns
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)k * cols) return;
    constexpr int PER = 32 / BITS;
    const int kk = (int)(i / cols), c = (int)(i % cols), col = n0 + c;
    const unsigned int word = codes[(long long)col * words + kk / PER];
    const int b = kk / block;
    float v = code_at<BITS, SIGNED>(word, kk % PER);
    if (ZERO) v -= zero[(long long)col * nblk + b];
    v *= scale[(long long)col * nblk + b];
    out[i] = v;
}
"""


def _dq_entry_points() -> str:
    out = []
    for bits in (4, 8):
        for signed in (True, False):
            for zero in (True, False):
                tag = f"{bits}{'s' if signed else 'u'}{'z' if zero else ''}"
                targs = f"{bits}, {'true' if signed else 'false'}, {'true' if zero else 'false'}"
                out.append(f"""
extern "C" __global__ void dq_gemv_{tag}(const float* x, const unsigned int* codes, const float* scale,
        const float* zero, const float* bias, const float* resid, float* y, int m, int k, int n, int words,
        int block, int nblk) {{
    dq_gemv_impl<{targs}, {GEMV_MAX_ROWS}>(x, codes, scale, zero, bias, resid, y, m, k, n, words, block, nblk);
}}
extern "C" __global__ void dq_unpack_{tag}(const unsigned int* codes, const float* scale, const float* zero,
        float* out, int k, int n0, int cols, int words, int block, int nblk) {{
    dq_unpack_impl<{targs}>(codes, scale, zero, out, k, n0, cols, words, block, nblk);
}}""")
    return "".join(out)


# One block per (batch, query head, query row): scores of that row against every key in shared
# memory, block max / sum, then the weighted sum of values, one output dimension per thread.
# Strided q/k/v/y (element strides for batch, head, row; the last axis contiguous) read the KV
# cache buffers and split heads in place. bias: float32 additive mask with its own strides
# (0 for broadcast dims) or null. Keys j > i + causal_offset are masked when causal >= 0.
# A fully masked row gives zeros (as graphopt's cpu Attention does).
_ATTN = r"""
extern "C" __global__ void attn_decode(
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
        const float* __restrict__ bias, float* __restrict__ y,
        const int heads, const int rows, const int t_len, const int dim, const int group,
        const long long qb, const long long qh, const long long qs,
        const long long kb, const long long kh, const long long kt,
        const long long vb, const long long vh, const long long vt,
        const long long bb, const long long bh, const long long bs,
        const long long yb, const long long yh, const long long ys,
        const float scale, const float softcap, const int causal_offset) {
    extern __shared__ float smem[];  // dim floats of q, then t_len scores, then 32 for reductions
    float* qv = smem;
    float* sc = smem + dim;
    float* red = sc + t_len;
    const int r = blockIdx.x % rows;
    const int h = (blockIdx.x / rows) % heads;
    const int b = blockIdx.x / (rows * heads);
    const int kvh = h / group;
    const float* qr = q + b * qb + h * qh + r * qs;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) qv[d] = qr[d] * scale;
    __syncthreads();
    const float* kbase = k + b * kb + kvh * kh;
    const float* brow = bias ? bias + b * bb + h * bh + r * bs : nullptr;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < t_len; j += blockDim.x) {
        const float* kr = kbase + j * kt;
        float acc = 0.0f;
        for (int d = 0; d < dim; ++d) acc += qv[d] * kr[d];
        if (softcap > 0.0f) acc = tanhf(acc / softcap) * softcap;
        if (brow) acc += brow[j];
        if (causal_offset >= 0 && j > r + causal_offset) acc = NEG_INF;
        sc[j] = acc;
        m = fmaxf(m, acc);
    }
    m = block_max(m, red);
    float s = 0.0f;
    for (int j = threadIdx.x; j < t_len; j += blockDim.x) {
        const float e = (m == NEG_INF) ? 0.0f : __expf(sc[j] - m);
        sc[j] = e;
        s += e;
    }
    s = block_sum(s, red);
    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
    const float* vbase = v + b * vb + kvh * vh;
    float* yr = y + b * yb + h * yh + r * ys;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < t_len; ++j) acc += sc[j] * vbase[j * vt + d];
        yr[d] = acc * inv;
    }
}
"""

# One thread per output element of RotaryEmbedding (x [B, S, H, D] as strided, last axis contiguous):
# the rotated pair (split halves or interleaved) or a pass-through dimension past rot = 2 * half.
# cos/sin rows: the cache row pid[b, s] when position ids are given (strides pb, ps; pb = 0 for a
# shared row), else the caches' own [B|1, S, half] rows (strides cb, cs).
_ROTARY = r"""
extern "C" __global__ void rotary(const float* __restrict__ x, const float* __restrict__ cosc,
                                  const float* __restrict__ sinc, const long long* __restrict__ pid,
                                  float* __restrict__ y, const int B, const int S, const int H, const int D,
                                  const int half, const int interleaved,
                                  const long long xb, const long long xs, const long long xh,
                                  const long long pb, const long long ps, const long long cb, const long long cs,
                                  const long long yb, const long long ys, const long long yh) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)B * S * H * D) return;
    const int d = idx % D;
    const int h = (idx / D) % H;
    const int s = (idx / ((long long)D * H)) % S;
    const int b = idx / ((long long)D * H * S);
    const float* xr = x + b * xb + s * xs + h * xh;
    float* out = y + b * yb + s * ys + h * yh + d;
    if (d >= 2 * half) { *out = xr[d]; return; }
    const long long row = pid ? pid[b * pb + s * ps] * (long long)half : b * cb + s * cs;
    const float* c = cosc + row;
    const float* sn = sinc + row;
    if (interleaved) {
        const int i = d >> 1;
        *out = (d & 1) ? xr[d - 1] * sn[i] + xr[d] * c[i] : xr[d] * c[i] - xr[d + 1] * sn[i];
    } else if (d < half) {
        *out = xr[d] * c[d] - xr[d + half] * sn[d];
    } else {
        const int j = d - half;
        *out = xr[j] * sn[j] + xr[d] * c[j];
    }
}
"""

# float32 matmuls without cuBLAS (CuPy refuses cuBLAS calls while a stream is captured, so these
# keep a decode step capturable in one CUDA graph).
# gemv_f32_r{R}: y[r, col] = sum_k x[r, k] * wt[col * ldw + k] (+ bias[col]) (+ resid[r, col]) for r < m <= R;
# wt is the weight stored k-contiguous (W^T rows; how the runtime lays out a constant MatMul weight, and
# what a transposed tied embedding already is). One warp per output column, 16-byte loads when aligned.
# mm_small: C[q0, q1, i, j] = sum_k A[q0, q1, i, k] * B[q0, q1, k, j], any element strides (0: broadcast),
# C contiguous; one thread per output element (the small batched products of a decode step).
_MM = r"""
template <int ROWS>
__device__ void gemv_f32_impl(const float* __restrict__ x, const float* __restrict__ wt,
                              const float* __restrict__ bias, const float* __restrict__ resid,
                              float* __restrict__ y, const int m, const int k, const int n, const long long ldw) {
    const int lane = threadIdx.x & 31;
    const int col = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (col >= n) return;
    const float* wc = wt + (long long)col * ldw;
    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
    const bool vec = (k & 3) == 0 && (ldw & 3) == 0 && (reinterpret_cast<unsigned long long>(wt) & 15) == 0
                     && (reinterpret_cast<unsigned long long>(x) & 15) == 0;
    if (vec) {
        for (int k0 = lane * 4; k0 < k; k0 += 128) {
            const float4 w4 = *reinterpret_cast<const float4*>(wc + k0);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                if (r < m) {
                    const float4 x4 = *reinterpret_cast<const float4*>(x + (long long)r * k + k0);
                    acc[r] += x4.x * w4.x + x4.y * w4.y + x4.z * w4.z + x4.w * w4.w;
                }
            }
        }
    } else {
        for (int kk = lane; kk < k; kk += 32) {
            const float w1 = wc[kk];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) if (r < m) acc[r] += x[(long long)r * k + kk] * w1;
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        float s = warp_sum(acc[r]);
        if (lane == 0 && r < m) {
            if (bias) s += bias[col];
            if (resid) s += resid[(long long)r * n + col];
            y[(long long)r * n + col] = s;
        }
    }
}

#define GEMV_F32(R) \
extern "C" __global__ void gemv_f32_r##R(const float* x, const float* wt, const float* bias, const float* resid, \
                                         float* y, const int m, const int k, const int n, const long long ldw) { \
    gemv_f32_impl<R>(x, wt, bias, resid, y, m, k, n, ldw); \
}
GEMV_F32(1)
GEMV_F32(2)
GEMV_F32(4)
GEMV_F32(8)

extern "C" __global__ void mm_small(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ c,
                                    const int b1, const int m, const int n, const int k,
                                    const long long a0, const long long a1, const long long ai, const long long ak,
                                    const long long s0, const long long s1, const long long sk, const long long sj,
                                    const long long total) {
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int j = (int)(e % n);
        long long t = e / n;
        const int i = (int)(t % m);
        t /= m;
        const int q1 = (int)(t % b1), q0 = (int)(t / b1);
        const float* ap = a + q0 * a0 + q1 * a1 + i * ai;
        const float* bp = b + q0 * s0 + q1 * s1 + j * sj;
        float acc = 0.0f;
        for (int kk = 0; kk < k; ++kk) acc += ap[kk * ak] * bp[kk * sk];
        c[e] = acc;
    }
}
"""

MM_KERNELS = ("gemv_f32_r1", "gemv_f32_r2", "gemv_f32_r4", "gemv_f32_r8", "mm_small")
#: Multiply-adds up to which a float32 matmul takes ``mm_small`` rather than cuBLAS.
MM_SMALL_MACS = 1 << 22
#: Warps (output columns) per block of the float32 GEMV.
GEMV_F32_WARPS = 8


# multi_copy: many strided copies in one launch (a decode step's KV inputs, outputs and slot moves,
# otherwise one launch each). table: `count` rows of int64 (src, dst, chunk bytes, chunks, src stride,
# dst stride); blockIdx.y picks the row; 16-byte units when everything is 16-byte aligned, else 4, else 1.
_COPY = r"""
extern "C" __global__ void multi_copy(const long long* __restrict__ table) {
    const long long* t = table + 6 * blockIdx.y;
    const char* src = reinterpret_cast<const char*>(t[0]);
    char* dst = reinterpret_cast<char*>(t[1]);
    const long long chunk = t[2], chunks = t[3], ss = t[4], ds = t[5];
    const long long all = t[0] | t[1] | chunk | ss | ds;
    const long long step = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if ((all & 15) == 0) {
        const long long units = chunk >> 4;
        for (long long i = first; i < units * chunks; i += step) {
            const long long c = i / units, u = i - c * units;
            *reinterpret_cast<int4*>(dst + c * ds + 16 * u) = *reinterpret_cast<const int4*>(src + c * ss + 16 * u);
        }
    } else if ((all & 3) == 0) {
        const long long units = chunk >> 2;
        for (long long i = first; i < units * chunks; i += step) {
            const long long c = i / units, u = i - c * units;
            *reinterpret_cast<int*>(dst + c * ds + 4 * u) = *reinterpret_cast<const int*>(src + c * ss + 4 * u);
        }
    } else {
        for (long long i = first; i < chunk * chunks; i += step) {
            const long long c = i / chunk, u = i - c * chunk;
            dst[c * ds + u] = src[c * ss + u];
        }
    }
}
"""


#: Keys the decode-attention kernel keeps in shared memory (longer contexts take the cuBLAS path).
ATTN_MAX_KEYS = 8192
#: Query rows per head up to which the kernel is used (decode, speculative steps); prefill uses cuBLAS.
ATTN_MAX_ROWS = 16

#: name -> CUDA C source (each compiles on its own).
SOURCES: dict[str, str] = {
    "rms_norm": _COMMON + _RMS_NORM,
    "softmax_rows": _COMMON + _SOFTMAX,
    "dq": _COMMON + _DQ + _dq_entry_points(),
    "attn_decode": _COMMON + _ATTN,
    "rotary": _ROTARY,
    "mm": _COMMON + _MM,
    "multi_copy": _COPY,
}


def dq_kernel_names() -> list[str]:
    return [f"dq_{kind}_{bits}{s}{z}" for kind in ("gemv", "unpack") for bits in (4, 8) for s in "su"
            for z in ("z", "")]


def kernel_names(module: str) -> list[str]:
    """The entry points of one of :data:`SOURCES` (most hold one kernel named like the module)."""
    return {"dq": dq_kernel_names(), "mm": list(MM_KERNELS)}.get(module, [module])


# ------------------------------------------------------------------ batched copies
def pointer(a: Any) -> int:
    return a.__array_interface__["data"][0] if isinstance(a, np.ndarray) else a.data.ptr


def copy_row(dst: Any, src: Any) -> tuple[int, ...] | None:
    """``dst[...] = src`` (same shape and dtype) as one ``multi_copy`` row: (src, dst, chunk bytes,
    chunks, src stride, dst stride), where both are a run of equally spaced contiguous chunks (a
    contiguous array, or a slice of one along an axis, as KV caches are); None when they are not."""
    if dst.shape != src.shape or dst.dtype != src.dtype or dst.size == 0:
        return None
    size = dst.itemsize

    def trailing(a: Any) -> int:  # first axis of the longest contiguous tail
        expect, ax = size, a.ndim
        while ax > 0 and (a.shape[ax - 1] == 1 or a.strides[ax - 1] == expect):
            expect *= a.shape[ax - 1]
            ax -= 1
        return ax

    ax = max(trailing(dst), trailing(src))
    chunk = size * int(np.prod(dst.shape[ax:], dtype=np.int64))
    lead = [(dst.shape[i], src.strides[i], dst.strides[i]) for i in range(ax) if dst.shape[i] != 1]
    while len(lead) > 1:  # collapse (outer, inner) when the outer stride steps over whole inner runs
        (n0, s0, d0), (n1, s1, d1) = lead[-2], lead[-1]
        if s0 != s1 * n1 or d0 != d1 * n1:
            return None
        lead[-2:] = [(n0 * n1, s1, d1)]
    n, ss, ds = lead[0] if lead else (1, 0, 0)
    return (pointer(src), pointer(dst), chunk, n, ss, ds)


def multi_copy_twin(table: np.ndarray) -> None:
    """What ``multi_copy`` does, on host memory (numpy arrays' pointers): the emulated runtime's copy."""
    import ctypes

    for src, dst, chunk, n, ss, ds in table.tolist():
        for c in range(n):
            ctypes.memmove(dst + c * ds, src + c * ss, chunk)


# ------------------------------------------------------------------ quantized weight layout
@dataclass
class GemvWeight:
    """A block-quantized ``[K, N]`` weight laid out for the GEMV kernel (column-major codes).

    ``codes``: uint32 ``[N, words]`` (column n's codes along K, ``32 // bits`` per word);
    ``scale``: float32 ``[N, nblk]``; ``zero``: float32 ``[N, nblk]`` zero points or None;
    a weight is ``(code - zero) * scale``, as ``DequantizeLinear`` defines it.
    Arrays live in ``xp`` (device memory under CuPy).
    """

    k: int
    n: int
    bits: int
    signed: bool
    block: int
    codes: Any
    scale: Any
    zero: Any

    @property
    def words(self) -> int:
        return int(self.codes.shape[1])

    @property
    def nblk(self) -> int:
        return int(self.scale.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.scale.nbytes + (self.zero.nbytes if self.zero is not None else 0))

    def tag(self) -> str:
        return f"{self.bits}{'s' if self.signed else 'u'}{'z' if self.zero is not None else ''}"


def gemv_layout(codes_kn: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int, signed: bool,
                block: int, xp: Any = np) -> GemvWeight:
    """Host-side repacking of integer codes ``[K, N]`` (int8/uint8 values, unpacked) with
    ``scale``/``zero`` ``[ceil(K/block), N]`` into a :class:`GemvWeight` in ``xp``.

    ``block`` is the block length along K (K itself for one block per column).
    """
    k, n = codes_kn.shape
    per = 32 // bits
    words = -(-k // per)
    col = np.zeros((n, words * per), np.uint8)
    col[:, :k] = codes_kn.T.astype(np.uint8) & ((1 << bits) - 1)  # two's complement bits of signed codes
    if bits == 4:
        nib = col.reshape(n, -1, 2)
        col = (nib[:, :, 0] | (nib[:, :, 1] << 4)).astype(np.uint8)
    packed = np.ascontiguousarray(col).view("<u4").reshape(n, words)
    s = np.ascontiguousarray(np.asarray(scale, np.float32).T)
    z = np.ascontiguousarray(np.asarray(zero, np.float32).T) if zero is not None else None
    return GemvWeight(k, n, bits, signed, block, xp.asarray(packed), xp.asarray(s),
                      xp.asarray(z) if z is not None else None)


def unpack_twin(w: GemvWeight, xp: Any, n0: int = 0, n1: int | None = None) -> Any:
    """float32 ``[K, n1 - n0]`` dequantized columns, with array operations only."""
    n1 = w.n if n1 is None else n1
    words = w.codes[n0:n1]
    per = 32 // w.bits
    shifts = xp.arange(per, dtype=xp.uint32) * w.bits
    c = (words[:, :, None] >> shifts) & xp.uint32((1 << w.bits) - 1)  # [cols, words, per]
    c = c.reshape(n1 - n0, -1)[:, :w.k].astype(xp.int32)
    if w.signed:
        half = 1 << (w.bits - 1)
        c = (c ^ half) - half
    blk = xp.arange(w.k) // w.block
    v = c.astype(xp.float32)
    if w.zero is not None:
        v -= w.zero[n0:n1][:, blk]
    v *= w.scale[n0:n1][:, blk]
    return v.T


def rms_norm_twin(x: Any, w: Any, eps: float, xp: Any) -> Any:
    inv = 1.0 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + xp.float32(eps))
    return (x * inv * w).astype(xp.float32, copy=False)


def attention_twin(q: Any, k: Any, v: Any, bias: Any, scale: float, softcap: float, causal_offset: int,
                   xp: Any) -> Any:
    """What ``attn_decode`` computes: q [B, Hq, S, D], k/v [B, Hkv, T, D] (views), bias broadcastable
    to [B, Hq, S, T] or None; returns y [B, Hq, S, D] (fully masked rows give zeros)."""
    b, hq, sq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    g = hq // hkv
    qs = (q * xp.float32(scale)).reshape(b, hkv, g * sq, d)
    scores = xp.matmul(qs, xp.swapaxes(k, -1, -2)).reshape(b, hq, sq, t)
    if softcap > 0:
        scores = xp.tanh(scores / xp.float32(softcap)) * xp.float32(softcap)
    if bias is not None:
        scores = scores + bias
    if causal_offset >= 0:
        allowed = xp.arange(t).reshape(1, t) <= xp.arange(sq).reshape(sq, 1) + causal_offset
        scores = xp.where(allowed, scores, xp.float32(-np.inf))
    m = xp.max(scores, axis=-1, keepdims=True)
    e = xp.where(m == -np.inf, xp.float32(0), xp.exp(scores - xp.where(m == -np.inf, xp.float32(0), m)))
    s = xp.sum(e, axis=-1, keepdims=True)
    p = e / xp.where(s > 0, s, xp.float32(1))
    return xp.matmul(p.reshape(b, hkv, g * sq, t), v).reshape(b, hq, sq, v.shape[-1]).astype(xp.float32)


def softmax_twin(x: Any, xp: Any) -> Any:
    m = xp.max(x, axis=-1, keepdims=True)
    e = xp.exp(x - m)
    return e / xp.sum(e, axis=-1, keepdims=True)


# ------------------------------------------------------------------ launchers (CuPy only)
class Kernels:
    """Compiled kernels for the current CuPy device, built on first use and cached."""

    def __init__(self, cupy: Any):
        self.cp = cupy
        self._modules: dict[str, Any] = {}
        self._functions: dict[tuple[str, str], Any] = {}

    def _fn(self, module: str, name: str) -> Any:
        fn = self._functions.get((module, name))
        if fn is None:
            mod = self._modules.get(module)
            if mod is None:
                mod = self.cp.RawModule(code=SOURCES[module], options=("-std=c++17",))
                self._modules[module] = mod
            fn = self._functions[(module, name)] = mod.get_function(name)
        return fn

    def warm(self) -> None:
        """Compile and load everything now (before a CUDA-graph capture, or to time compilation)."""
        for module in SOURCES:
            for name in kernel_names(module):
                self._fn(module, name)

    def _rows(self, name: str, x: Any, *extra: Any) -> Any:
        """Launches a row kernel (one block per row of the last axis) on float32 ``x``."""
        cp = self.cp
        n = x.shape[-1]
        x2 = cp.ascontiguousarray(x, dtype=cp.float32)
        y = cp.empty_like(x2)
        rows = x2.size // n if n else 0
        if rows:
            self._fn(name, name)((rows,), (ROW_THREADS,), (x2, *extra[:1], y, np.int32(n), *extra[1:]))
        return y

    def rms_norm(self, x: Any, w: Any, eps: float) -> Any:
        return self._rows("rms_norm", x, self.cp.ascontiguousarray(w, dtype=self.cp.float32), np.float32(eps))

    def softmax_rows(self, x: Any) -> Any:
        return self._rows("softmax_rows", x)

    def attention(self, q: Any, k: Any, v: Any, bias: Any, y: Any, scale: float, softcap: float,
                  causal_offset: int) -> None:
        """Writes ``attention_twin(q, k, v, bias, ...)`` into ``y`` [B, Hq, S, D] (any strides with a
        contiguous last axis, for all five arrays; bias may broadcast with zero strides)."""
        b, hq, sq, d = q.shape
        t = k.shape[2]
        if b * hq * sq == 0:  # CuPy would still launch one block, which writes y[0]
            return

        def st(a):  # element strides of the first three axes
            return [np.int64(x // a.itemsize) for x in a.strides[:3]]

        bias_arg = bias if bias is not None else np.uint64(0)  # a null pointer
        bst = st(bias) if bias is not None else [np.int64(0)] * 3
        threads = 128
        shared = (d + t + 32) * 4
        self._fn("attn_decode", "attn_decode")((b * hq * sq,), (threads,), (
            q, k, v, bias_arg, y, np.int32(hq), np.int32(sq), np.int32(t), np.int32(d), np.int32(hq // k.shape[1]),
            *st(q), *st(k), *st(v), *bst, *st(y), np.float32(scale), np.float32(softcap), np.int32(causal_offset)),
            shared_mem=shared)

    def rotary(self, x4: Any, cos: Any, sin: Any, pid: Any, y4: Any, half: int, interleaved: bool) -> None:
        """RotaryEmbedding of x4 [B, S, H, D] into y4 (same logical shape), both with a contiguous last
        axis. With ``pid`` [B|1, S] (int64), cos/sin are [positions, half] caches; without, [B|1, S, half]."""
        b, s, h, d = x4.shape

        def st(a, axes):
            return [np.int64(a.strides[i] // a.itemsize) if a.shape[i] != 1 else np.int64(0) for i in axes]

        if pid is not None:
            pst, cst = st(pid, (0, 1)), [np.int64(0)] * 2
            pid_arg = pid
        else:
            pst, cst = [np.int64(0)] * 2, st(cos, (0, 1))
            pid_arg = np.uint64(0)
        total = b * s * h * d
        if total:
            self._fn("rotary", "rotary")((-(-total // 256),), (256,), (
                x4, cos, sin, pid_arg, y4, np.int32(b), np.int32(s), np.int32(h), np.int32(d), np.int32(half),
                np.int32(bool(interleaved)), *st(x4, (0, 1, 2)), *pst, *cst, *st(y4, (0, 1, 2))))

    def dq_gemv(self, x2: Any, w: GemvWeight, bias: Any = None, resid: Any = None) -> Any:
        """x2: float32 [m, K] contiguous, m <= GEMV_MAX_ROWS; ``+ bias`` [N] and ``+ resid`` [m, N]
        (contiguous float32) in the same launch."""
        cp = self.cp
        m = x2.shape[0]
        y = cp.empty((m, w.n), cp.float32)
        grid = (-(-w.n // GEMV_WARPS),)
        zero = w.zero if w.zero is not None else w.scale  # unused when the kernel has no zero point
        null = np.uint64(0)
        self._fn("dq", f"dq_gemv_{w.tag()}")(grid, (32 * GEMV_WARPS,), (
            x2, w.codes, w.scale, zero, bias if bias is not None else null, resid if resid is not None else null,
            y, np.int32(m), np.int32(w.k), np.int32(w.n), np.int32(w.words), np.int32(w.block), np.int32(w.nblk)))
        return y

    def gemv_f32(self, x2: Any, wt: Any, ldw: int, n: int, bias: Any = None, resid: Any = None) -> Any:
        """x2: float32 [m, K] contiguous, m <= GEMV_MAX_ROWS; ``wt``: the weight's first element, column
        ``col`` at ``wt[col * ldw:][:K]`` (k-contiguous); returns [m, n] (+ bias [n], + resid [m, n])."""
        cp = self.cp
        m = x2.shape[0]
        y = cp.empty((m, n), cp.float32)
        if m and n:
            rows = next(r for r in (1, 2, 4, 8) if m <= r)
            null = np.uint64(0)
            self._fn("mm", f"gemv_f32_r{rows}")((-(-n // GEMV_F32_WARPS),), (32 * GEMV_F32_WARPS,), (
                x2, wt, bias if bias is not None else null, resid if resid is not None else null, y,
                np.int32(m), np.int32(x2.shape[1]), np.int32(n), np.int64(ldw)))
        return y

    def multi_copy(self, table: np.ndarray) -> None:
        """Runs the copies of ``table`` (rows of :func:`copy_row`) in one launch, on the current stream."""
        if not len(table):
            return
        cp = self.cp
        dev = cp.asarray(table)  # a few hundred bytes up
        units = int(max(table[:, 2] * table[:, 3]) // 4) or 1
        self._fn("multi_copy", "multi_copy")((min(-(-units // 256), 512), len(table)), (256,), (dev,))

    def mm_small(self, a: Any, b: Any) -> Any:
        """``a @ b`` for float32 ``a`` [..., M, K], ``b`` [..., K, N] with at most two batch axes
        (broadcasting), any strides; returns a contiguous [batch..., M, N]."""
        cp = self.cp
        batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        m, k = a.shape[-2:]
        n = b.shape[-1]
        out = cp.empty(batch + (m, n), cp.float32)
        total = out.size
        if total == 0:
            return out
        if k == 0:
            out.fill(0)
            return out
        lead = (1,) * (2 - len(batch)) + batch if len(batch) <= 2 else (int(np.prod(batch[:-1])), batch[-1])
        aa = cp.broadcast_to(a, batch + (m, k)).reshape(lead + (m, k))  # a copy only past two batch axes
        bb = cp.broadcast_to(b, batch + (k, n)).reshape(lead + (k, n))

        def st(x):
            return [np.int64(s // 4 if d != 1 else 0) for s, d in zip(x.strides, x.shape)]

        blocks = min(-(-total // 256), 65535)
        self._fn("mm", "mm_small")((blocks,), (256,), (
            aa, bb, out, np.int32(aa.shape[1]), np.int32(m), np.int32(n), np.int32(k), *st(aa), *st(bb),
            np.int64(total)))
        return out

    def dq_unpack(self, w: GemvWeight, n0: int, n1: int) -> Any:
        cp = self.cp
        cols = n1 - n0
        out = cp.empty((w.k, cols), cp.float32)
        total = w.k * cols
        if total:
            zero = w.zero if w.zero is not None else w.scale
            self._fn("dq", f"dq_unpack_{w.tag()}")((-(-total // 256),), (256,), (
                w.codes, w.scale, zero, out, np.int32(w.k), np.int32(n0), np.int32(cols), np.int32(w.words),
                np.int32(w.block), np.int32(w.nblk)))
        return out
