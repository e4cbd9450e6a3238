"""The small class-conditional video DiT shipped with the package.

A CogVideoX-architecture transformer trained by `s2q_jax.tools.train_embedded`
on `s2q_jax.data.procedural` videos; it works directly in pixel space
(8 frames of 32×32 RGB), so no VAE is needed to look at its outputs.
"""
from __future__ import annotations

import importlib.resources
import os

NAME = "embedded-dit"


def path() -> str:
  """The folder of the embedded model (diffusers format + conditions.safetensors)."""
  folder = str(importlib.resources.files("s2q_jax") / "assets" / "embedded_dit")
  if not os.path.isfile(os.path.join(folder, "config.json")):
    raise FileNotFoundError(
        f"the embedded model is missing from {folder}; reinstall the package, or rebuild it "
        "with `python -m s2q_jax.tools.train_embedded --config configs/train_embedded.py`")
  return folder
