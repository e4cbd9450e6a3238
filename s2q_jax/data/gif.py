"""Animated GIFs of videos for a person to look at, e.g. full precision | quantized."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

DEFAULT_FPS = 6


def to_uint8(video: np.ndarray) -> np.ndarray:
  """(F, C, H, W) in [-1, 1] → (F, H, W, 3) uint8; one channel is shown as grey.

  Latent videos of more channels (a real model's transformer run without its
  VAE: 16 for CogVideoX and Wan) show their first three channels as RGB.
  """
  video = np.asarray(video, np.float32)
  if video.ndim != 4 or video.shape[1] not in (1, 3) and video.shape[1] < 3:
    raise ValueError(f"expected a video (F, C, H, W) with C = 1 or C ≥ 3, got shape {video.shape}")
  video = video[:, :3]
  v = np.clip((video + 1.0) * 127.5, 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
  return np.repeat(v, 3, axis=-1) if v.shape[-1] == 1 else v


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
  """Nearest-neighbour upscaling of (F, H, W, 3) frames, so 32×32 pixels stay crisp."""
  return np.repeat(np.repeat(frames, scale, axis=1), scale, axis=2)


def side_by_side(videos: Sequence[np.ndarray], *, scale: int = 4, gap: int = 2) -> np.ndarray:
  """(F, H·scale, n·W·scale + (n−1)·gap, 3) uint8 frames: the (F, C, H, W) videos in a row.

  Panels are separated by white columns `gap` pixels wide.
  """
  if not videos:
    raise ValueError("no videos to lay out")
  if len({np.shape(v) for v in videos}) != 1:
    raise ValueError(f"videos differ in shape: {[np.shape(v) for v in videos]}")
  frames = [upscale(to_uint8(v), scale) for v in videos]
  f, h = frames[0].shape[:2]
  sep = np.full((f, h, gap, 3), 255, np.uint8)
  parts = [frames[0]]
  for fr in frames[1:]:
    parts += [sep, fr]
  return np.concatenate(parts, axis=2)


def save_gif(path: str, frames: np.ndarray | Sequence[np.ndarray], *,
             fps: float = DEFAULT_FPS) -> None:
  """Writes (F, H, W, 3) uint8 frames as a looping GIF.

  GIF stores frame durations in 10 ms units, so the fps is approximate.
  """
  images = [Image.fromarray(np.asarray(fr, np.uint8)) for fr in frames]
  if not images:
    raise ValueError("no frames to write")
  images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps),
                 loop=0)


def save_side_by_side(path: str, videos: Sequence[np.ndarray], *, scale: int = 4,
                      fps: float = DEFAULT_FPS) -> None:
  """A GIF of (F, C, H, W) videos in [-1, 1] next to each other (see `side_by_side`)."""
  save_gif(path, side_by_side(videos, scale=scale), fps=fps)
