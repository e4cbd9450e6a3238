"""Names and layouts between diffusers' Wan state dict and the Flax model, both ways.

Flax paths are dotted NNX paths (``blocks.0.attn1.to_out.kernel``); PyTorch
keys are diffusers' (``blocks.0.attn1.to_out.0.weight``).
"""
from __future__ import annotations

import re

from conversion import keymap as linear_layouts
from s2q_jax.models.architecture import Architecture, Shape
from s2q_jax.models.wan.config import DIFFUSERS_CLASS_NAME, WanConfig
from s2q_jax.models.wan.model import WanTransformer3D

# Flax module paths whose diffusers name differs (diffusers wraps them in lists).
_MODULE_RENAMES = (
    (re.compile(r"\.to_out$"), ".to_out.0"),
    (re.compile(r"\.(ffn|ff)\.proj_in$"), r".\1.net.0.proj"),
    (re.compile(r"\.(ffn|ff)\.proj_out$"), r".\1.net.2"),
)
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "scale_shift_table": "scale_shift_table", "pos_embed": "pos_embed"}
_PATCH_KERNEL = "patch_embedding.kernel"


def torch_key(flax_path: str) -> str:
  """The diffusers key of a Flax parameter path."""
  module, _, leaf = flax_path.rpartition(".")
  for pattern, repl in _MODULE_RENAMES:
    module = pattern.sub(repl, module)
  return f"{module}.{_LEAF_TO_TORCH[leaf]}" if module else _LEAF_TO_TORCH[leaf]


def torch_shape(flax_path: str, flax_shape: Shape, config: WanConfig) -> Shape:
  """The diffusers shape: Conv3d (out, in, pt, ph, pw) for the patch embedding, Linear (out, in)."""
  if flax_path == _PATCH_KERNEL:
    return (config.inner_dim, config.in_channels, *config.patch_size)
  return tuple(reversed(flax_shape)) if flax_path.endswith(".kernel") else tuple(flax_shape)


ARCHITECTURE = Architecture(
    class_name=DIFFUSERS_CLASS_NAME,
    config_type=WanConfig,
    model_type=WanTransformer3D,
    read_config=WanConfig.from_diffusers,
    torch_key=torch_key,
    torch_shape=torch_shape,
    to_flax=linear_layouts.to_flax,
    to_torch=linear_layouts.to_torch,
    # Early diffusers image-to-video exports carry an unused `attn2.norm_added_q`.
    ignored_keys=(r"\.norm_added_q\.",),
)
