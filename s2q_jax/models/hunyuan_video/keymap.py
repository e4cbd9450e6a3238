"""Names and layouts between diffusers' HunyuanVideo state dict and the Flax model, both ways.

Flax paths are dotted NNX paths (``transformer_blocks.0.attn.to_out.kernel``);
PyTorch keys are diffusers' (``transformer_blocks.0.attn.to_out.0.weight``).
"""
from __future__ import annotations

import re

from conversion import keymap as linear_layouts
from s2q_jax.models.architecture import Architecture, Shape
from s2q_jax.models.hunyuan_video.config import DIFFUSERS_CLASS_NAME, HunyuanVideoConfig
from s2q_jax.models.hunyuan_video.model import HunyuanVideoTransformer3D

# Modules diffusers wraps in lists: `to_out = [Linear, Dropout]`, `ff.net = [act, Dropout, Linear]`.
_MODULE_RENAMES = (
    (re.compile(r"\.attn\.to_out$"), ".attn.to_out.0"),
    (re.compile(r"\.(ff|ff_context)\.proj_in$"), r".\1.net.0.proj"),
    (re.compile(r"\.(ff|ff_context)\.proj_out$"), r".\1.net.2"),
)
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_PATCH_KERNEL = "x_embedder.proj.kernel"


def torch_key(flax_path: str) -> str:
  """The diffusers key of a Flax parameter path."""
  module, _, leaf = flax_path.rpartition(".")
  for pattern, repl in _MODULE_RENAMES:
    module = pattern.sub(repl, module)
  return f"{module}.{_LEAF_TO_TORCH[leaf]}"


def torch_shape(flax_path: str, flax_shape: Shape, config: HunyuanVideoConfig) -> Shape:
  """The diffusers shape: Conv3d (out, in, p_t, p, p) for the patch embedding, Linear (out, in)."""
  if flax_path == _PATCH_KERNEL:
    p = config.patch_size
    return (config.inner_dim, config.in_channels, config.patch_size_t, p, p)
  return tuple(reversed(flax_shape)) if flax_path.endswith(".kernel") else tuple(flax_shape)


ARCHITECTURE = Architecture(
    class_name=DIFFUSERS_CLASS_NAME,
    config_type=HunyuanVideoConfig,
    model_type=HunyuanVideoTransformer3D,
    read_config=HunyuanVideoConfig.from_diffusers,
    torch_key=torch_key,
    torch_shape=torch_shape,
    to_flax=linear_layouts.to_flax,
    to_torch=linear_layouts.to_torch,
)
