"""Loading CogVideoX's VAE decoder from the `vae/` folder of a diffusers pipeline.

The folder holds the whole `AutoencoderKLCogVideoX`; only the decoder is
read. Module names mirror diffusers', so a Flax path maps to its PyTorch key by
renaming the leaf (`kernel`/`scale` → `weight`) and a convolution kernel by
moving its (out, in) axes last: PyTorch (out, in, *window) → Flax (*window, in, out).
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion.checkpoint_files import CONFIG_NAME, CheckpointError, TensorSource
from s2q_jax.models.params import load_flat_params, param_shapes
from s2q_jax.models.vae import CogVideoXVAE
from s2q_jax.models.vae_config import CogVideoXVAEConfig

# Checkpoint tensors of the encoder half, which decoding never reads.
_ENCODER_PREFIXES = ("encoder.", "quant_conv.")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def torch_key(flax_path: str) -> str:
  module, _, leaf = flax_path.rpartition(".")
  return f"{module}.{_LEAF_TO_TORCH[leaf]}"


def torch_shape(flax_path: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if flax_path.endswith(".kernel"):
    *window, cin, cout = flax_shape
    return (cout, cin, *window)
  return tuple(flax_shape)


def to_flax(flax_path: str, tensor: np.ndarray) -> np.ndarray:
  if flax_path.endswith(".kernel"):
    return np.transpose(tensor, (*range(2, tensor.ndim), 1, 0))
  return tensor


def read_vae_config(folder: str) -> CogVideoXVAEConfig:
  path = os.path.join(folder, CONFIG_NAME)
  if not os.path.isfile(path):
    hint = (f"; {folder} looks like a pipeline folder: pass {os.path.join(folder, 'vae')}"
            if os.path.isfile(os.path.join(folder, "vae", CONFIG_NAME)) else "")
    raise CheckpointError(f"{folder} has no {CONFIG_NAME}: pass the 'vae' sub-folder of a "
                          f"CogVideoX pipeline{hint}")
  with open(path) as f:
    try:
      return CogVideoXVAEConfig.from_dict(json.load(f))
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def abstract_vae(config: CogVideoXVAEConfig, dtype=jnp.float32) -> CogVideoXVAE:
  return nnx.eval_shape(lambda: CogVideoXVAE(config, dtype=dtype, rngs=nnx.Rngs(0)))


def load_vae(folder: str | os.PathLike, dtype=None, *, allow_pickle: bool = False
             ) -> CogVideoXVAE:
  """The decoder of a diffusers `AutoencoderKLCogVideoX` folder (config.json + safetensors).

  `dtype` None keeps the stored dtype. Every decoder key and shape is checked
  before any tensor is read; encoder tensors are ignored.
  """
  folder = os.fspath(folder)
  config = read_vae_config(folder)
  source = TensorSource(folder, allow_pickle=allow_pickle)
  shapes = {path: shape for path, (shape, _) in param_shapes(abstract_vae(config)).items()}
  keys = {path: torch_key(path) for path in shapes}
  present = set(source.keys())
  problems = []
  if missing := sorted(set(keys.values()) - present):
    problems.append(f"missing keys: {', '.join(missing)}")
  unexpected = sorted(k for k in present - set(keys.values())
                      if not k.startswith(_ENCODER_PREFIXES))
  if unexpected:
    problems.append(f"unexpected keys: {', '.join(unexpected)}")
  misshaped = [f"{key} {source.shape(key)} (expected {expected})"
               for path, key in sorted(keys.items()) if key in present
               if source.shape(key) != (expected := torch_shape(path, shapes[path]))]
  if misshaped:
    problems.append(f"mis-shaped keys: {', '.join(misshaped)}")
  if problems:
    raise CheckpointError(f"{folder} does not match its config.json:\n  " + "\n  ".join(problems))
  if dtype is None:
    dtype = source.get(keys["decoder.conv_in.conv.kernel"]).dtype
  params, non_finite = {}, []
  for path, key in keys.items():
    tensor = source.get(key)
    if not np.isfinite(tensor).all():
      non_finite.append(key)
    params[path] = jnp.asarray(to_flax(path, tensor), dtype)
  if non_finite:  # checked on the host: one device program per tensor shape would cost more
    raise CheckpointError(f"{folder} has NaN or Inf weights in {', '.join(non_finite)}; the "
                          "checkpoint is corrupt or was saved from a diverged training run")
  model = abstract_vae(config, np.dtype(dtype))
  load_flat_params(model, params)
  return model
