"""The `context_embedder`: projects the text encoder's tokens and refines them with
self-attention blocks conditioned on the timestep and the mean text token.

diffusers' `HunyuanVideoTokenRefiner`; Flax paths match its state-dict keys
(``context_embedder.token_refiner.refiner_blocks.0.attn.to_q``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from s2q_jax.models.hunyuan_video.attention import SelfAttention
from s2q_jax.models.hunyuan_video.config import HunyuanVideoConfig
from s2q_jax.models.hunyuan_video.embeddings import TimestepTextEmbedding
from s2q_jax.models.hunyuan_video.layers import AdaGates, FeedForward
from s2q_jax.models.layers import LayerNorm, Linear

# diffusers builds the refiner with its own default MLP ratio, not the config's `mlp_ratio`.
_REFINER_MLP_RATIO = 4.0


class RefinerBlock(nnx.Module):
  """`HunyuanVideoIndividualTokenRefinerBlock`: pre-norm attention and SiLU MLP, gated by temb."""

  def __init__(self, cfg: HunyuanVideoConfig, *, dtype, rngs: nnx.Rngs):
    d = cfg.inner_dim
    self.norm1 = LayerNorm(d, eps=1e-6, dtype=dtype)
    self.attn = SelfAttention(d, cfg.num_attention_heads, cfg.attention_head_dim, dtype=dtype,
                              rngs=rngs)
    self.norm2 = LayerNorm(d, eps=1e-6, dtype=dtype)
    self.ff = FeedForward(d, int(d * _REFINER_MLP_RATIO), jax.nn.silu, dtype=dtype, rngs=rngs)
    self.norm_out = AdaGates(d, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, temb: jax.Array, mask: jax.Array) -> jax.Array:
    gate_attn, gate_mlp = self.norm_out(temb)
    x = x + self.attn(self.norm1(x), mask) * gate_attn
    return x + self.ff(self.norm2(x)) * gate_mlp


class IndividualTokenRefiner(nnx.Module):
  """The stack of refiner blocks (diffusers' `token_refiner`)."""

  def __init__(self, cfg: HunyuanVideoConfig, *, dtype, rngs: nnx.Rngs):
    self.refiner_blocks = nnx.List(
        [RefinerBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_refiner_layers)])

  def __call__(self, x: jax.Array, temb: jax.Array, text_mask: jax.Array) -> jax.Array:
    # Token i attends to token j when both are valid; every row also sees token 0, so a
    # padding row is not empty (its output is discarded downstream anyway).
    pair = text_mask[:, None, :, None] & text_mask[:, None, None, :]  # (B, 1, L, L)
    pair = pair.at[..., 0].set(True)
    for block in self.refiner_blocks:
      x = block(x, temb, pair)
    return x


class TokenRefiner(nnx.Module):
  """(B, L, text_embed_dim) text encoder states + (B, L) mask → (B, L, inner_dim) text tokens."""

  def __init__(self, cfg: HunyuanVideoConfig, *, dtype, rngs: nnx.Rngs):
    d = cfg.inner_dim
    self.time_text_embed = TimestepTextEmbedding(d, cfg.text_embed_dim, guidance=False,
                                                 dtype=dtype, rngs=rngs)
    self.proj_in = Linear(cfg.text_embed_dim, d, dtype=dtype, rngs=rngs)
    self.token_refiner = IndividualTokenRefiner(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, text: jax.Array, timestep: jax.Array, text_mask: jax.Array) -> jax.Array:
    """`text_mask` is boolean; the conditioning uses the mean of the valid text states."""
    weights = text_mask.astype(jnp.float32)[..., None]
    pooled = (text.astype(jnp.float32) * weights).sum(1) / weights.sum(1)
    temb = self.time_text_embed(timestep, pooled.astype(text.dtype))
    return self.token_refiner(self.proj_in(text), temb, text_mask)
