"""Fused low-bit matmuls: 2–8-bit weights (4-bit packed two per byte) × per-token
2–8-bit activations (int6 by default), int32 accumulation, scales and bias in the epilogue.

  qw = quantize_weight(kernel_kn, bits=4)            # or QuantizedWeight.from_codes(...)
  y = w4a6_matmul(x, qw, bias, act_bits=6, backend="auto")

Back-ends (`BACKENDS`): `reference` (plain JAX, the oracle), `xla_int8`
(XLA's int8 dot on (N, K) int8 weights, `QuantizedWeight.unpacked()`), `gpu`
(Pallas, Triton lowering: the portable GPU kernel), `mosaic_gpu` (Pallas
Mosaic GPU: TMA and int8 wgmma, Hopper only), `tpu` (Pallas Mosaic TPU),
`interpret` / `mosaic_gpu_interpret` / `tpu_interpret` (those kernel bodies
run by the Pallas interpreters, for CPU tests), and `auto` (the fastest
measured per device and shape, see `autotune`; `xla_int8` on CPU).
"""
from pallas_kernels.ops import BACKENDS, int8_matmul, resolve_backend, w4a6_matmul
from pallas_kernels.weights import (QuantizedWeight, dequantize_weight, quantize_weight,
                                    unpack_codes)

__all__ = ["BACKENDS", "QuantizedWeight", "dequantize_weight", "int8_matmul", "quantize_weight",
           "resolve_backend", "unpack_codes", "w4a6_matmul"]
