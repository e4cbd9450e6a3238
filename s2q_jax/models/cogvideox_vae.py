"""Flax NNX port of the decoder of diffusers' `AutoencoderKLCogVideoX` (CogVideoX's 3D VAE).

Activations are channels-last, (B, F, H, W, C), the layout XLA's convolutions
prefer on TPU and GPU; only `CogVideoXVAE.decode` (in `s2q_jax.models.vae`) speaks
diffusers' (B, C, F, H, W). Module attribute names follow diffusers'
state-dict names, so ``decoder.up_blocks.0.resnets.1.norm1.conv_y.conv.kernel``
is the PyTorch key ``...conv_y.conv.weight``.

Time is causal. Every 3-tap temporal convolution sees the two frames before
its input: at the start of a video, copies of the first frame; afterwards the
last two frames of the previous frame batch's input, its *conv cache*. GroupNorm
statistics span all frames of a batch, so decoding in batches is part of the
function: diffusers' batching, reproduced in `s2q_jax.models.vae`, is what the
CogVideoX pipeline outputs.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from s2q_jax.models.vae_config import CogVideoXVAEConfig

# Nested dict of the 3-tap convs' caches, keyed like diffusers' `conv_cache` (None: a video starts).
ConvCache = dict[str, Any] | None

_ACTIVATIONS = {
    "silu": jax.nn.silu, "swish": jax.nn.silu, "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}
# diffusers' CogVideoXSpatialNorm3D builds its GroupNorm with this eps, whatever norm_eps says.
_SPATIAL_NORM_EPS = 1e-6


class Conv(nnx.Module):
  """Channels-last convolution over the trailing 2 (H, W) or 3 (F, H, W) spatial axes.

  Height and width are zero-padded to keep their size; time is never padded
  here (`CausalConv3d` prepends its frames).
  """

  def __init__(self, in_channels: int, out_channels: int, window: tuple[int, ...], *,
               dtype, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (*window, in_channels, out_channels), dtype))
    self.bias = nnx.Param(jnp.zeros((out_channels,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    *window, _, _ = kernel.shape
    padding = [(0, 0)] * (len(window) - 2) + [(k // 2, k // 2) for k in window[-2:]]
    spec = ("NDHWC", "DHWIO", "NDHWC") if len(window) == 3 else ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(x.astype(kernel.dtype), kernel, (1,) * len(window), padding,
                                     dimension_numbers=spec)
    return y + self.bias[...]


class CausalConv3d(nnx.Module):
  """diffusers' CogVideoXCausalConv3d (pad_mode "first"): time padded on the past side only."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, dtype,
               rngs: nnx.Rngs):
    self.time_pad = kernel_size - 1
    self.conv = Conv(in_channels, out_channels, (kernel_size,) * 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, cache: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array | None]:
    """Returns the output and the cache for the next frame batch (None for 1-tap kernels)."""
    if not self.time_pad:
      return self.conv(x), None
    past = cache if cache is not None else jnp.repeat(x[:, :1], self.time_pad, axis=1)
    x = jnp.concatenate([past.astype(x.dtype), x], axis=1)
    return self.conv(x), x[:, -self.time_pad:]


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm on channels-last input: statistics over a group's channels and all
  frames and pixels, in float32."""

  def __init__(self, num_groups: int, channels: int, *, eps: float, dtype):
    self.num_groups, self.eps = num_groups, eps
    self.scale = nnx.Param(jnp.ones((channels,), dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, -1)
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = grouped.mean(axes, keepdims=True)
    var = jnp.square(grouped - mean).mean(axes, keepdims=True)
    y = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class SpatialNorm3D(nnx.Module):
  """GroupNorm modulated per pixel by the latents: norm(f) * conv_y(zq) + conv_b(zq), with the
  latents stretched to f's size by nearest neighbours (diffusers' `F.interpolate`).

  For an odd frame count above one, the first frame stands alone (the VAE
  compresses 1 + 4k frames into 1 + k latents), so it is stretched on its own.
  """

  def __init__(self, f_channels: int, zq_channels: int, groups: int, *, dtype, rngs: nnx.Rngs):
    self.norm_layer = GroupNorm(groups, f_channels, eps=_SPATIAL_NORM_EPS, dtype=dtype)
    self.conv_y = CausalConv3d(zq_channels, f_channels, 1, dtype=dtype, rngs=rngs)
    self.conv_b = CausalConv3d(zq_channels, f_channels, 1, dtype=dtype, rngs=rngs)

  def __call__(self, f: jax.Array, zq: jax.Array) -> jax.Array:
    # A 1×1×1 convolution commutes with nearest-neighbour stretching, so it runs on the
    # latents (the same values as diffusers' stretch-then-convolve). Time is stretched at the
    # latents' size; height and width by broadcasting inside the normalisation's fusion, so
    # no full-size scale or shift is ever stored (XLA would schedule them all up front).
    b, frames, height, width, c = f.shape
    _, _, h, w, _ = zq.shape
    if height % h or width % w:
      raise ValueError(f"features of {height}×{width} are not a multiple of the latents' {h}×{w}")
    zq = _stretch_time(zq, frames)
    scale, _ = self.conv_y(zq)
    shift, _ = self.conv_b(zq)
    y = self.norm_layer(f).reshape(b, frames, h, height // h, w, width // w, c)
    y = y * scale[:, :, :, None, :, None] + shift[:, :, :, None, :, None]
    return y.reshape(f.shape)


def _stretch_time(zq: jax.Array, frames: int) -> jax.Array:
  """Repeats latent frames up to `frames`, the first on its own when `frames` is odd."""
  if frames > 1 and frames % 2 == 1:
    return jnp.concatenate([zq[:, :1], _repeat_frames(zq[:, 1:], frames - 1)], axis=1)
  return _repeat_frames(zq, frames)


def _repeat_frames(zq: jax.Array, frames: int) -> jax.Array:
  if frames % zq.shape[1]:
    raise ValueError(f"{frames} frames are not a multiple of {zq.shape[1]} latent frames")
  return jnp.repeat(zq, frames // zq.shape[1], axis=1)


class ResnetBlock3D(nnx.Module):
  """diffusers' CogVideoXResnetBlock3D as the decoder builds it: spatial norms, no time input."""

  def __init__(self, in_channels: int, out_channels: int, cfg: CogVideoXVAEConfig, *, dtype,
               rngs: nnx.Rngs):
    zc, groups = cfg.latent_channels, cfg.norm_num_groups
    self.act_fn = cfg.act_fn
    self.norm1 = SpatialNorm3D(in_channels, zc, groups, dtype=dtype, rngs=rngs)
    self.conv1 = CausalConv3d(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
    self.norm2 = SpatialNorm3D(out_channels, zc, groups, dtype=dtype, rngs=rngs)
    self.conv2 = CausalConv3d(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
    self.conv_shortcut = (Conv(in_channels, out_channels, (1, 1, 1), dtype=dtype, rngs=rngs)
                          if in_channels != out_channels else None)

  def __call__(self, x: jax.Array, zq: jax.Array, cache: ConvCache = None):
    cache = cache or {}
    act = _ACTIVATIONS[self.act_fn]
    h, conv1 = self.conv1(act(self.norm1(x, zq)), cache.get("conv1"))
    h, conv2 = self.conv2(act(self.norm2(h, zq)), cache.get("conv2"))
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return h + shortcut, {"conv1": conv1, "conv2": conv2}


class Upsample3D(nnx.Module):
  """diffusers' CogVideoXUpsample3D: nearest 2× in height and width (and in time with
  `compress_time`, the first frame of an odd count excepted), then a 3×3 Conv2d per frame."""

  def __init__(self, channels: int, *, compress_time: bool, dtype, rngs: nnx.Rngs):
    self.compress_time = compress_time
    self.conv = Conv(channels, channels, (3, 3), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
    frames = x.shape[1]
    if self.compress_time and frames > 1:
      if frames % 2:
        x = jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], 2, axis=1)], axis=1)
      else:
        x = jnp.repeat(x, 2, axis=1)
    b, f = x.shape[:2]
    y = self.conv(x.reshape(b * f, *x.shape[2:]))
    return y.reshape(b, f, *y.shape[1:])


class MidBlock3D(nnx.Module):
  """A chain of resnets (diffusers' CogVideoXMidBlock3D)."""

  def __init__(self, in_channels: int, out_channels: int, num_layers: int,
               cfg: CogVideoXVAEConfig, *, dtype, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, cfg, dtype=dtype,
                      rngs=rngs) for i in range(num_layers)])

  def __call__(self, x: jax.Array, zq: jax.Array, cache: ConvCache = None):
    cache = cache or {}
    new_cache = {}
    for i, resnet in enumerate(self.resnets):
      x, new_cache[f"resnet_{i}"] = resnet(x, zq, cache.get(f"resnet_{i}"))
    return x, new_cache


class UpBlock3D(MidBlock3D):
  """Resnets, then (except in the last block) an `Upsample3D` (diffusers' CogVideoXUpBlock3D)."""

  def __init__(self, in_channels: int, out_channels: int, num_layers: int,
               cfg: CogVideoXVAEConfig, *, add_upsample: bool, compress_time: bool, dtype,
               rngs: nnx.Rngs):
    super().__init__(in_channels, out_channels, num_layers, cfg, dtype=dtype, rngs=rngs)
    self.upsamplers = nnx.List([Upsample3D(out_channels, compress_time=compress_time,
                                           dtype=dtype, rngs=rngs)] if add_upsample else [])

  def __call__(self, x: jax.Array, zq: jax.Array, cache: ConvCache = None):
    x, new_cache = super().__call__(x, zq, cache)
    for upsampler in self.upsamplers:
      x = upsampler(x)
    return x, new_cache


class Decoder3D(nnx.Module):
  """diffusers' CogVideoXDecoder3D: latents (B, F, h, w, C_latent) → video (B, F', H, W, C)."""

  def __init__(self, cfg: CogVideoXVAEConfig, *, dtype, rngs: nnx.Rngs):
    channels = tuple(reversed(cfg.block_out_channels))
    zc = cfg.latent_channels
    self.conv_in = CausalConv3d(zc, channels[0], 3, dtype=dtype, rngs=rngs)
    self.mid_block = MidBlock3D(channels[0], channels[0], 2, cfg, dtype=dtype, rngs=rngs)
    self.up_blocks = nnx.List([
        UpBlock3D(channels[max(i - 1, 0)], channels[i], cfg.layers_per_block + 1, cfg,
                  add_upsample=i < len(channels) - 1,
                  compress_time=i < cfg.temporal_compression_levels, dtype=dtype, rngs=rngs)
        for i in range(len(channels))])
    self.norm_out = SpatialNorm3D(channels[-1], zc, cfg.norm_num_groups, dtype=dtype, rngs=rngs)
    self.conv_out = CausalConv3d(channels[-1], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, z: jax.Array, cache: ConvCache = None) -> tuple[jax.Array, dict]:
    """Decodes one frame batch; `cache` is the previous batch's (None for the first)."""
    cache = cache or {}
    new_cache = {}
    h, new_cache["conv_in"] = self.conv_in(z, cache.get("conv_in"))
    h, new_cache["mid_block"] = self.mid_block(h, z, cache.get("mid_block"))
    for i, block in enumerate(self.up_blocks):
      h, new_cache[f"up_block_{i}"] = block(h, z, cache.get(f"up_block_{i}"))
    h = jax.nn.silu(self.norm_out(h, z))
    h, new_cache["conv_out"] = self.conv_out(h, cache.get("conv_out"))
    return h, new_cache
