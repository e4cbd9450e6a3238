"""Fused low-bit matmuls: int4 (2–8 bit) weights × per-token int6 (2–8 bit) activations.

Back-ends: `reference` (plain JAX, the oracle), `interpret` (the GPU kernel
body run by the Pallas interpreter, for CPU tests), `gpu` (Pallas, Triton
lowering), `tpu` (Pallas Mosaic TPU), `tpu_interpret`, and `auto`.
"""
from pallas_kernels.ops import BACKENDS, w4a6_matmul
from pallas_kernels.weights import (QuantizedWeight, dequantize_weight, quantize_weight,
                                    unpack_codes)

__all__ = ["BACKENDS", "QuantizedWeight", "dequantize_weight", "quantize_weight", "unpack_codes",
           "w4a6_matmul"]
