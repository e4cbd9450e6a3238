"""Building models from diffusers folders and converted (orbax) checkpoints.

A converted checkpoint is a folder with diffusers' `config.json` (plus an
``_s2q_jax`` entry) and an orbax checkpoint of the parameters in `params/`.
Models are built abstractly (`nnx.eval_shape`) and filled with the loaded
arrays, so loading never holds a second, randomly initialised copy.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from conversion import keymap
from conversion.checkpoint_files import CheckpointError, TensorSource, config_path
from s2q_jax.models.cogvideox import CogVideoXTransformer3D
from s2q_jax.models.config import CogVideoXConfig, warn_missing_fields
from s2q_jax.models.params import flat_params, load_flat_params, param_shapes

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


class DiffusersParams(Mapping):
  """{dotted Flax path: array} over a diffusers folder, each tensor read on access.

  Every key and shape is checked up front, so a bad checkpoint fails before
  any work; reading lazily keeps peak memory at about one copy of the model.
  """

  def __init__(self, folder: str, config: CogVideoXConfig, dtype=None, *,
               allow_pickle: bool = False):
    self._source = source = TensorSource(folder, allow_pickle=allow_pickle)
    self._shapes = {p: s for p, (s, _) in param_shapes(abstract_model(config)).items()}
    self._keys = {path: keymap.torch_key(path) for path in self._shapes}
    wanted, present = set(self._keys.values()), set(source.keys())
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
    return jnp.asarray(keymap.to_flax(path, self._source.get(self._keys[path]), self._shapes[path]),
                       self.dtype)

  def __iter__(self):
    return iter(self._shapes)

  def __len__(self) -> int:
    return len(self._shapes)


def _torch_shape(path: str, flax_shape: tuple[int, ...], config: CogVideoXConfig):
  conv = keymap.conv_kernel_shape(path, config.in_channels, config.patch_size, config.inner_dim)
  if conv is not None:
    return conv
  return tuple(reversed(flax_shape)) if path.endswith(".kernel") else tuple(flax_shape)


def save_converted(config: CogVideoXConfig, params: Mapping[str, np.ndarray | jax.Array],
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


def save_model(model: CogVideoXTransformer3D, folder: str) -> None:
  save_converted(model.config, flat_params(model), folder)


def is_converted(folder: str) -> bool:
  return os.path.isdir(os.path.join(folder, PARAMS_DIR))


def read_config(folder: str) -> CogVideoXConfig:
  return _read_config(folder)[0]


def _read_config(folder: str) -> tuple[CogVideoXConfig, dict]:
  with open(config_path(folder)) as f:
    try:
      raw = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{folder}/config.json is not valid JSON: {e}") from None
  meta = raw.pop(FORMAT_KEY, {})
  warn_missing_fields(raw, config_path(folder))
  return CogVideoXConfig.from_dict(raw), meta


def load_pretrained(path: str, dtype=None, *, allow_pickle: bool = False,
                    backend: str = "auto") -> CogVideoXTransformer3D:
  """Loads a diffusers CogVideoX folder, a converted checkpoint or a quantized checkpoint.

  `dtype` None keeps the stored dtype (float32 compute for quantized
  checkpoints); otherwise parameters are cast to it. `backend` selects the
  matmul kernels of a quantized checkpoint (see `pallas_kernels.BACKENDS`).
  """
  path = os.fspath(path)
  model = _load(path, dtype, allow_pickle, backend)
  check_finite_weights(model, path)
  return model


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


def _load(path: str, dtype, allow_pickle: bool, backend: str) -> CogVideoXTransformer3D:
  config, meta = _read_config(path)
  if meta.get("format") == "quantized":
    from s2q_jax.deploy import load_quantized  # pylint: disable=import-outside-toplevel
    return load_quantized(path, config, meta, backend=backend, dtype=dtype or jnp.float32)
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
