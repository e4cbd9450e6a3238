"""HunyuanVideo's two transformer block kinds, with one calling convention:

  block(video (B, N, D), text (B, L, D), temb (B, D), attention_mask, rotary) → (video, text)

`attention_mask` is boolean (B, 1, 1, N + L) over the keys of the joint
sequence [video; text]; `rotary` is the (cos, sin) of the N video tokens.

For calibration (`models.interface.CalibrationBlock`) a block's stream is
(text, video), text first, and its context (temb, attention_mask).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from s2q_jax.models.hunyuan_video.attention import JointAttention, Rotary, SingleStreamAttention
from s2q_jax.models.hunyuan_video.config import HunyuanVideoConfig
from s2q_jax.models.hunyuan_video.layers import AdaLayerNormZero, FeedForward
from s2q_jax.models.layers import LayerNorm, Linear, gelu_tanh


def text_first(attention_mask: jax.Array, n_video: int) -> jax.Array:
  """The (B, 1, 1, N + L) key mask over [video; text] reordered for [text; video]."""
  return jnp.concatenate([attention_mask[..., n_video:], attention_mask[..., :n_video]], axis=-1)


class _TextFirstStream:
  """`calibration_call` for both block kinds: the stream is (text, video)."""

  def calibration_call(self, stream, context, extras):
    text, video = stream
    video, text = self(video, text, context[0], context[1], extras)
    return text, video


class DualStreamBlock(nnx.Module, _TextFirstStream):
  """`HunyuanVideoTransformerBlock`: video and text keep separate weights (norms, projections,
  MLPs) and meet only in the joint attention."""

  def __init__(self, cfg: HunyuanVideoConfig, *, dtype, rngs: nnx.Rngs):
    d = cfg.inner_dim
    self.norm1 = AdaLayerNormZero(d, 6, dtype=dtype, rngs=rngs)
    self.norm1_context = AdaLayerNormZero(d, 6, dtype=dtype, rngs=rngs)
    self.attn = JointAttention(d, cfg.num_attention_heads, cfg.attention_head_dim, dtype=dtype,
                               rngs=rngs)
    self.norm2 = LayerNorm(d, eps=1e-6, elementwise_affine=False, dtype=dtype)
    self.ff = FeedForward(d, cfg.mlp_dim, gelu_tanh, dtype=dtype, rngs=rngs)
    self.norm2_context = LayerNorm(d, eps=1e-6, elementwise_affine=False, dtype=dtype)
    self.ff_context = FeedForward(d, cfg.mlp_dim, gelu_tanh, dtype=dtype, rngs=rngs)

  def __call__(self, video: jax.Array, text: jax.Array, temb: jax.Array,
               attention_mask: jax.Array, rotary: Rotary | None = None):
    n_video, gate, mlp_shift, mlp_scale, mlp_gate = self.norm1(video, temb)
    n_text, t_gate, t_mlp_shift, t_mlp_scale, t_mlp_gate = self.norm1_context(text, temb)
    attn_video, attn_text = self.attn(n_video, n_text, attention_mask, rotary)
    video = video + attn_video * gate
    text = text + attn_text * t_gate
    video = video + mlp_gate * self.ff(self.norm2(video) * (1 + mlp_scale) + mlp_shift)
    text = text + t_mlp_gate * self.ff_context(
        self.norm2_context(text) * (1 + t_mlp_scale) + t_mlp_shift)
    return video, text

  def self_attention_qk(self, stream, context, extras):
    text, video = stream
    temb, mask = context
    n_video = self.norm1(video, temb)[0]
    n_text = self.norm1_context(text, temb)[0]
    q, k, _ = self.attn.project(n_video, n_text, extras)
    n = video.shape[1]
    reorder = lambda x: jnp.concatenate([x[:, :, n:], x[:, :, :n]], axis=2)  # noqa: E731
    return reorder(q), reorder(k), text_first(mask, n)[:, 0, 0]


class SingleStreamBlock(nnx.Module, _TextFirstStream):
  """`HunyuanVideoSingleTransformerBlock`: one set of weights for [video; text]; attention
  and MLP run in parallel on the same normed input and share the output projection."""

  def __init__(self, cfg: HunyuanVideoConfig, *, dtype, rngs: nnx.Rngs):
    d = cfg.inner_dim
    self.attn = SingleStreamAttention(d, cfg.num_attention_heads, cfg.attention_head_dim,
                                      dtype=dtype, rngs=rngs)
    self.norm = AdaLayerNormZero(d, 3, dtype=dtype, rngs=rngs)
    self.proj_mlp = Linear(d, cfg.mlp_dim, dtype=dtype, rngs=rngs)
    self.proj_out = Linear(d + cfg.mlp_dim, d, dtype=dtype, rngs=rngs)

  def __call__(self, video: jax.Array, text: jax.Array, temb: jax.Array,
               attention_mask: jax.Array, rotary: Rotary | None = None):
    n_text = text.shape[1]
    x = jnp.concatenate([text, video], axis=1)
    normed, gate = self.norm(x, temb)
    mask = text_first(attention_mask, video.shape[1])
    mixed = jnp.concatenate([self.attn(normed, mask, rotary, n_text),
                             gelu_tanh(self.proj_mlp(normed))], axis=-1)
    x = x + gate * self.proj_out(mixed)
    return x[:, n_text:], x[:, :n_text]

  def self_attention_qk(self, stream, context, extras):
    text, video = stream
    temb, mask = context
    normed = self.norm(jnp.concatenate([text, video], axis=1), temb)[0]
    q, k, _ = self.attn.project(normed, extras, text.shape[1])
    return q, k, text_first(mask, video.shape[1])[:, 0, 0]
