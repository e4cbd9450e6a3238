"""Q-VDiT's Token-aware Quantization Estimator: a rank-1, per-frame-scaled error branch.

    y = Q(x̃) Ŵ + b + (M_tok ⊙ (Q(x̃) α)) βᵀ

α (K,) and β (N,) model the quantization error of the weights as seen through
the quantized input; M (1 + F,) scales the branch per token group: entry 0
for the text tokens, entry 1 + f for the video tokens of latent frame f
(inputs are a text-first sequence, `n_text` = 0 for video tokens alone). Inputs
without a token axis (the adaLN modulation's (B, D) conditioning vector) and
layers with `n_text` None (cross-attention keys and values, which read text)
use M[0]. The branch
costs one matrix-vector product and one outer product per token, and is stored
next to the codes: it does not fold into the weights.
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from s2q_jax.quant.qlinear import QuantLinear, QuantParam


class LowRankA(QuantParam):
  """α (K,): input side of the rank-1 error branch."""


class LowRankB(QuantParam):
  """β (N,): output side of the rank-1 error branch."""


class FrameScale(QuantParam):
  """M (1 + F,): the branch's scale for the text tokens and for each latent frame."""


def token_frame_scale(scale: jax.Array, n_tokens: int, n_text: int) -> jax.Array:
  """(n_tokens,) per-token factors M[group(token)] for a text-first joint sequence."""
  frames = scale.shape[0] - 1
  n_video = n_tokens - n_text
  if n_video < 0 or n_video % frames:
    raise ValueError(f"{n_tokens} tokens are not {n_text} text tokens plus {frames} equal "
                     "frames: the estimator's frame count is fixed at calibration")
  group = jnp.concatenate([jnp.zeros((n_text,), jnp.int32),
                           1 + jnp.repeat(jnp.arange(frames), n_video // frames)])
  return scale[group]


def branch(x_quant: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array,
           n_text: int | None) -> jax.Array:
  """(M_tok ⊙ (Q(x̃) α)) βᵀ for a quantized input x_quant (..., K)."""
  z = x_quant.astype(jnp.float32) @ a.astype(jnp.float32)  # (...,)
  if x_quant.ndim >= 3 and n_text is not None:
    z = z * token_frame_scale(scale, x_quant.shape[-2], n_text)
  else:
    z = z * scale[0]
  return z[..., None] * b.astype(jnp.float32)


class TokenAwareLinear(QuantLinear):
  """`QuantLinear` plus the rank-1 branch; α starts small, β at 0 (the branch starts off)."""

  def __init__(self, linear, *, w_bits: int, a_bits: int | None, path: str = "",
               frames: int = 1, n_text: int | None = 0, seed: int = 0):
    super().__init__(linear, w_bits=w_bits, a_bits=a_bits, path=path)
    # β = 0 makes the branch start at exactly zero; α ≠ 0 so that β's gradient is not zero.
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()))
    self.lowrank_a = LowRankA(1e-2 * jax.random.normal(key, (self.in_features,)))
    self.lowrank_b = LowRankB(jnp.zeros((self.out_features,)))
    self.frame_scale = FrameScale(jnp.ones((frames + 1,)))
    self.n_text = n_text

  def __call__(self, x: jax.Array) -> jax.Array:
    y = super().__call__(x)
    xt = self.quantize_input(self.transform_input(x.astype(jnp.float32)))
    extra = branch(xt, self.lowrank_a[...], self.lowrank_b[...], self.frame_scale[...],
                   self.n_text)
    return (y.astype(jnp.float32) + extra).astype(y.dtype)

  def export(self) -> dict[str, jax.Array]:
    return {**super().export(), "lowrank_a": self.lowrank_a[...],
            "lowrank_b": self.lowrank_b[...], "frame_scale": self.frame_scale[...]}
