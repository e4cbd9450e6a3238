"""Animated GIFs of videos for a person to look at, e.g. full precision | quantized."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image


def to_uint8(video: np.ndarray) -> np.ndarray:
  """(F, C, H, W) in [-1, 1] → (F, H, W, 3) uint8 (single channels shown as grey)."""
  v = np.clip((np.asarray(video, np.float32) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
  v = v.transpose(0, 2, 3, 1)
  if v.shape[-1] == 1:
    v = np.repeat(v, 3, axis=-1)
  return v[..., :3]


def side_by_side(videos: Sequence[np.ndarray], *, scale: int = 4, gap: int = 2) -> np.ndarray:
  """Frames (F, H', W', 3) with the videos next to each other, upscaled, white gaps between."""
  frames = [np.repeat(np.repeat(to_uint8(v), scale, axis=1), scale, axis=2) for v in videos]
  f, h = frames[0].shape[:2]
  sep = np.full((f, h, gap, 3), 255, np.uint8)
  parts = [frames[0]]
  for fr in frames[1:]:
    parts += [sep, fr]
  return np.concatenate(parts, axis=2)


def save_gif(path: str, frames: np.ndarray, *, fps: int = 6) -> None:
  images = [Image.fromarray(fr) for fr in frames]
  images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def save_side_by_side(path: str, videos: Sequence[np.ndarray], *, scale: int = 4,
                      fps: int = 6) -> None:
  save_gif(path, side_by_side(videos, scale=scale), fps=fps)
