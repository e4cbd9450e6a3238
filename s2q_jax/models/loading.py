"""Building models from diffusers folders and converted (orbax) checkpoints.

A converted checkpoint is a folder with diffusers' `config.json` (plus an
``_s2q_jax`` entry) and an orbax checkpoint of the parameters in `params/`.
Models are built abstractly (`nnx.eval_shape`) and filled with the loaded
arrays, so loading never holds a second, randomly initialised copy. The
config's `_class_name` picks the model family from `ARCHITECTURES`.

Quantized checkpoints (`s2q_jax.deploy`) are recognised here but built
downstream: `s2q_jax.pretrained.load_pretrained` loads every kind of folder.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from conversion import keymap
from conversion.checkpoint_files import CheckpointError, TensorSource, config_path
from s2q_jax.models import hunyuan_video, wan
from s2q_jax.models.architecture import Architecture
from s2q_jax.models.cogvideox import CogVideoXTransformer3D
from s2q_jax.models.config import (DIFFUSERS_CLASS_NAME, CogVideoXConfig, UnsupportedConfigError,
                                   warn_missing_fields)
from s2q_jax.models.params import flat_params, load_flat_params, param_shapes

FORMAT_KEY = "_s2q_jax"
PARAMS_DIR = "params"
QUANTIZED_FORMAT = "quantized"  # `FORMAT_KEY`'s "format" in checkpoints `s2q_jax.deploy` writes


def _read_cogvideox_config(d: dict, origin: str) -> CogVideoXConfig:
  warn_missing_fields(d, origin)
  return CogVideoXConfig.from_dict(d)


def _cogvideox_torch_shape(path: str, flax_shape: tuple[int, ...], config: CogVideoXConfig):
  conv = keymap.conv_kernel_shape(path, config.in_channels, config.patch_size, config.inner_dim)
  if conv is not None:
    return conv
  return tuple(reversed(flax_shape)) if path.endswith(".kernel") else tuple(flax_shape)


COGVIDEOX = Architecture(
    class_name=DIFFUSERS_CLASS_NAME, config_type=CogVideoXConfig,
    model_type=CogVideoXTransformer3D, read_config=_read_cogvideox_config,
    torch_key=keymap.torch_key, torch_shape=_cogvideox_torch_shape, to_flax=keymap.to_flax,
    to_torch=keymap.to_torch)

# diffusers `_class_name` → model family. A config.json without `_class_name` is CogVideoX.
ARCHITECTURES: dict[str, Architecture] = {
    arch.class_name: arch for arch in (COGVIDEOX, wan.ARCHITECTURE, hunyuan_video.ARCHITECTURE)}

ModelConfig = Any  # the config dataclass of one of ARCHITECTURES


def architecture(config: ModelConfig) -> Architecture:
  """The family whose config type `config` is."""
  for arch in ARCHITECTURES.values():
    if isinstance(config, arch.config_type):
      return arch
  raise TypeError(f"{type(config).__name__} is not the config of a supported model "
                  f"({', '.join(ARCHITECTURES)})")


def abstract_model(config: ModelConfig, dtype=jnp.float32) -> nnx.Module:
  model_type = architecture(config).model_type
  return nnx.eval_shape(lambda: model_type(config, dtype=dtype, rngs=nnx.Rngs(0)))


def model_from_params(config: ModelConfig, params: Mapping[str, np.ndarray | jax.Array],
                      dtype=jnp.float32) -> nnx.Module:
  """A model whose parameters are `params` ({dotted Flax path: array})."""
  model = abstract_model(config, dtype)
  load_flat_params(model, params)
  return model


class DiffusersParams(Mapping):
  """{dotted Flax path: array} over a diffusers folder, each tensor read on access.

  Every key and shape is checked up front, so a bad checkpoint fails before
  any work; reading lazily keeps peak memory at about one copy of the model.
  """

  def __init__(self, folder: str, config: ModelConfig, dtype=None, *,
               allow_pickle: bool = False):
    self._arch = arch = architecture(config)
    self._source = source = TensorSource(folder, allow_pickle=allow_pickle)
    self._shapes = {p: s for p, (s, _) in param_shapes(abstract_model(config)).items()}
    self._keys = {path: arch.torch_key(path) for path in self._shapes}
    wanted = set(self._keys.values())
    present = {k for k in source.keys() if k in wanted or not arch.ignores(k)}
    problems = []
    if missing := sorted(wanted - present):
      problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected := sorted(present - wanted):
      problems.append(f"unexpected keys: {', '.join(unexpected)}")
    misshaped = [f"{key} {source.shape(key)} (expected {expected})"
                 for path, key in sorted(self._keys.items()) if key in present
                 if source.shape(key) != (expected := _torch_shape(path, self._shapes[path], config))]
    if misshaped:
      problems.append(f"mis-shaped keys: {', '.join(misshaped)}")
    if problems:
      raise CheckpointError(f"{folder} does not match its config.json:\n  " + "\n  ".join(problems))
    self.dtype = np.dtype(dtype) if dtype is not None else source.get(self._keys["proj_out.kernel"]).dtype

  def __getitem__(self, path: str) -> jax.Array:
    tensor = self._source.get(self._keys[path])
    return jnp.asarray(self._arch.to_flax(path, tensor, self._shapes[path]), self.dtype)

  def __iter__(self):
    return iter(self._shapes)

  def __len__(self) -> int:
    return len(self._shapes)


def _torch_shape(path: str, flax_shape: tuple[int, ...], config: ModelConfig):
  return architecture(config).torch_shape(path, flax_shape, config)


def save_converted(config: ModelConfig, params: Mapping[str, np.ndarray | jax.Array],
                   folder: str) -> None:
  """Writes config.json and an orbax checkpoint of `params` ({dotted path: array}) into `folder`.

  `params` may be lazy (`DiffusersParams`): each array is read once, while
  the tree is built.
  """
  os.makedirs(folder, exist_ok=True)
  tree = jax.tree_util.tree_map_with_path(
      lambda path, _: params[".".join(str(getattr(k, "key", k)) for k in path)],
      nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param)))
  dtype = np.dtype(next(iter(jax.tree.leaves(tree))).dtype).name
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({**config.to_dict(), FORMAT_KEY: {"format": "flax-orbax", "dtype": dtype}}, f,
              indent=2)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(os.path.join(folder, PARAMS_DIR)), tree)


def save_model(model: nnx.Module, folder: str) -> None:
  save_converted(model.config, flat_params(model), folder)


def is_converted(folder: str) -> bool:
  return os.path.isdir(os.path.join(folder, PARAMS_DIR))


def read_config(folder: str) -> ModelConfig:
  return read_config_and_meta(folder)[0]


def read_config_and_meta(folder: str) -> tuple[ModelConfig, dict]:
  """(model config, the config.json's `FORMAT_KEY` entry: {} for a diffusers folder)."""
  with open(config_path(folder)) as f:
    try:
      raw = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{folder}/config.json is not valid JSON: {e}") from None
  meta = raw.pop(FORMAT_KEY, {})
  class_name = raw.get("_class_name", DIFFUSERS_CLASS_NAME)
  if class_name not in ARCHITECTURES:
    raise UnsupportedConfigError(f"{config_path(folder)}: _class_name {class_name!r} is not "
                                 f"supported; s2q-jax loads {', '.join(ARCHITECTURES)}")
  return ARCHITECTURES[class_name].read_config(raw, config_path(folder)), meta


def load_pretrained(path: str, dtype=None, *, allow_pickle: bool = False) -> nnx.Module:
  """Loads a diffusers folder or a converted checkpoint.

  The model family (CogVideoX, Wan, HunyuanVideo) follows the config's `_class_name`.
  `dtype` None keeps the stored dtype; otherwise parameters are cast to it.
  Quantized checkpoints are refused: `s2q_jax.pretrained.load_pretrained`
  loads them too.
  """
  path = os.fspath(path)
  config, meta = read_config_and_meta(path)
  if is_quantized(meta):
    raise CheckpointError(f"{path} is a quantized checkpoint (s2q_jax.deploy): load it with "
                          "s2q_jax.pretrained.load_pretrained")
  model = load_full_precision(path, config, meta, dtype, allow_pickle=allow_pickle)
  check_finite_weights(model, path)
  return model


def is_quantized(meta: dict) -> bool:
  """Whether `meta` (from `read_config_and_meta`) is a quantized checkpoint's."""
  return meta.get("format") == QUANTIZED_FORMAT


def check_finite_weights(model: nnx.Module, path: str, show: int = 3) -> None:
  """Raises `CheckpointError` naming the tensors with NaN or Inf values (up to `show` of them).

  A non-finite weight otherwise runs to the end and reports NaN metrics, or
  fails much later in an unrelated-looking stage.
  """
  bad = []
  for key, var in nnx.to_flat_state(nnx.state(model)):
    value = var.get_value() if hasattr(var, "get_value") else var
    if (isinstance(value, (jax.Array, np.ndarray)) and jnp.issubdtype(value.dtype, jnp.floating)
        and not bool(jnp.all(jnp.isfinite(value)))):
      bad.append(".".join(str(k) for k in key))
  if bad:
    more = f" and {len(bad) - show} more" if len(bad) > show else ""
    raise CheckpointError(f"{path} has NaN or Inf weights in {len(bad)} tensor"
                          f"{'s' if len(bad) > 1 else ''}: {', '.join(bad[:show])}{more}; "
                          "the checkpoint is corrupt or was saved from a diverged training run")


def load_full_precision(path: str, config: ModelConfig, meta: dict, dtype=None, *,
                        allow_pickle: bool = False) -> nnx.Module:
  """The model of the diffusers folder or converted checkpoint `path`, whose config.json
  `read_config_and_meta` read as `config`, `meta` (weights not checked for NaN or Inf)."""
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
  params = DiffusersParams(path, config, dtype, allow_pickle=allow_pickle)
  return model_from_params(config, params, params.dtype)
