"""Building models from diffusers folders and converted (orbax) checkpoints.

A converted checkpoint is a folder with diffusers' `config.json` (plus an
``_s2q_jax`` entry) and an orbax checkpoint of the parameters in `params/`.
Models are built abstractly (`nnx.eval_shape`) and filled with the loaded
arrays, so loading never holds a second, randomly initialised copy.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from conversion import keymap
from conversion.checkpoint_files import CheckpointError, TensorSource, config_path
from s2q_jax.models.cogvideox import CogVideoXTransformer3D
from s2q_jax.models.config import CogVideoXConfig
from s2q_jax.models.params import load_flat_params, param_shapes

FORMAT_KEY = "_s2q_jax"
PARAMS_DIR = "params"


def abstract_model(config: CogVideoXConfig, dtype=jnp.float32) -> CogVideoXTransformer3D:
  return nnx.eval_shape(lambda: CogVideoXTransformer3D(config, dtype=dtype, rngs=nnx.Rngs(0)))


def model_from_params(config: CogVideoXConfig, params: Mapping[str, np.ndarray | jax.Array],
                      dtype=jnp.float32) -> CogVideoXTransformer3D:
  """A model whose parameters are `params` ({dotted Flax path: array})."""
  model = abstract_model(config, dtype)
  load_flat_params(model, params)
  return model


def read_diffusers_params(folder: str, config: CogVideoXConfig, dtype=None, *,
                          allow_pickle: bool = False) -> dict[str, jax.Array]:
  """Reads and converts a diffusers state dict tensor by tensor, checking every key first.

  `dtype` None keeps the dtype the checkpoint stores its output projection in.
  """
  source = TensorSource(folder, allow_pickle=allow_pickle)
  shapes = {path: shape for path, (shape, _) in param_shapes(abstract_model(config)).items()}
  wanted = {keymap.torch_key(path): path for path in shapes}
  present = set(source.keys())
  problems = []
  missing = sorted(set(wanted) - present)
  unexpected = sorted(present - set(wanted))
  if missing:
    problems.append(f"missing keys: {', '.join(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {', '.join(unexpected)}")
  misshaped = []
  for key in sorted(present & set(wanted)):
    path = wanted[key]
    torch_shape = _torch_shape(path, shapes[path], config)
    if source.shape(key) != torch_shape:
      misshaped.append(f"{key} {source.shape(key)} (expected {torch_shape})")
  if misshaped:
    problems.append(f"mis-shaped keys: {', '.join(misshaped)}")
  if problems:
    raise CheckpointError(f"{folder} does not match its config.json:\n  " + "\n  ".join(problems))
  if dtype is None:
    dtype = source.get(keymap.torch_key("proj_out.kernel")).dtype
  return {path: jnp.asarray(keymap.to_flax(path, source.get(key), shapes[path]), dtype)
          for key, path in wanted.items()}


def _torch_shape(path: str, flax_shape: tuple[int, ...], config: CogVideoXConfig):
  conv = keymap.conv_kernel_shape(path, config.in_channels, config.patch_size, config.inner_dim)
  if conv is not None:
    return conv
  return tuple(reversed(flax_shape)) if path.endswith(".kernel") else tuple(flax_shape)


def save_converted(model: CogVideoXTransformer3D, folder: str) -> None:
  """Writes config.json and an orbax checkpoint of the parameters into `folder` (must be new)."""
  os.makedirs(folder, exist_ok=True)
  dtype = jnp.dtype(model.dtype).name
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({**model.config.to_dict(), FORMAT_KEY: {"format": "flax-orbax", "dtype": dtype}},
              f, indent=2)
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(os.path.join(folder, PARAMS_DIR)), state)


def is_converted(folder: str) -> bool:
  return os.path.isdir(os.path.join(folder, PARAMS_DIR))


def _read_config(folder: str) -> tuple[CogVideoXConfig, dict]:
  with open(config_path(folder)) as f:
    try:
      raw = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{folder}/config.json is not valid JSON: {e}") from None
  meta = raw.pop(FORMAT_KEY, {})
  return CogVideoXConfig.from_dict(raw), meta


def load_pretrained(path: str, dtype=None, *, allow_pickle: bool = False
                    ) -> CogVideoXTransformer3D:
  """Loads a diffusers CogVideoX transformer folder or a converted checkpoint folder.

  `dtype` None keeps the stored dtype; otherwise parameters are cast to it.
  """
  path = os.fspath(path)
  config, meta = _read_config(path)
  if is_converted(path):
    dtype = dtype or meta.get("dtype", "float32")
    model = abstract_model(config, dtype)
    state = nnx.state(model, nnx.Param)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    try:
      with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.abspath(os.path.join(path, PARAMS_DIR)), target)
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"{path}/{PARAMS_DIR} is not a readable checkpoint for this "
                            f"config: {e}") from None
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, dtype), restored))
    nnx.update(model, state)
    return model
  params = read_diffusers_params(path, config, dtype, allow_pickle=allow_pickle)
  return model_from_params(config, params, next(iter(params.values())).dtype)
