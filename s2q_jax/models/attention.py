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


# On CPU, (B, H, S_q, S_k) float32 logits up to this size are computed in one piece. Beyond
# it (CogVideoX-2B at 17,776 tokens: 38 GB per sample, several of them alive in a training
# step's backward pass) queries go in tiles whose logits stay near this size. 256 MiB keeps every
# measured small-model result on the one-piece path (the embedded model: 4 heads × 520² × 4 B
# = 4.3 MB per sample) and bounds the one-piece path's fwd+bwd temporaries to a few GiB.
MAX_MAP_BYTES = 256 * 2**20


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q kᵀ/√d) v for (B, H, S, D) inputs (keys and values may have another S).

  Accelerators get `jax.nn.dot_product_attention` (cuDNN / fused kernels where
  they apply). On CPU, where calibration runs in tests and small jobs, the
  generic implementation is about 2× slower forward and backward than
  normalising after the value product, as done here; long sequences use
  `tiled_attention` (see MAX_MAP_BYTES).
  """
  if jax.default_backend() != "cpu":
    out = jax.nn.dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2))
    return out.swapaxes(1, 2)
  b, h, s_q, _ = q.shape
  row_bytes = b * h * k.shape[2] * 4  # one query's float32 logits over all heads and batch
  if row_bytes * s_q <= MAX_MAP_BYTES:
    return _attention(q, k, v)
  return tiled_attention(q, k, v, tile=max(1, MAX_MAP_BYTES // row_bytes))


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  # Scaled on q, not on the (S, S) logits: XLA on CPU would materialise the scale at that size.
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  # The max only keeps exp() in range; it cancels in the ratio, so no gradient flows through it.
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return (out / weights.sum(-1, keepdims=True)).astype(v.dtype)


def tiled_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, tile: int) -> jax.Array:
  """`_attention` on at most `tile` queries at a time: O(B·H·tile·S_k) memory, not O(S_q·S_k).

  Each query's softmax spans all keys, so tiles are independent and exact. The
  loop (`lax.map`) reuses one tile's buffers; `jax.checkpoint` makes the
  backward pass recompute each tile's weights instead of storing them all.
  """
  b, h, s_q, d = q.shape
  n = -(-s_q // tile)
  tile = -(-s_q // n)  # as even as possible: the padding is under one query per tile
  # Padded queries are zeros (uniform weights, finite) and are cut off below.
  q = jnp.pad(q, ((0, 0), (0, 0), (0, n * tile - s_q), (0, 0)))
  tiles = jnp.moveaxis(q.reshape(b, h, n, tile, d), 2, 0)
  step = jax.checkpoint(_attention)
  out = jax.lax.map(lambda qt: step(qt, k, v), tiles)
  return jnp.moveaxis(out, 0, 2).reshape(b, h, n * tile, v.shape[-1])[:, :, :s_q]


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
