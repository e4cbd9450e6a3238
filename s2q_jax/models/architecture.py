"""What loading and conversion need to know about one diffusers transformer class.

Each model family (CogVideoX, Wan, ...) describes itself with one
`Architecture`; `loading.ARCHITECTURES` maps diffusers' config `_class_name`
to it, so a new family adds one entry there and nothing else in the shared code.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import numpy as np
from flax import nnx

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Architecture:
  """One diffusers transformer class: its config, Flax model and state-dict mapping.

  Attributes:
    class_name: diffusers' `_class_name`, e.g. "WanTransformer3DModel".
    config_type: the frozen config dataclass (with `to_dict()`).
    model_type: the NNX model, built as `model_type(config, dtype=..., rngs=...)`.
    read_config: (config.json dict, its path for messages) → config; warns about
      missing fields that change the function and raises `UnsupportedConfigError`.
    torch_key: dotted Flax parameter path → diffusers state-dict key.
    torch_shape: (Flax path, Flax shape, config) → the diffusers tensor's shape.
    to_flax: (Flax path, diffusers tensor, Flax shape) → array in Flax layout.
    to_torch: (Flax path, Flax array, diffusers shape) → array in diffusers layout.
    ignored_keys: regexes of checkpoint keys diffusers itself skips on load.
  """
  class_name: str
  config_type: type
  model_type: Callable[..., nnx.Module]
  read_config: Callable[[dict[str, Any], str], Any]
  torch_key: Callable[[str], str]
  torch_shape: Callable[[str, Shape, Any], Shape]
  to_flax: Callable[[str, np.ndarray, Shape], np.ndarray]
  to_torch: Callable[[str, np.ndarray, Shape], np.ndarray]
  ignored_keys: tuple[str, ...] = ()

  def ignores(self, key: str) -> bool:
    return any(re.search(pattern, key) for pattern in self.ignored_keys)
