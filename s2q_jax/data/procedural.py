"""Procedural class-conditional videos: the embedded model's training data.

Each class fixes an object's shape, colour and motion; each sample draws its
start position, speed, size and background from a seeded generator. Shapes
are drawn from signed distance fields with a one-pixel soft edge, so they
stay learnable at 32×32. Values are in [-1, 1], layout (B, F, C, H, W).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

# (name, shape, RGB colour in [-1, 1], motion)
CLASSES = (
    ("red square moving right", "square", (0.9, -0.8, -0.8), "right"),
    ("green disc moving down", "disc", (-0.8, 0.9, -0.7), "down"),
    ("blue ring orbiting", "ring", (-0.7, -0.4, 1.0), "orbit"),
    ("yellow bar rotating", "bar", (0.9, 0.9, -0.8), "rotate"),
    ("magenta diamond bouncing", "diamond", (0.9, -0.7, 0.9), "bounce"),
    ("cyan disc growing", "disc", (-0.8, 0.9, 0.9), "grow"),
    ("orange cross moving up-left", "cross", (1.0, 0.2, -0.9), "up_left"),
    ("white square shrinking", "square", (1.0, 1.0, 1.0), "shrink"),
)
NUM_CLASSES = len(CLASSES)


def class_name(i: int) -> str:
  return CLASSES[i][0]


def _box(px, py, hx, hy):
  qx, qy = np.abs(px) - hx, np.abs(py) - hy
  outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
  return outside + np.minimum(np.maximum(qx, qy), 0)


def _sdf(shape: str, px, py, r: float, angle: float):
  if shape == "square":
    return _box(px, py, r, r)
  if shape == "disc":
    return np.hypot(px, py) - r
  if shape == "ring":
    return np.abs(np.hypot(px, py) - r) - r * 0.35
  if shape == "diamond":
    return (np.abs(px) + np.abs(py) - r) / np.sqrt(2)
  if shape == "bar":
    c, s = np.cos(angle), np.sin(angle)
    return _box(c * px + s * py, -s * px + c * py, r * 1.3, r * 0.35)
  if shape == "cross":
    return np.minimum(_box(px, py, r, r * 0.35), _box(px, py, r * 0.35, r))
  raise ValueError(shape)


def _trajectory(motion: str, rng: np.random.Generator, f: int, h: int, w: int, r: float):
  """Per-frame (cx, cy, radius, angle) keeping the object inside the frame."""
  t = np.arange(f, dtype=np.float64)
  speed = rng.uniform(1.2, 2.0) * w / 32
  travel = speed * (f - 1)
  radius, angle = np.full(f, r), np.zeros(f)
  margin = r + 1
  if motion in ("right", "down", "up_left"):
    lo, hi = margin, (w if motion != "down" else h) - margin - travel
    start = rng.uniform(lo, max(lo, hi))
    other = rng.uniform(margin, (h if motion == "right" else w) - margin)
    if motion == "right":
      cx, cy = start + speed * t, np.full(f, other)
    elif motion == "down":
      cx, cy = np.full(f, other), start + speed * t
    else:
      sx = rng.uniform(margin + travel * 0.7, w - margin)
      sy = rng.uniform(margin + travel * 0.7, h - margin)
      cx, cy = sx - 0.7 * speed * t, sy - 0.7 * speed * t
  elif motion == "orbit":
    orbit = rng.uniform(0.18, 0.26) * min(h, w)
    phase = rng.uniform(0, 2 * np.pi)
    omega = rng.uniform(0.5, 0.7)
    cx, cy = w / 2 + orbit * np.cos(phase + omega * t), h / 2 + orbit * np.sin(phase + omega * t)
  elif motion == "bounce":
    cx = np.full(f, rng.uniform(margin, w - margin))
    amp = rng.uniform(0.22, 0.3) * h
    cy = h / 2 + amp * np.cos(rng.uniform(0, 2 * np.pi) + 0.9 * t)
  else:
    cx = np.full(f, rng.uniform(w * 0.4, w * 0.6))
    cy = np.full(f, rng.uniform(h * 0.4, h * 0.6))
    if motion == "rotate":
      angle = rng.uniform(0, np.pi) + rng.choice([-1, 1]) * rng.uniform(0.3, 0.45) * t
    elif motion == "grow":
      radius = np.linspace(r * 0.35, r * 1.6, f)
    elif motion == "shrink":
      radius = np.linspace(r * 1.6, r * 0.35, f)
  return cx, cy, radius, angle


def sample_videos(class_ids: np.ndarray, rng: np.random.Generator, *, num_frames: int = 8,
                  height: int = 32, width: int = 32) -> np.ndarray:
  """Videos (B, F, 3, H, W) float32 in [-1, 1] for the given class ids."""
  class_ids = np.asarray(class_ids)
  if class_ids.size and (class_ids.min() < 0 or class_ids.max() >= NUM_CLASSES):
    raise ValueError(f"class ids must be in [0, {NUM_CLASSES})")
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
  out = np.empty((len(class_ids), num_frames, 3, height, width), np.float32)
  for b, cid in enumerate(class_ids):
    _, shape, colour, motion = CLASSES[cid]
    r = rng.uniform(0.13, 0.17) * min(height, width)
    cx, cy, radius, angle = _trajectory(motion, rng, num_frames, height, width, r)
    # Background: a dim gradient in a random direction and shade.
    theta = rng.uniform(0, 2 * np.pi)
    base = rng.uniform(-0.85, -0.45)
    grad = ((np.cos(theta) * (xx / width - 0.5) + np.sin(theta) * (yy / height - 0.5)) * 0.3
            + base)
    tint = rng.uniform(-0.08, 0.08, size=3)
    colour = np.clip(np.asarray(colour) + rng.uniform(-0.08, 0.08, size=3), -1, 1)
    for f in range(num_frames):
      d = _sdf(shape, xx - cx[f], yy - cy[f], radius[f], angle[f])
      cover = np.clip(0.5 - d, 0.0, 1.0)
      for c in range(3):
        out[b, f, c] = np.clip((1 - cover) * (grad + tint[c]) + cover * colour[c], -1, 1)
  return out


def batch_iterator(batch_size: int, seed: int, *, num_frames: int = 8, height: int = 32,
                   width: int = 32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless (videos, class_ids) batches, deterministic by seed."""
  rng = np.random.default_rng(seed)
  while True:
    ids = rng.integers(0, NUM_CLASSES, size=batch_size)
    yield sample_videos(ids, rng, num_frames=num_frames, height=height, width=width), ids


def class_embeddings(num_classes: int, seq_len: int, dim: int, seed: int = 0) -> np.ndarray:
  """(num_classes + 1, seq_len, dim) fixed "text embeddings"; the last row is the null prompt.

  Unit-variance Gaussian sequences play the role of a text encoder's output;
  the null prompt is all zeros, like an empty prompt's padding.
  """
  rng = np.random.default_rng(seed)
  table = rng.standard_normal((num_classes + 1, seq_len, dim)).astype(np.float32)
  table[-1] = 0.0
  return table
