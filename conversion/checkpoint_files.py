"""Finding and reading the weight files of a diffusers model folder, one tensor at a time.

safetensors files are memory-mapped and read lazily, so converting a model
holds at most the output plus the tensor being converted. Pickle checkpoints
can run arbitrary code when loaded and are refused unless asked for.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.pt")
CONFIG_NAME = "config.json"
PIPELINE_INDEX_NAME = "model_index.json"


class CheckpointError(ValueError):
  """A model folder or weight file cannot be used; the message says what to fix."""


def config_path(folder: str) -> str:
  if not os.path.isdir(folder):
    raise CheckpointError(f"{folder} is not a directory")
  path = os.path.join(folder, CONFIG_NAME)
  if not os.path.isfile(path):
    raise CheckpointError(f"{folder} has no {CONFIG_NAME}: pass a diffusers transformer folder "
                          "(the 'transformer' sub-folder of a pipeline) or a converted checkpoint")
  return path


def pipeline_component(folder: str, component: str) -> str:
  """`folder` itself, or its `component` sub-folder when it is a whole diffusers pipeline.

  A pipeline folder is recognised by its `model_index.json`.
  """
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise CheckpointError(f"{folder} is not a directory")
  if not os.path.isfile(os.path.join(folder, PIPELINE_INDEX_NAME)):
    return folder
  sub = os.path.join(folder, component)
  if not os.path.isdir(sub):
    raise CheckpointError(f"the pipeline folder {folder} has no {component}/ sub-folder")
  return sub


class TensorSource:
  """Lazy {key: tensor} view over the weight files of a model folder.

  `weights_name` is the single-file name; a sharded checkpoint has its index
  beside it as `<weights_name>.index.json` (diffusers' and transformers' layout;
  transformers names the file "model.safetensors").
  """

  def __init__(self, folder: str, *, allow_pickle: bool = False,
               weights_name: str = WEIGHTS_NAME):
    self.folder = folder
    self._files: dict[str, str] = {}  # key → file
    self._pickled: dict[str, np.ndarray] | None = None
    self._open: dict[str, object] = {}
    index_name = f"{weights_name}.index.json"
    index = os.path.join(folder, index_name)
    single = os.path.join(folder, weights_name)
    if os.path.isfile(index):
      self._read_index(index)
    elif os.path.isfile(single):
      for key in self._handle(single).keys():
        self._files[key] = single
    else:
      pickled = [os.path.join(folder, n) for n in PICKLE_NAMES
                 if os.path.isfile(os.path.join(folder, n))]
      if not pickled:
        raise CheckpointError(f"{folder} has no {weights_name} or {index_name}")
      self._pickled = _load_pickle(pickled[0], allow_pickle)

  def _read_index(self, index: str) -> None:
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
    for key, name in weight_map.items():
      path = os.path.join(self.folder, name)
      if not os.path.isfile(path):
        raise CheckpointError(f"{index} lists shard {name}, which does not exist")
      self._files[key] = path
    for path in set(self._files.values()):
      in_file = set(self._handle(path).keys())
      listed = {k for k, p in self._files.items() if p == path}
      if listed - in_file:
        raise CheckpointError(f"{os.path.basename(path)} lacks tensors its index lists: "
                              f"{sorted(listed - in_file)[:5]}")

  def _handle(self, path: str):
    if path not in self._open:
      try:
        self._open[path] = safe_open(path, framework="numpy")
      except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file "
                              f"(corrupt or truncated?): {e}") from None
    return self._open[path]

  def keys(self) -> list[str]:
    return sorted(self._pickled) if self._pickled is not None else sorted(self._files)

  def shape(self, key: str) -> tuple[int, ...]:
    if self._pickled is not None:
      return tuple(self._pickled[key].shape)
    return tuple(self._handle(self._files[key]).get_slice(key).get_shape())

  def get(self, key: str) -> np.ndarray:
    if self._pickled is not None:
      return self._pickled[key]
    try:
      return self._handle(self._files[key]).get_tensor(key)
    except SafetensorError as e:
      raise CheckpointError(f"cannot read {key} from {self._files[key]} "
                            f"(corrupt or truncated?): {e}") from None

  def items(self) -> Iterator[tuple[str, np.ndarray]]:
    for key in self.keys():
      yield key, self.get(key)


def _load_pickle(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
  if not allow_pickle:
    raise CheckpointError(
        f"{path} is a pickle checkpoint, which can execute code when loaded; convert it to "
        "safetensors, or pass --allow-pickle (needs torch) if you trust its source")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise CheckpointError(f"loading {path} needs torch: pip install torch") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for bad pickles
    raise CheckpointError(f"cannot load {path} with weights_only=True: {e}") from None
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
          for k, v in state.items()}
