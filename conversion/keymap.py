"""Name and layout mapping between diffusers' PyTorch state dict and the Flax model.

One table serves both directions. Flax paths are dotted NNX paths
(``transformer_blocks.0.attn1.to_q.kernel``); PyTorch keys are diffusers'
(``transformer_blocks.0.attn1.to_q.weight``).
"""
from __future__ import annotations

import re

import numpy as np

# Flax module paths whose diffusers name differs (diffusers wraps them in lists).
_MODULE_RENAMES = (
    (re.compile(r"\.attn1\.to_out$"), ".attn1.to_out.0"),
    (re.compile(r"\.ff\.proj_in$"), ".ff.net.0.proj"),
    (re.compile(r"\.ff\.proj_out$"), ".ff.net.2"),
)
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "pos_embedding": "pos_embedding"}


def torch_key(flax_path: str) -> str:
  """The diffusers key of a Flax parameter path."""
  module, _, leaf = flax_path.rpartition(".")
  for pattern, repl in _MODULE_RENAMES:
    module = pattern.sub(repl, module)
  return f"{module}.{_LEAF_TO_TORCH[leaf]}" if module else _LEAF_TO_TORCH[leaf]


def to_flax(flax_path: str, tensor: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
  """Converts a diffusers tensor to the layout of the Flax parameter at `flax_path`."""
  if not flax_path.endswith(".kernel"):
    return tensor
  if tensor.ndim > 2:  # patch-embedding Conv2d/3d (out, in, *patch) → Linear on (c, *patch) patches
    return tensor.reshape(tensor.shape[0], -1).T
  if tensor.ndim == 2 and tuple(tensor.T.shape) == tuple(flax_shape):
    return tensor.T
  return tensor  # wrong shape: left as is so shape validation reports it


def to_torch(flax_path: str, array: np.ndarray, torch_shape: tuple[int, ...] | None = None
             ) -> np.ndarray:
  """Inverse of `to_flax`; `torch_shape` restores a patch-embedding Conv kernel's shape."""
  if not flax_path.endswith(".kernel"):
    return array
  out = array.T
  return out.reshape(torch_shape) if torch_shape is not None else out


def conv_kernel_shape(flax_path: str, in_channels: int, patch_size: int, out_dim: int):
  """The PyTorch Conv2d shape of the patch embedding, or None for ordinary Linears."""
  if flax_path == "patch_embed.proj.kernel":
    return (out_dim, in_channels, patch_size, patch_size)
  return None
