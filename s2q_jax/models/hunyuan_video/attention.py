"""HunyuanVideo's three attentions, as diffusers' `Attention` computes them.

* `SelfAttention`: the token refiner's, on text tokens with a (B, 1, L, L) mask.
* `JointAttention`: the dual-stream blocks'; video and text have their own
  projections and qk-norms, attend jointly over [video; text].
* `SingleStreamAttention`: the single-stream blocks'; one set of projections
  on the joint sequence and no output projection (the block's `proj_out` is
  it). Its blocks order it [text; video] where diffusers has [video; text]:
  token-wise layers and attention do not see the order, and text first is the
  layout every block stream has for calibration (`models.interface`).

`project` returns q, k, v exactly as the scores see them, (B, H, S, D), so
calibration can read the full-precision attention without materialising the
probabilities (as with CogVideoX's `JointAttention.project`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from s2q_jax.models.embeddings import apply_rotary
from s2q_jax.models.layers import Linear

Rotary = tuple[jax.Array, jax.Array]  # (cos, sin), each (video tokens, head_dim)


class RMSNorm(nnx.Module):
  """x / rms(x) · scale over the last axis, statistics in float32 (diffusers' `RMSNorm`)."""

  def __init__(self, dim: int, *, eps: float, dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """softmax(q kᵀ/√d) v over the keys `mask` allows; (B, H, S, D) inputs.

  `mask` is boolean, broadcastable to (B, H, S_q, S_k); every query must be
  allowed at least one key (both callers guarantee it).
  """
  out = jax.nn.dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2),
                                     mask=mask)
  return out.swapaxes(1, 2)


def _split_heads(x: jax.Array, heads: int) -> jax.Array:
  b, s, _ = x.shape
  return x.reshape(b, s, heads, -1).swapaxes(1, 2)


def _merge_heads(x: jax.Array) -> jax.Array:
  b, h, s, d = x.shape
  return x.swapaxes(1, 2).reshape(b, s, h * d)


def _rotate_video(x: jax.Array, rotary: Rotary | None, start: int = 0) -> jax.Array:
  """RoPE on the video tokens of (B, H, S, D) x, tokens [start, start + len(cos)); text
  tokens on either side stay unrotated."""
  if rotary is None:
    return x
  cos, sin = rotary
  end = start + cos.shape[0]
  return jnp.concatenate([x[:, :, :start], apply_rotary(x[:, :, start:end], cos, sin),
                          x[:, :, end:]], axis=2)


class SelfAttention(nnx.Module):
  """diffusers' default `Attention` (no qk-norm, no RoPE), used by the token refiner."""

  def __init__(self, dim: int, heads: int, head_dim: int, *, dtype, rngs: nnx.Rngs):
    self.heads = heads
    inner = heads * head_dim
    self.to_q = Linear(dim, inner, dtype=dtype, rngs=rngs)
    self.to_k = Linear(dim, inner, dtype=dtype, rngs=rngs)
    self.to_v = Linear(dim, inner, dtype=dtype, rngs=rngs)
    self.to_out = Linear(inner, dim, dtype=dtype, rngs=rngs)

  def project(self, x: jax.Array):
    return tuple(_split_heads(layer(x), self.heads) for layer in (self.to_q, self.to_k, self.to_v))

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    return self.to_out(_merge_heads(masked_attention(*self.project(x), mask)))


class JointAttention(nnx.Module):
  """Dual-stream attention (`Attention(added_kv_proj_dim=...)` + `HunyuanVideoAttnProcessor2_0`)."""

  def __init__(self, dim: int, heads: int, head_dim: int, *, dtype, rngs: nnx.Rngs):
    self.heads = heads
    inner = heads * head_dim
    self.to_q = Linear(dim, inner, dtype=dtype, rngs=rngs)
    self.to_k = Linear(dim, inner, dtype=dtype, rngs=rngs)
    self.to_v = Linear(dim, inner, dtype=dtype, rngs=rngs)
    self.norm_q = RMSNorm(head_dim, eps=1e-6, dtype=dtype)
    self.norm_k = RMSNorm(head_dim, eps=1e-6, dtype=dtype)
    self.add_q_proj = Linear(dim, inner, dtype=dtype, rngs=rngs)
    self.add_k_proj = Linear(dim, inner, dtype=dtype, rngs=rngs)
    self.add_v_proj = Linear(dim, inner, dtype=dtype, rngs=rngs)
    self.norm_added_q = RMSNorm(head_dim, eps=1e-6, dtype=dtype)
    self.norm_added_k = RMSNorm(head_dim, eps=1e-6, dtype=dtype)
    self.to_out = Linear(inner, dim, dtype=dtype, rngs=rngs)
    self.to_add_out = Linear(inner, dim, dtype=dtype, rngs=rngs)

  def project(self, video: jax.Array, text: jax.Array, rotary: Rotary | None = None):
    """q, k, v (B, H, N + L, D) of the joint sequence [video; text]."""
    h = self.heads
    q = _rotate_video(self.norm_q(_split_heads(self.to_q(video), h)), rotary)
    k = _rotate_video(self.norm_k(_split_heads(self.to_k(video), h)), rotary)
    v = _split_heads(self.to_v(video), h)
    text_q = self.norm_added_q(_split_heads(self.add_q_proj(text), h))
    text_k = self.norm_added_k(_split_heads(self.add_k_proj(text), h))
    text_v = _split_heads(self.add_v_proj(text), h)
    return (jnp.concatenate([q, text_q], axis=2), jnp.concatenate([k, text_k], axis=2),
            jnp.concatenate([v, text_v], axis=2))

  def __call__(self, video: jax.Array, text: jax.Array, mask: jax.Array,
               rotary: Rotary | None = None) -> tuple[jax.Array, jax.Array]:
    out = _merge_heads(masked_attention(*self.project(video, text, rotary), mask))
    n = video.shape[1]
    return self.to_out(out[:, :n]), self.to_add_out(out[:, n:])


class SingleStreamAttention(nnx.Module):
  """Single-stream attention (`Attention(pre_only=True)`): shared projections, no to_out."""

  def __init__(self, dim: int, heads: int, head_dim: int, *, dtype, rngs: nnx.Rngs):
    self.heads = heads
    inner = heads * head_dim
    self.to_q = Linear(dim, inner, dtype=dtype, rngs=rngs)
    self.to_k = Linear(dim, inner, dtype=dtype, rngs=rngs)
    self.to_v = Linear(dim, inner, dtype=dtype, rngs=rngs)
    self.norm_q = RMSNorm(head_dim, eps=1e-6, dtype=dtype)
    self.norm_k = RMSNorm(head_dim, eps=1e-6, dtype=dtype)

  def project(self, x: jax.Array, rotary: Rotary | None = None, n_text: int = 0):
    """q, k, v (B, H, S, D) of x = [text; video] with n_text text tokens; RoPE on the video."""
    h = self.heads
    q = _rotate_video(self.norm_q(_split_heads(self.to_q(x), h)), rotary, n_text)
    k = _rotate_video(self.norm_k(_split_heads(self.to_k(x), h)), rotary, n_text)
    return q, k, _split_heads(self.to_v(x), h)

  def __call__(self, x: jax.Array, mask: jax.Array, rotary: Rotary | None = None,
               n_text: int = 0) -> jax.Array:
    """(B, S, dim) → (B, S, heads·head_dim), before any output projection; `mask` (B, 1, 1, S)
    over x's keys."""
    return _merge_heads(masked_attention(*self.project(x, rotary, n_text), mask))
