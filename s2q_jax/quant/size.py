"""Storage of a model before and after quantization, measured from the arrays themselves."""
from __future__ import annotations

import numpy as np
from flax import nnx

from pallas_kernels import packing
from s2q_jax.quant.apply import quantized_layers
from s2q_jax.quant.qlinear import QuantParam

BF16_BYTES = 2


def storage_bytes(model: nnx.Module) -> dict:
  """{fp_bytes, quant_bytes, compression, quantized_layer_bytes}.

  fp_bytes: every original parameter stored in bf16. quant_bytes: each
  quantized layer as deployed (bit-packed codes, float32 scales, bf16 bias
  and transforms) plus every other parameter in bf16.
  """
  original = nnx.state(model, nnx.All(nnx.Param, nnx.Not(QuantParam)))
  fp_bytes = sum(int(np.prod(v.shape)) * BF16_BYTES for v in _leaves(original))
  quant_bytes, layer_bytes = fp_bytes, 0
  for _, layer in quantized_layers(model):
    # The layer's original kernel and bias were counted in bf16 above; replace them.
    quant_bytes -= BF16_BYTES * layer.kernel.size
    if layer.bias is not None:
      quant_bytes -= BF16_BYTES * layer.bias.size
    exported = layer.export()
    codes = np.asarray(exported.pop("codes")).T  # (N, K): rows along the reduction axis
    stored = packing.pack(codes, layer.w_bits).nbytes
    stored += np.asarray(exported.pop("scales"), np.float32).nbytes
    stored += sum(int(np.prod(v.shape)) * BF16_BYTES for v in exported.values())
    quant_bytes += stored
    layer_bytes += stored
  return {"fp_bytes": fp_bytes, "quant_bytes": quant_bytes,
          "compression": fp_bytes / quant_bytes, "quantized_layer_bytes": layer_bytes}


def _leaves(state) -> list:
  return [v for _, v in nnx.to_flat_state(state)]
