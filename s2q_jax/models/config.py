"""Configuration of the CogVideoX transformer, read from diffusers' config.json."""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Collection
from typing import Any

DIFFUSERS_CLASS_NAME = "CogVideoXTransformer3DModel"

# A field diffusers writes that does not change the inference graph (besides its metadata).
_IGNORED_FIELDS = frozenset({"dropout"})
# The end of the missing-field warning of configs whose defaults are diffusers'.
_ADVICE = "; add the field if the model was trained otherwise"


class UnsupportedConfigError(ValueError):
  """The config asks for something this implementation does not support."""


class MissingConfigFieldWarning(UserWarning):
  """A config.json lacks a field that changes the model's function; its default is taken."""


def warn_missing_fields(d: dict[str, Any], origin: str, config_cls: type | None = None, *,
                        defaults: str = "the",
                        advice: str = " (diffusers fills the same defaults)" + _ADVICE,
                        optional: Collection[str] = (), stacklevel: int = 2) -> None:
  """Warns naming each field of `config_cls` (default `CogVideoXConfig`) that `d` lacks.

  Every field of a model config changes the computed function (metadata such
  as `_diffusers_version` is not a field), and a model trained with another
  value silently computes something else, e.g. 2B-style sincos positions for a
  5B that needs RoPE. The warning says "taking {defaults} default(s) ...{advice}";
  `optional` fields are not named, and `stacklevel` is `warnings.warn`'s.
  """
  missing = [f for f in dataclasses.fields(config_cls or CogVideoXConfig)
             if f.name not in d and f.name not in optional]
  if missing:
    warnings.warn(
        f"{origin} has no {', '.join(f.name for f in missing)}: taking {defaults} default"
        f"{'s' if len(missing) > 1 else ''} {', '.join(f'{f.name}={f.default!r}' for f in missing)}"
        f"{advice}", MissingConfigFieldWarning, stacklevel=stacklevel)


def read_fields(config_cls: type, d: dict[str, Any], class_name: str, *,
                wrong_class: str | None = None, unknown: str = "config fields not supported",
                ignored: Collection[str] = ()) -> dict[str, Any]:
  """The entries of `d` (a config.json) that are fields of `config_cls`, once `d` is checked.

  A `_class_name` other than `class_name` raises `UnsupportedConfigError`
  "config _class_name is '<found>'" followed by `wrong_class` (default
  ", not <class_name>"); so do entries that are neither fields, `ignored`, nor
  metadata (a leading "_"): "<unknown>: <their names>".
  """
  found = d.get("_class_name", class_name)
  if found != class_name:
    raise UnsupportedConfigError(f"config _class_name is {found!r}"
                                 + (f", not {class_name}" if wrong_class is None else wrong_class))
  known = {f.name for f in dataclasses.fields(config_cls)}
  names = sorted(k for k in d if k not in known and k not in ignored and not k.startswith("_"))
  if names:
    raise UnsupportedConfigError(f"{unknown}: {', '.join(names)}")
  return {k: v for k, v in d.items() if k in known}


@dataclasses.dataclass(frozen=True)
class CogVideoXConfig:
  """The CogVideoX 1.0 family (2B: sincos positions; 5B: 3D rotary).

  Field names and defaults are diffusers' `CogVideoXTransformer3DModel`
  arguments, so a diffusers config.json maps onto it one to one.
  """
  num_attention_heads: int = 30
  attention_head_dim: int = 64
  in_channels: int = 16
  out_channels: int | None = 16
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  time_embed_dim: int = 512
  ofs_embed_dim: int | None = None
  text_embed_dim: int = 4096
  num_layers: int = 30
  attention_bias: bool = True
  sample_width: int = 90
  sample_height: int = 60
  sample_frames: int = 49
  patch_size: int = 2
  patch_size_t: int | None = None
  temporal_compression_ratio: int = 4
  max_text_seq_length: int = 226
  activation_fn: str = "gelu-approximate"
  timestep_activation_fn: str = "silu"
  norm_elementwise_affine: bool = True
  norm_eps: float = 1e-5
  spatial_interpolation_scale: float = 1.875
  temporal_interpolation_scale: float = 1.0
  use_rotary_positional_embeddings: bool = False
  use_learned_positional_embeddings: bool = False
  patch_bias: bool = True

  def __post_init__(self):
    # Features of later CogVideoX versions that this implementation lacks:
    # refuse them by name instead of silently computing something else.
    unsupported = {
        "patch_size_t": (self.patch_size_t is not None, "CogVideoX 1.5 temporal patching"),
        "ofs_embed_dim": (bool(self.ofs_embed_dim), "CogVideoX 1.5 I2V offset embedding"),
        "activation_fn": (self.activation_fn != "gelu-approximate", "only 'gelu-approximate'"),
        "timestep_activation_fn": (self.timestep_activation_fn != "silu", "only 'silu'"),
        "patch_bias": (not self.patch_bias, "patch embedding without bias"),
    }
    for field, (bad, why) in unsupported.items():
      if bad:
        raise UnsupportedConfigError(
            f"config field {field}={getattr(self, field)!r} is not supported ({why}); "
            "s2q-jax implements the CogVideoX 1.0 family")
    if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
      raise UnsupportedConfigError(
          "config: use_learned_positional_embeddings=True requires "
          "use_rotary_positional_embeddings=True (as in diffusers)")
    if self.use_rotary_positional_embeddings and self.attention_head_dim % 16:
      raise UnsupportedConfigError(
          f"config: attention_head_dim={self.attention_head_dim} must be a multiple of 16 "
          "with use_rotary_positional_embeddings (3D RoPE splits it 2:3:3)")
    if self.inner_dim % 16 or self.attention_head_dim % 8:
      raise UnsupportedConfigError(
          f"config: hidden size {self.inner_dim} must be a multiple of 16 and "
          f"attention_head_dim {self.attention_head_dim} a multiple of 8 (positional embeddings)")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def output_channels(self) -> int:
    return self.in_channels if self.out_channels is None else self.out_channels

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CogVideoXConfig":
    return cls(**read_fields(cls, d, DIFFUSERS_CLASS_NAME, ignored=_IGNORED_FIELDS,
                             wrong_class=f"; s2q-jax supports {DIFFUSERS_CLASS_NAME}"))

  def to_dict(self) -> dict[str, Any]:
    return {"_class_name": DIFFUSERS_CLASS_NAME, **dataclasses.asdict(self)}

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> "CogVideoXConfig":
    with open(path) as f:
      try:
        d = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    warn_missing_fields(d, str(path))
    return cls.from_dict(d)
