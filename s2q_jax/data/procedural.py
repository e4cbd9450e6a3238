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
CLASS_NAMES = tuple(c[0] for c in CLASSES)
# The speed range gives this much travel over a default 8-frame clip; longer
# clips move proportionally slower so the object never leaves the frame.
_REFERENCE_FRAMES = 8


def class_name(i: int) -> str:
  """The human-readable name of class `i`, e.g. "red square moving right"."""
  return CLASS_NAMES[i]


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
  slow_down = min(1.0, (_REFERENCE_FRAMES - 1) / max(f - 1, 1))
  speed = rng.uniform(1.2, 2.0) * min(h, w) / 32 * slow_down
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
  """Videos (B, F, 3, H, W) float32 in [-1, 1] for the given class ids.

  H and W must be multiples of 4 (the embedded model's patch size) and at
  least 16, below which the shapes no longer fit their motions.
  """
  class_ids = np.asarray(class_ids)
  if class_ids.ndim != 1 or (class_ids.size and class_ids.dtype.kind not in "iu"):
    raise ValueError(f"class ids must be a 1-D integer array, got {class_ids!r}")
  if class_ids.size and (class_ids.min() < 0 or class_ids.max() >= NUM_CLASSES):
    raise ValueError(f"class ids must be in [0, {NUM_CLASSES}), got {class_ids}")
  if num_frames < 1:
    raise ValueError(f"num_frames must be at least 1, got {num_frames}")
  if height < 16 or width < 16 or height % 4 or width % 4:
    raise ValueError(f"height and width must be multiples of 4 and at least 16, "
                     f"got {height}x{width}")
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
    background = grad + tint[:, None, None]
    for f in range(num_frames):
      # Coverage ramps over one pixel across the edge: anti-aliasing.
      cover = np.clip(0.5 - _sdf(shape, xx - cx[f], yy - cy[f], radius[f], angle[f]), 0.0, 1.0)
      out[b, f] = np.clip((1 - cover) * background + cover * colour[:, None, None], -1, 1)
  return out


def batch_iterator(batch_size: int, seed: int, *, num_frames: int = 8, height: int = 32,
                   width: int = 32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless (videos (B, F, 3, H, W), class_ids (B,)) batches, deterministic by seed.

  Class ids are drawn uniformly; one generator draws both ids and videos, so
  the whole stream is fixed by `seed`.
  """
  rng = np.random.default_rng(seed)
  while True:
    ids = rng.integers(0, NUM_CLASSES, size=batch_size)
    yield sample_videos(ids, rng, num_frames=num_frames, height=height, width=width), ids


def class_embeddings(num_classes: int, seq_len: int, dim: int, seed: int = 0) -> np.ndarray:
  """(num_classes + 1, seq_len, dim) float32 fixed "text embeddings".

  Row i < num_classes is class i's condition: a unit-variance Gaussian
  sequence, standing in for a text encoder's output. Row num_classes (the
  last) is the null condition for classifier-free guidance, all zeros (like
  an empty prompt's padding). The embedded model ships its own table
  (`conditions.safetensors`); this function is what built it at training.
  """
  rng = np.random.default_rng(seed)
  table = rng.standard_normal((num_classes + 1, seq_len, dim)).astype(np.float32)
  table[-1] = 0.0
  return table
