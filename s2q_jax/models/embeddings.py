"""Timestep and positional embeddings of CogVideoX, numerically as in diffusers.

Positional tables depend only on shapes, so they are built with numpy at
trace time and enter the graph as constants.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (B,) timesteps → (B, dim) float32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_3d(dim: int, frames: int, height: int, width: int, *,
                        spatial_interpolation_scale: float,
                        temporal_interpolation_scale: float) -> np.ndarray:
  """CogVideoX-2B's fixed 3D embedding, (frames·height·width, dim), token order (f, h, w)."""
  dim_spatial, dim_temporal = 3 * dim // 4, dim // 4
  # diffusers builds its grid with meshgrid(w, h, indexing="xy"): the first
  # half of the spatial features encodes the w coordinate, the second h.
  w_coord, h_coord = np.meshgrid(np.arange(width, dtype=np.float32) / spatial_interpolation_scale,
                                 np.arange(height, dtype=np.float32) / spatial_interpolation_scale,
                                 indexing="xy")
  spatial = np.concatenate([_sincos_1d(dim_spatial // 2, w_coord),
                            _sincos_1d(dim_spatial // 2, h_coord)], axis=1)  # (h·w, 3D/4)
  temporal = _sincos_1d(dim_temporal,
                        np.arange(frames, dtype=np.float32) / temporal_interpolation_scale)
  emb = np.concatenate([np.repeat(temporal[:, None], height * width, axis=1),
                        np.repeat(spatial[None], frames, axis=0)], axis=-1)
  return emb.reshape(frames * height * width, dim).astype(np.float32)


def _rope_1d(dim: int, pos: np.ndarray, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32)[: dim // 2] / np.float32(dim))
  angles = np.outer(pos.astype(np.float32), freqs.astype(np.float32)).astype(np.float32)
  # Pairs (2i, 2i+1) share a frequency: interleaved layout.
  return np.repeat(np.cos(angles), 2, axis=1), np.repeat(np.sin(angles), 2, axis=1)


def _crop_region(grid_h: int, grid_w: int, base_w: int, base_h: int):
  if grid_h / grid_w > base_h / base_w:
    resize_h, resize_w = base_h, int(round(base_h / grid_h * grid_w))
  else:
    resize_w, resize_h = base_w, int(round(base_w / grid_w * grid_h))
  top, left = int(round((base_h - resize_h) / 2.0)), int(round((base_w - resize_w) / 2.0))
  return (top, left), (top + resize_h, left + resize_w)


def rotary_pos_embed_3d(head_dim: int, frames: int, grid_h: int, grid_w: int, *,
                        base_h: int, base_w: int) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin), each (frames·grid_h·grid_w, head_dim), as CogVideoX's pipeline builds them.

  Positions are the patch grid resized and centre-cropped into the
  training-resolution grid (base_h × base_w patches), then split 1/4 time,
  3/8 height, 3/8 width of the head dimension.
  """
  (top, left), (bottom, right) = _crop_region(grid_h, grid_w, base_w, base_h)
  pos_h = np.linspace(top, bottom * (grid_h - 1) / grid_h, grid_h, dtype=np.float32)
  pos_w = np.linspace(left, right * (grid_w - 1) / grid_w, grid_w, dtype=np.float32)
  pos_t = np.linspace(0, frames * (frames - 1) / frames, frames, dtype=np.float32)
  dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3
  parts = [_rope_1d(dim_t, pos_t), _rope_1d(dim_hw, pos_h), _rope_1d(dim_hw, pos_w)]

  def combine(i):
    t, h, w = (p[i] for p in parts)
    shape = (frames, grid_h, grid_w)
    full = np.concatenate([np.broadcast_to(t[:, None, None], shape + t.shape[-1:]),
                           np.broadcast_to(h[None, :, None], shape + h.shape[-1:]),
                           np.broadcast_to(w[None, None, :], shape + w.shape[-1:])], axis=-1)
    return full.reshape(frames * grid_h * grid_w, -1)

  return combine(0), combine(1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved pairs of x (B, H, S, D) by (S, D) angles, in float32."""
  xf = x.astype(jnp.float32)
  pairs = xf.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return (xf * cos.astype(jnp.float32) + rotated * sin.astype(jnp.float32)).astype(x.dtype)
