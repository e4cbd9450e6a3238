"""Wan's self- and cross-attention, and its 3D rotary position table.

As in CogVideoX, `WanAttention.project` returns the queries and keys exactly
as the scores see them, so calibration can read the attention of the
full-precision model without materialising the probabilities.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2q_jax.models.attention import dot_product_attention
from s2q_jax.models.embeddings import apply_rotary
from s2q_jax.models.layers import Linear

Rotary = tuple[jax.Array, jax.Array]  # (cos, sin), each (tokens, head_dim)


class RMSNorm(nnx.Module):
  """`torch.nn.RMSNorm` over the last axis with a learned scale; statistics in float32."""

  def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype = jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rotary_table(head_dim: int, grid: tuple[int, int, int], max_seq_len: int,
                 theta: float = 10000.0) -> Rotary:
  """(cos, sin), each (f·h·w, head_dim) float32, for a (f, h, w) grid of patches.

  The head dimension splits into frame, height and width parts, the last two
  of 2·⌊head_dim/6⌋ channels each; every part rotates interleaved channel
  pairs by its axis' integer position. Angles are computed in float64 with
  numpy as diffusers does; only the per-axis tables enter the graph, and the
  full table (tokens × head_dim, large for real videos) is broadcast in it.
  """
  if max(grid) > max_seq_len:
    raise ValueError(f"the patch grid {grid} (frames, height, width) exceeds "
                     f"rope_max_seq_len={max_seq_len} positions along an axis; "
                     "use a smaller input or a model trained with a larger rope_max_seq_len")
  hw_dim = 2 * (head_dim // 6)
  cos, sin = [], []
  for axis, dim in enumerate((head_dim - 2 * hw_dim, hw_dim, hw_dim)):
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.repeat(np.outer(np.arange(grid[axis], dtype=np.float64), freqs), 2, axis=1)
    shape = [1, 1, 1, dim]
    shape[axis] = grid[axis]
    for out, fn in ((cos, np.cos), (sin, np.sin)):
      table = jnp.asarray(fn(angles).astype(np.float32)).reshape(shape)
      out.append(jnp.broadcast_to(table, (*grid, dim)))
  return (jnp.concatenate(cos, axis=-1).reshape(-1, head_dim),
          jnp.concatenate(sin, axis=-1).reshape(-1, head_dim))


class WanAttention(nnx.Module):
  """diffusers' `WanAttention` with `WanAttnProcessor`.

  Self-attention (context None, rotary given) or cross-attention to text;
  q and k are RMS-normalised over all heads together before the heads are
  split. Image-to-video cross-attention adds a second attention of the same
  queries to projected image tokens (`add_k_proj`, `add_v_proj`).
  """

  def __init__(self, dim: int, heads: int, *, eps: float, added_kv_dim: int | None = None,
               dtype, rngs: nnx.Rngs):
    self.heads = heads
    self.to_q = Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.to_k = Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.to_v = Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.to_out = Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.norm_q = RMSNorm(dim, eps=eps, dtype=dtype)
    self.norm_k = RMSNorm(dim, eps=eps, dtype=dtype)
    if added_kv_dim is not None:
      self.add_k_proj = Linear(added_kv_dim, dim, dtype=dtype, rngs=rngs)
      self.add_v_proj = Linear(added_kv_dim, dim, dtype=dtype, rngs=rngs)
      self.norm_added_k = RMSNorm(dim, eps=eps, dtype=dtype)
    else:
      self.add_k_proj = self.add_v_proj = self.norm_added_k = None

  def _heads(self, x: jax.Array) -> jax.Array:
    b, s, d = x.shape
    return x.reshape(b, s, self.heads, d // self.heads).swapaxes(1, 2)

  def project(self, x: jax.Array, context: jax.Array | None = None,
              rotary: Rotary | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v of shape (B, H, S, D); keys and values come from `context` (x when None)."""
    context = x if context is None else context
    q = self._heads(self.norm_q(self.to_q(x)))
    k = self._heads(self.norm_k(self.to_k(context)))
    v = self._heads(self.to_v(context))
    if rotary is not None:
      q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
    return q, k, v

  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               rotary: Rotary | None = None, image_context: jax.Array | None = None
               ) -> jax.Array:
    q, k, v = self.project(x, context, rotary)
    out = dot_product_attention(q, k, v)
    if image_context is not None:
      if self.add_k_proj is None:
        raise ValueError("image context given to an attention without image projections "
                         "(the config has no added_kv_proj_dim)")
      k_img = self._heads(self.norm_added_k(self.add_k_proj(image_context)))
      out = out + dot_product_attention(q, k_img, self._heads(self.add_v_proj(image_context)))
    b, _, s, _ = out.shape
    return self.to_out(out.swapaxes(1, 2).reshape(b, s, -1))
