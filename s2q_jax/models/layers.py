"""Basic layers shared by the video DiT models.

`Linear` is the single module type quantization acts on: every projection in
the model is one, so `s2q_jax.quant` can find them by their graph path
(e.g. ``transformer_blocks.3.attn1.to_q``) and swap them for quantized ones
without the model code knowing.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):
  """y = x @ kernel + bias, with a Flax-layout kernel of shape (in, out).

  Computation runs in the kernel's dtype with float32 accumulation, so a
  bfloat16 model does bfloat16 matmuls on accelerators.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    y = jnp.matmul(x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(kernel.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32 (as torch does)."""

  def __init__(self, dim: int, *, eps: float = 1e-5, elementwise_affine: bool = True,
               use_bias: bool = True, dtype: jnp.dtype = jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), dtype)) if elementwise_affine else None
    self.bias = nnx.Param(jnp.zeros((dim,), dtype)) if elementwise_affine and use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)
