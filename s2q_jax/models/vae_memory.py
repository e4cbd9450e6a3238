"""How much memory decoding with the CogVideoX VAE needs, from shapes alone.

Decoding runs one frame batch at a time, so the activations of the largest
batch bound its memory. The largest tensor of a batch is the input of a
3-tap temporal convolution with its two past frames prepended, at full
resolution and the widest channel count there (the first conv of the last
up block). A convolution also holds its output and the block's residual, and
the conv cache carried between batches adds two full-size frames per
convolution, so the peak is a small multiple of that tensor. `decode_memory`
reports these from shapes alone, and
`compiled_batch_memory` what XLA allocates for a batch on the local backend.

  python -m s2q_jax.models.vae_memory [--vae FOLDER] [--latents 1,16,13,60,90] [--compiled]
"""
from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2q_jax.models.params import param_shapes
from s2q_jax.models.vae import LATENT_FRAMES_PER_BATCH, Tiling, frame_batches
from s2q_jax.models.vae_config import CogVideoXVAEConfig
from s2q_jax.models.vae_loading import abstract_vae, read_vae_config


@dataclasses.dataclass(frozen=True)
class DecodeMemory:
  """Bytes of one decode (see the module docstring); `largest` names the biggest tensor."""
  largest_activation: int
  largest: str
  largest_shape: tuple[int, ...]  # channels-last (B, F, H, W, C)
  conv_cache: int  # the two past frames every 3-tap conv keeps for the next batch
  weights: int
  output: int


Shapes = dict[str, tuple[int, ...]]


def batch_activation_shapes(cfg: CogVideoXVAEConfig, batch: int, frames: int, height: int,
                            width: int) -> tuple[Shapes, Shapes]:
  """Channels-last shapes, by module, of each 3-tap convolution's input with its two past
  frames prepended and of each upsampler's output, for a batch of `frames` latents."""
  channels = tuple(reversed(cfg.block_out_channels))
  conv_inputs, upsampled = {}, {}
  f, h, w = frames, height, width

  def conv(name: str, c: int) -> None:
    conv_inputs[f"decoder.{name}"] = (batch, f + 2, h, w, c)

  conv("conv_in", cfg.latent_channels)
  for i in range(2):
    conv(f"mid_block.resnets.{i}.conv1", channels[0])
    conv(f"mid_block.resnets.{i}.conv2", channels[0])
  for i, c_out in enumerate(channels):
    for j in range(cfg.layers_per_block + 1):
      conv(f"up_blocks.{i}.resnets.{j}.conv1", channels[max(i - 1, 0)] if j == 0 else c_out)
      conv(f"up_blocks.{i}.resnets.{j}.conv2", c_out)
    if i < len(channels) - 1:
      h, w = 2 * h, 2 * w
      if i < cfg.temporal_compression_levels and f > 1:
        f = 2 * f - f % 2  # an odd count keeps its first frame single
      upsampled[f"decoder.up_blocks.{i}.upsamplers.0"] = (batch, f, h, w, c_out)
  conv("conv_out", channels[-1])
  return conv_inputs, upsampled


def decoded_frames(cfg: CogVideoXVAEConfig, latent_frames: int,
                   frames_per_batch: int = LATENT_FRAMES_PER_BATCH) -> int:
  """Output frames of a decode: each batch of f latents gives 2^levels·f frames, less
  2^levels − 1 when f is odd (the single first frame)."""
  up = 2 ** cfg.temporal_compression_levels
  return sum(up * (e - s) - (up - 1) * ((e - s) % 2) if e - s > 1 else 1
             for s, e in frame_batches(latent_frames, frames_per_batch))


def largest_batch(cfg: CogVideoXVAEConfig, latent_shape: tuple[int, int, int, int, int],
                  tiling: Tiling | None = None,
                  frames_per_batch: int = LATENT_FRAMES_PER_BATCH) -> tuple[int, int, int, int]:
  """(B, frames, h, w) of the largest latent slice decoded at once: the first frame batch
  (it takes the odd frame) of the first tile (edge tiles are cut smaller)."""
  batch, _, frames, height, width = latent_shape
  if tiling is not None:
    height = min(height, int(tiling.sample_min_height / cfg.spatial_scale))
    width = min(width, int(tiling.sample_min_width / cfg.spatial_scale))
  start, end = frame_batches(frames, frames_per_batch)[0]
  return batch, end - start, height, width


def decode_memory(cfg: CogVideoXVAEConfig, latent_shape: tuple[int, int, int, int, int],
                  dtype=np.float32, *, tiling: Tiling | None = None,
                  frames_per_batch: int = LATENT_FRAMES_PER_BATCH) -> DecodeMemory:
  """Memory of `CogVideoXVAE.decode` on latents of `latent_shape` (B, C, F, h, w) in `dtype`."""
  itemsize = np.dtype(dtype).itemsize
  conv_inputs, upsampled = batch_activation_shapes(
      cfg, *largest_batch(cfg, latent_shape, tiling, frames_per_batch))
  name, shape = max({**conv_inputs, **upsampled}.items(), key=lambda item: math.prod(item[1]))
  cache = sum(math.prod((b, 2, *rest)) for b, _, *rest in conv_inputs.values())
  weights = sum(math.prod(s) for s, _ in param_shapes(abstract_vae(cfg)).values())
  batch, _, frames, height, width = latent_shape
  output = (batch * cfg.out_channels * decoded_frames(cfg, frames, frames_per_batch)
            * height * width * cfg.spatial_scale ** 2)
  return DecodeMemory(math.prod(shape) * itemsize, name, shape, cache * itemsize,
                      weights * itemsize, output * itemsize)


def compiled_batch_memory(cfg: CogVideoXVAEConfig, latent_shape: tuple[int, int, int, int, int],
                          dtype=np.float32, *, tiling: Tiling | None = None,
                          frames_per_batch: int = LATENT_FRAMES_PER_BATCH) -> dict[str, int]:
  """XLA's own buffer sizes for the program of the largest frame batch (or tile), compiled for
  the default backend from shapes alone: {"temp", "arguments", "output"} in bytes."""
  batch, frames, height, width = largest_batch(cfg, latent_shape, tiling, frames_per_batch)
  graphdef, state = nnx.split(abstract_vae(cfg, dtype))
  z = jax.ShapeDtypeStruct((batch, frames, height, width, cfg.latent_channels), dtype)
  step = jax.jit(lambda s, x: nnx.merge(graphdef, s).decoder(x))
  analysis = step.lower(state, z).compile().memory_analysis()
  return {"temp": analysis.temp_size_in_bytes, "arguments": analysis.argument_size_in_bytes,
          "output": analysis.output_size_in_bytes}


def main(argv: list[str] | None = None) -> None:
  """Prints a Markdown table of decode memory for a VAE config (default: CogVideoX-2B/5B's)."""
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("--vae", help="a diffusers vae/ folder whose config.json to use")
  parser.add_argument("--latents", default="1,16,13,60,90",
                      help="B,C,F,h,w (default: 49 frames at 480×720)")
  parser.add_argument("--compiled", action="store_true",
                      help="also compile the largest frame batch for the default backend and "
                           "report XLA's temporary buffers (the CPU back-end converts bfloat16 "
                           "convolutions to float32, which inflates its bfloat16 figures)")
  args = parser.parse_args(argv)
  cfg = read_vae_config(args.vae) if args.vae else CogVideoXVAEConfig()
  latent_shape = tuple(int(n) for n in args.latents.split(","))
  gib = 2.0 ** 30
  print(f"latents {latent_shape}, backend {jax.default_backend()}\n")
  print("| dtype | tiling | largest tensor (GiB) | its shape (B,F,H,W,C) | conv cache (GiB) | "
        "weights (GiB) | output (GiB) |" + (" XLA temp (GiB) |" if args.compiled else ""))
  print("|---|---|---|---|---|---|---|" + ("---|" if args.compiled else ""))
  for dtype in (jnp.bfloat16, jnp.float32):
    for tiling in (None, Tiling.default(cfg)):
      m = decode_memory(cfg, latent_shape, dtype, tiling=tiling)
      row = (f"| {np.dtype(dtype).name} | {'default' if tiling else 'off'} | "
             f"{m.largest_activation / gib:.2f} | {m.largest_shape} | {m.conv_cache / gib:.2f} | "
             f"{m.weights / gib:.2f} | {m.output / gib:.2f} |")
      if args.compiled:
        temp = compiled_batch_memory(cfg, latent_shape, dtype, tiling=tiling)["temp"]
        row += f" {temp / gib:.2f} |"
      print(row, flush=True)


if __name__ == "__main__":
  main()
