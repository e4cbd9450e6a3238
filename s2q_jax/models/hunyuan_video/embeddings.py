"""HunyuanVideo's input embeddings: video patches, 3D RoPE and the conditioning vector.

Flax paths follow diffusers' state-dict names (``time_text_embed.timestep_embedder.linear_1``).
"""
from __future__ import annotations

import einops
import jax
import numpy as np
from flax import nnx

from s2q_jax.models.embeddings import timestep_embedding
from s2q_jax.models.layers import Linear

# diffusers' `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)` for every scalar input.
SINUSOID_DIM = 256


def sinusoid(t: jax.Array) -> jax.Array:
  """(B,) timesteps or guidance scales → (B, 256) float32 sinusoids."""
  return timestep_embedding(t, SINUSOID_DIM, flip_sin_to_cos=True, freq_shift=0)


class PatchEmbed(nnx.Module):
  """`x_embedder`: non-overlapping (p_t, p, p) patches of (B, C, F, H, W) latents.

  diffusers uses a Conv3d with stride = kernel; as a `Linear` on flattened
  (c, p_t, p, q) patches it is the same map and quantization rules see it.
  """

  def __init__(self, in_channels: int, dim: int, patch_size: int, patch_size_t: int, *, dtype,
               rngs: nnx.Rngs):
    self.patch_size, self.patch_size_t = patch_size, patch_size_t
    self.proj = Linear(in_channels * patch_size_t * patch_size * patch_size, dim, dtype=dtype,
                       rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, C, F, H, W) → (B, F'·H'·W', dim) tokens in (frame, row, column) order."""
    p, pt = self.patch_size, self.patch_size_t
    patches = einops.rearrange(x, "b c (f pt) (h p) (w q) -> b (f h w) (c pt p q)",
                               pt=pt, p=p, q=p)
    return self.proj(patches)


class MLPEmbedder(nnx.Module):
  """linear_1 → SiLU → linear_2: diffusers' `TimestepEmbedding` and
  `PixArtAlphaTextProjection(act_fn="silu")`, whose parameters are named alike."""

  def __init__(self, in_dim: int, dim: int, *, dtype, rngs: nnx.Rngs):
    self.linear_1 = Linear(in_dim, dim, dtype=dtype, rngs=rngs)
    self.linear_2 = Linear(dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TimestepTextEmbedding(nnx.Module):
  """`CombinedTimestepTextProjEmbeddings` (the token refiner's) and, with `guidance`,
  `HunyuanVideoConditionEmbedding` (the blocks' temb): embedded timestep + embedded pooled
  text (+ embedded guidance scale)."""

  def __init__(self, dim: int, pooled_dim: int, *, guidance: bool, dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.timestep_embedder = MLPEmbedder(SINUSOID_DIM, dim, dtype=dtype, rngs=rngs)
    self.text_embedder = MLPEmbedder(pooled_dim, dim, dtype=dtype, rngs=rngs)
    if guidance:
      self.guidance_embedder = MLPEmbedder(SINUSOID_DIM, dim, dtype=dtype, rngs=rngs)
    else:
      self.guidance_embedder = None

  def __call__(self, timestep: jax.Array, pooled: jax.Array,
               guidance: jax.Array | None = None) -> jax.Array:
    emb = self.timestep_embedder(sinusoid(timestep).astype(self.dtype))
    if self.guidance_embedder is not None:
      emb = emb + self.guidance_embedder(sinusoid(guidance).astype(self.dtype))
    return emb + self.text_embedder(pooled.astype(self.dtype))


def _rope_1d(dim: int, positions: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin of position·θ^(-2i/dim), each repeated for the pair (2i, 2i+1): (N, dim)."""
  # float32 throughout, as diffusers computes it, so the tables agree to the last bits.
  freqs = np.float32(1.0) / np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32)
                                                  / np.float32(dim))
  angles = np.outer(positions.astype(np.float32), freqs).astype(np.float32)
  return np.repeat(np.cos(angles), 2, axis=1), np.repeat(np.sin(angles), 2, axis=1)


def rotary_pos_embed_3d(axes_dim: tuple[int, int, int], frames: int, height: int, width: int,
                        theta: float) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin), each (frames·height·width, sum(axes_dim)), for a grid of patch tokens.

  Each token's integer (frame, row, column) coordinates are rotated in their
  own slice of the head dimension (`axes_dim` = time, height, width sizes).
  Shapes only, so this is numpy, built at trace time.
  """
  t, h, w = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
  tables = [_rope_1d(d, pos.reshape(-1), theta) for d, pos in zip(axes_dim, (t, h, w))]
  return (np.concatenate([c for c, _ in tables], axis=1),
          np.concatenate([s for _, s in tables], axis=1))

