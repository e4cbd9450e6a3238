"""CogVideoX's VAE decoder with diffusers' memory-bounded decoding: frame batches and tiles.

`CogVideoXVAE.decode(z)` equals diffusers' `AutoencoderKLCogVideoX.decode(z).sample`:
latents are decoded two latent frames at a time (three in the first batch of
an odd count, so 13 latents give 9 + 5 × 8 = 49 frames), each batch carrying
the conv cache of the one before. Each batch is one jitted call, so peak
memory is one batch's activations, whatever the video length, and a
steady-state batch compiles once. Tiling, off by default as in the pipeline,
also splits height and width into overlapping tiles blended linearly.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2q_jax.models.cogvideox_vae import Decoder3D
from s2q_jax.models.vae_config import CogVideoXVAEConfig

# diffusers' `num_latent_frames_batch_size`: the VAE was trained on this many latent frames.
LATENT_FRAMES_PER_BATCH = 2


@dataclasses.dataclass(frozen=True)
class Tiling:
  """diffusers' `enable_tiling` arguments: tile size in pixels, overlap as a fraction of it."""
  sample_min_height: int
  sample_min_width: int
  overlap_factor_height: float = 1 / 6
  overlap_factor_width: float = 1 / 5

  @classmethod
  def default(cls, config: CogVideoXVAEConfig) -> "Tiling":
    """What diffusers' `enable_tiling()` sets: tiles of half the trained sample size."""
    return cls(config.sample_height // 2, config.sample_width // 2)


def frame_batches(num_frames: int, frames_per_batch: int = LATENT_FRAMES_PER_BATCH
                  ) -> list[tuple[int, int]]:
  """[start, end) latent frames of each batch, as diffusers' `_decode` slices them.

  The remainder of `num_frames / frames_per_batch` joins the first batch; fewer frames than
  a batch make one batch.
  """
  remainder = num_frames % frames_per_batch
  return [(0 if i == 0 else frames_per_batch * i + remainder,
           min(frames_per_batch * (i + 1) + remainder, num_frames))
          for i in range(max(num_frames // frames_per_batch, 1))]


# The previous batch's cache is donated: its buffers (two frames per conv, 2.6 GiB at 480×720
# in bf16, see `vae_memory`) are reused for the new cache instead of doubling that memory.
@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _decode_batch(graphdef: nnx.GraphDef, state: nnx.State, z: jax.Array, cache):
  return nnx.merge(graphdef, state).decoder(z, cache)


class CogVideoXVAE(nnx.Module):
  """The decoder half of diffusers' `AutoencoderKLCogVideoX` (parameters under `decoder.`)."""

  def __init__(self, config: CogVideoXVAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.decoder = Decoder3D(config, dtype=dtype, rngs=rngs)

  def decode(self, z: jax.Array | np.ndarray, *, tiling: bool | Tiling = False,
             frames_per_batch: int = LATENT_FRAMES_PER_BATCH) -> jax.Array:
    """Latents (B, C, F, h, w) → video (B, out_channels, F', h·s, w·s); s: config.spatial_scale.

    `z` is UNSCALED, in diffusers' VAE layout: the pipeline's latents are
    (B, F, C, h, w) and scaled, so pass ``latents.transpose(0, 2, 1, 3, 4) /
    config.scaling_factor`` as `CogVideoXPipeline.decode_latents` does. The
    output is in [-1, 1] up to the decoder's overshoot, in the parameters' dtype.

    `tiling`: False (the pipeline's default), True (diffusers' `enable_tiling()`
    defaults) or a `Tiling`; tiles are used only when the latents exceed one.
    `frames_per_batch` other than 2 runs, but the VAE was not trained for it.
    """
    cfg = self.config
    z = jnp.asarray(z)
    if z.ndim != 5 or z.shape[1] != cfg.latent_channels or 0 in z.shape:
      hint = ("; transformer latents are (batch, frames, channels, height, width): transpose "
              "axes 1 and 2" if z.ndim == 5 and z.shape[2] == cfg.latent_channels else "")
      raise ValueError(f"decode expects latents (batch, {cfg.latent_channels} channels, frames, "
                       f"height, width), got shape {tuple(z.shape)}{hint}")
    if frames_per_batch < 1:
      raise ValueError(f"frames_per_batch must be at least 1, got {frames_per_batch}")
    graphdef, state = nnx.split(self)
    dtype = jax.tree.leaves(state)[0].dtype
    x = jnp.transpose(z, (0, 2, 3, 4, 1)).astype(dtype)  # channels-last inside
    tiling = Tiling.default(cfg) if tiling is True else tiling or None
    decode_frames = functools.partial(_decode_frames, graphdef, state,
                                      frames_per_batch=frames_per_batch)
    tile = _latent_tile(tiling, cfg) if tiling is not None else None
    if tile is not None and (x.shape[2] > tile[0] or x.shape[3] > tile[1]):
      video = _decode_tiled(decode_frames, x, tiling, cfg)
    else:
      video = decode_frames(x)
    return jnp.transpose(video, (0, 4, 1, 2, 3))


def _decode_frames(graphdef, state, x: jax.Array, *, frames_per_batch: int) -> jax.Array:
  cache, out = None, []
  for start, end in frame_batches(x.shape[1], frames_per_batch):
    y, cache = _decode_batch(graphdef, state, x[:, start:end], cache)
    out.append(y)
  return jnp.concatenate(out, axis=1)


def _latent_tile(tiling: Tiling, cfg: CogVideoXVAEConfig) -> tuple[int, int]:
  scale = cfg.spatial_scale
  return int(tiling.sample_min_height / scale), int(tiling.sample_min_width / scale)


def _decode_tiled(decode_frames, x: jax.Array, tiling: Tiling, cfg: CogVideoXVAEConfig
                  ) -> jax.Array:
  """diffusers' `tiled_decode`: overlapping latent tiles, each decoded in frame batches on its
  own, then cross-faded where they overlap."""
  tile_h, tile_w = _latent_tile(tiling, cfg)
  step_h = int(tile_h * (1 - tiling.overlap_factor_height))
  step_w = int(tile_w * (1 - tiling.overlap_factor_width))
  if min(tile_h, tile_w, step_h, step_w) < 1:
    raise ValueError(f"{tiling} gives latent tiles of {tile_h}×{tile_w} advancing by "
                     f"{step_h}×{step_w}: tiles must be at least {cfg.spatial_scale} pixels and "
                     "the overlap factors below 1")
  blend_h = int(tiling.sample_min_height * tiling.overlap_factor_height)
  blend_w = int(tiling.sample_min_width * tiling.overlap_factor_width)
  keep_h, keep_w = tiling.sample_min_height - blend_h, tiling.sample_min_width - blend_w
  tiles = [[decode_frames(x[:, :, i:i + tile_h, j:j + tile_w])
            for j in range(0, x.shape[3], step_w)] for i in range(0, x.shape[2], step_h)]
  return _blend_tiles(tiles, (blend_h, blend_w), (keep_h, keep_w))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _blend_tiles(tiles: list[list[jax.Array]], blend: tuple[int, int], keep: tuple[int, int]
                 ) -> jax.Array:
  """Blends each tile into the already blended ones above and before it (diffusers blends in
  place), keeps the top-left `keep` pixels of each and joins them into one video."""
  rows = []
  for i, row in enumerate(tiles):
    blended = []
    for j, tile in enumerate(row):
      if i:
        tile = _blend(rows[i - 1][j], tile, blend[0], axis=2)
      if j:
        tile = _blend(blended[j - 1], tile, blend[1], axis=3)
      blended.append(tile)
    rows.append(blended)
  return jnp.concatenate([jnp.concatenate([t[:, :, :keep[0], :keep[1]] for t in row], axis=3)
                          for row in rows], axis=2)


def _blend(before: jax.Array, tile: jax.Array, extent: int, axis: int) -> jax.Array:
  """Cross-fades the last `extent` rows (or columns) of `before` into the first of `tile`."""
  extent = min(before.shape[axis], tile.shape[axis], extent)
  if extent == 0:
    return tile
  shape = [1] * tile.ndim
  shape[axis] = extent
  weight = jnp.asarray((np.arange(extent) / extent).reshape(shape), tile.dtype)
  tail = jax.lax.slice_in_dim(before, before.shape[axis] - extent, before.shape[axis], axis=axis)
  head = jax.lax.slice_in_dim(tile, 0, extent, axis=axis)
  rest = jax.lax.slice_in_dim(tile, extent, tile.shape[axis], axis=axis)
  return jnp.concatenate([tail * (1 - weight) + head * weight, rest], axis=axis)
