"""Latents to pixels with the pipeline's VAE, and the side-by-side files a person looks at.

GIFs are always written; MP4s too when the optional `imageio-ffmpeg`
(`pip install s2q-jax[video]`) is installed, since a GIF's 256 colours
band a real model's 480×720 frames.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from s2q_jax import outputs
from s2q_jax.data import gif
from s2q_jax.models import load_vae
from s2q_jax.pipeline.folder import Pipeline

FPS = 8  # CogVideoX's frame rate (diffusers' export_to_video in its examples)


def decode(pipe: Pipeline, latent_sets: Sequence[np.ndarray], dtype: str,
           log: Callable[[str], None] | None = print) -> list[np.ndarray]:
  """Each (N, F, C, h, w) set of scaled latents → (N, F', 3, H, W) float32 pixels in [-1, 1].

  As `CogVideoXPipeline.decode_latents`: frames and channels swapped, divided
  by the VAE's scaling factor. Values are not clipped (the decoder may
  overshoot); one video at a time bounds memory (see `vae_memory`).
  """
  vae = load_vae(pipe.component("vae"), dtype)
  scale = vae.config.scaling_factor
  out = []
  for latents in latent_sets:
    videos = []
    for i, z in enumerate(latents):
      pixels = vae.decode(np.transpose(z[None], (0, 2, 1, 3, 4)) / scale)
      videos.append(np.asarray(pixels[0], np.float32).transpose(1, 0, 2, 3))
      if log:
        log(f"  decoded {i + 1}/{len(latents)}")
    out.append(np.stack(videos))
  return out


def mp4_available() -> bool:
  try:
    import imageio_ffmpeg  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def write_side_by_side(stem: str, videos: Sequence[np.ndarray], *, scale: int,
                       fps: float = FPS) -> list[str]:
  """`stem`.gif (and `stem`.mp4 when possible) of (F, C, H, W) videos in a row; their paths."""
  frames = gif.side_by_side(videos, scale=scale)
  paths = [stem + ".gif"]
  outputs.write_with(paths[0], lambda tmp: gif.save_gif(tmp, frames, fps=fps))
  if mp4_available():
    paths.append(stem + ".mp4")
    outputs.write_with(paths[1], lambda tmp: _save_mp4(tmp, frames, fps))
  return paths


@contextlib.contextmanager
def _ffmpeg_started_without_preexec() -> Iterator[None]:
  """imageio-ffmpeg starts ffmpeg with `preexec_fn=os.setpgrp` unless this variable is set.

  A `preexec_fn` makes Python fork the whole (multithreaded) JAX process, which JAX warns
  about on every video and which can deadlock; without it the child is spawned directly.
  The cost is that Ctrl-C reaches ffmpeg too, which is what an interrupted job wants.
  """
  name = "IMAGEIO_FFMPEG_NO_PREVENT_SIGINT"
  before = os.environ.get(name)
  os.environ[name] = "1"
  try:
    yield
  finally:
    if before is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = before


def _save_mp4(path: str, frames: np.ndarray, fps: float) -> None:
  """H.264 in yuv420p (what players accept), which needs even sizes: odd ones get a white edge."""
  import imageio_ffmpeg  # pylint: disable=import-outside-toplevel
  f, h, w, _ = frames.shape
  padded = np.full((f, h + h % 2, w + w % 2, 3), 255, np.uint8)
  padded[:, :h, :w] = frames
  writer = imageio_ffmpeg.write_frames(path, (w + w % 2, h + h % 2), fps=fps, codec="libx264",
                                       pix_fmt_out="yuv420p", macro_block_size=1)
  with _ffmpeg_started_without_preexec():
    writer.send(None)  # the generator starts ffmpeg here
  for frame in padded:
    writer.send(np.ascontiguousarray(frame))
  writer.close()
