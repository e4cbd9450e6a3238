"""Flax NNX port of transformers' `T5EncoderModel`, the text encoder of CogVideoX.

The numerics follow transformers line by line, dtype handling included:
the RMS norm takes its statistics in float32 and rounds to a half-precision
weight's dtype before scaling, q·k is not scaled by 1/√d (T5 folds that into
the initialisation), and the relative position bias is computed by the first
layer and added to every layer's scores. Parameter names are this module's
own; `s2q_jax.models.t5_loading` maps them to transformers' keys.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2q_jax.models.layers import Linear
from s2q_jax.models.t5_config import T5EncoderConfig

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """(length, length) int32 bucket of key position − query position, bidirectional.

  Half the buckets hold the sign; of the rest, the first half are exact
  distances and the others log-spaced up to `max_distance` (all farther
  distances share the last). Computed in numpy float32 in transformers'
  operation order, so positions on a bucket boundary round as they did in
  training; the lengths are static, so this is a constant of the program.
  """
  position = np.arange(length, dtype=np.int64)
  relative = position[None, :] - position[:, None]
  num_buckets //= 2
  buckets = (relative > 0) * num_buckets
  distance = np.abs(relative)
  max_exact = num_buckets // 2
  # Distances below max_exact take the exact bucket (`where` below); clamping them
  # keeps the unused log finite.
  log_ratio = np.log(np.maximum(distance, max_exact).astype(np.float32) / np.float32(max_exact))
  far = max_exact + (log_ratio / np.float32(math.log(max_distance / max_exact))
                     * np.float32(num_buckets - max_exact)).astype(np.int64)
  far = np.minimum(far, num_buckets - 1)
  return (buckets + np.where(distance < max_exact, distance, far)).astype(np.int32)


class RMSNorm(nnx.Module):
  """transformers' `T5LayerNorm`: x / rms(x) · weight, no mean, no bias.

  The mean square is taken in float32; the normalised activations are rounded
  to the weight's dtype only when that is half precision, as transformers does.
  """

  def __init__(self, dim: int, *, eps: float, dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    variance = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(variance + self.eps)
    scale = self.scale[...]
    if scale.dtype in (jnp.bfloat16, jnp.float16):
      y = y.astype(scale.dtype)
    return scale * y


class SelfAttention(nnx.Module):
  """Multi-head self-attention with an additive position bias and no 1/√d scaling."""

  def __init__(self, cfg: T5EncoderConfig, *, dtype, rngs: nnx.Rngs):
    self.num_heads, self.head_dim = cfg.num_heads, cfg.d_kv
    self.q = Linear(cfg.d_model, cfg.inner_dim, use_bias=False, dtype=dtype, rngs=rngs)
    self.k = Linear(cfg.d_model, cfg.inner_dim, use_bias=False, dtype=dtype, rngs=rngs)
    self.v = Linear(cfg.d_model, cfg.inner_dim, use_bias=False, dtype=dtype, rngs=rngs)
    self.o = Linear(cfg.inner_dim, cfg.d_model, use_bias=False, dtype=dtype, rngs=rngs)

  def _heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:2], self.num_heads, self.head_dim)  # (B, L, H, D)

  def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None) -> jax.Array:
    q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
    out = jax.nn.dot_product_attention(q, k, v, bias=position_bias.astype(q.dtype), mask=mask,
                                       scale=1.0)
    return self.o(out.reshape(*x.shape[:2], self.num_heads * self.head_dim))


class FeedForward(nnx.Module):
  """`T5DenseGatedActDense` (wo(act(wi_0 x) · wi_1 x)) or, ungated, `T5DenseActDense`."""

  def __init__(self, cfg: T5EncoderConfig, *, dtype, rngs: nnx.Rngs):
    self.act = _ACTIVATIONS[cfg.dense_act_fn]
    self.gated = cfg.is_gated_act
    if self.gated:
      self.wi_0 = Linear(cfg.d_model, cfg.d_ff, use_bias=False, dtype=dtype, rngs=rngs)
      self.wi_1 = Linear(cfg.d_model, cfg.d_ff, use_bias=False, dtype=dtype, rngs=rngs)
    else:
      self.wi = Linear(cfg.d_model, cfg.d_ff, use_bias=False, dtype=dtype, rngs=rngs)
    self.wo = Linear(cfg.d_ff, cfg.d_model, use_bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
    return self.wo(h)


class T5Block(nnx.Module):
  """Pre-norm residual self-attention, then pre-norm residual feed-forward."""

  def __init__(self, cfg: T5EncoderConfig, *, dtype, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=dtype)
    self.attn = SelfAttention(cfg, dtype=dtype, rngs=rngs)
    self.ff_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=dtype)
    self.ff = FeedForward(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), position_bias, mask)
    return x + self.ff(self.ff_norm(x))


class T5Encoder(nnx.Module):
  """`encoder(input_ids (B, L)) → (B, L, d_model)`: `T5EncoderModel(...).last_hidden_state`."""

  def __init__(self, config: T5EncoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.embedding = nnx.Param(
        nnx.initializers.normal(1.0)(rngs.params(), (config.vocab_size, config.d_model), dtype))
    # transformers keeps this table in the first layer's attention; every layer adds its bias.
    self.relative_attention_bias = nnx.Param(nnx.initializers.normal(config.d_model ** -0.5)(
        rngs.params(), (config.relative_attention_num_buckets, config.num_heads), dtype))
    self.blocks = nnx.List([T5Block(config, dtype=dtype, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype)

  def position_bias(self, length: int) -> jax.Array:
    """(1, heads, length, length) additive attention bias shared by every layer."""
    cfg = self.config
    buckets = relative_position_buckets(length, cfg.relative_attention_num_buckets,
                                        cfg.relative_attention_max_distance)
    return jnp.take(self.relative_attention_bias[...], buckets, axis=0).transpose(2, 0, 1)[None]

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """`attention_mask` (B, L), 1 for tokens to attend to, hides padding keys.

    CogVideoX's pipeline passes none: its text embeddings are computed with
    the padding attended to, and its transformer was trained on them.
    """
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids must be integer token ids of shape (batch, length), got "
                       f"{input_ids.dtype} {input_ids.shape}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask must have the shape of input_ids {input_ids.shape}, got "
                       f"{attention_mask.shape}")
    mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
    # Ids past the table would read NaN (jnp.take's fill mode) rather than fail:
    # `encode_prompts` checks tokenizer ids against vocab_size before calling.
    x = jnp.take(self.embedding[...], input_ids, axis=0)
    position_bias = self.position_bias(input_ids.shape[1])
    for block in self.blocks:
      x = block(x, position_bias, mask)
    return self.final_norm(x)
