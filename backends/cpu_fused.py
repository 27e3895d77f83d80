"""Fused and quantized kernels of the ``cpu`` backend (norms, rotary, attention, dequantization)."""

from __future__ import annotations
