"""CogVideoX joint text+video self-attention.

The score computation is a plain function, `dot_product_attention`, kept
apart from the projections: calibration reads the attention of the
full-precision model through `JointAttention.project` (queries and keys
exactly as the scores see them) without materialising the probabilities.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from s2q_jax.models.embeddings import apply_rotary
from s2q_jax.models.layers import LayerNorm, Linear


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q kᵀ/√d) v for (B, H, S, D) inputs.

  Accelerators get `jax.nn.dot_product_attention` (cuDNN / fused kernels where
  they apply). On CPU, where calibration runs in tests and small jobs, the
  generic implementation is about 2× slower forward and backward than
  normalising after the value product, as done here.
  """
  if jax.default_backend() != "cpu":
    out = jax.nn.dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2))
    return out.swapaxes(1, 2)
  # Scaled on q, not on the (S, S) logits: XLA on CPU would materialise the scale at that size.
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  # The max only keeps exp() in range; it cancels in the ratio, so no gradient flows through it.
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return (out / weights.sum(-1, keepdims=True)).astype(v.dtype)


class JointAttention(nnx.Module):
  """diffusers' `Attention` with `CogVideoXAttnProcessor2_0` (qk-LayerNorm, RoPE on video)."""

  def __init__(self, dim: int, heads: int, head_dim: int, *, qkv_bias: bool, dtype, rngs: nnx.Rngs):
    self.heads, self.head_dim = heads, head_dim
    inner = heads * head_dim
    self.to_q = Linear(dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
    self.to_k = Linear(dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
    self.to_v = Linear(dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
    self.norm_q = LayerNorm(head_dim, eps=1e-6, dtype=dtype)
    self.norm_k = LayerNorm(head_dim, eps=1e-6, dtype=dtype)
    self.to_out = Linear(inner, dim, use_bias=True, dtype=dtype, rngs=rngs)

  def _heads(self, x: jax.Array) -> jax.Array:
    b, s, _ = x.shape
    return x.reshape(b, s, self.heads, self.head_dim).swapaxes(1, 2)

  def project(self, x: jax.Array, text_len: int, rotary=None):
    """Returns q, k, v of shape (B, H, S, D) for the joint sequence x = [text; video]."""
    q = self.norm_q(self._heads(self.to_q(x)))
    k = self.norm_k(self._heads(self.to_k(x)))
    v = self._heads(self.to_v(x))
    if rotary is not None:
      cos, sin = rotary
      q = q.at[:, :, text_len:].set(apply_rotary(q[:, :, text_len:], cos, sin))
      k = k.at[:, :, text_len:].set(apply_rotary(k[:, :, text_len:], cos, sin))
    return q, k, v

  def __call__(self, x: jax.Array, text_len: int, rotary=None) -> jax.Array:
    q, k, v = self.project(x, text_len, rotary)
    out = dot_product_attention(q, k, v)
    b, _, s, _ = out.shape
    return self.to_out(out.swapaxes(1, 2).reshape(b, s, self.heads * self.head_dim))
