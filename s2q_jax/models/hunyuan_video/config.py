"""Configuration of the HunyuanVideo transformer, read from diffusers' config.json."""
from __future__ import annotations

import dataclasses
from typing import Any

from s2q_jax.models.config import UnsupportedConfigError, read_fields, warn_missing_fields

DIFFUSERS_CLASS_NAME = "HunyuanVideoTransformer3DModel"


@dataclasses.dataclass(frozen=True)
class HunyuanVideoConfig:
  """Text-to-video HunyuanVideo (the 13B model's defaults).

  Field names and defaults are diffusers' `HunyuanVideoTransformer3DModel`
  arguments, so a diffusers config.json maps onto it one to one.
  """
  in_channels: int = 16
  out_channels: int | None = 16
  num_attention_heads: int = 24
  attention_head_dim: int = 128
  num_layers: int = 20
  num_single_layers: int = 40
  num_refiner_layers: int = 2
  mlp_ratio: float = 4.0
  patch_size: int = 2
  patch_size_t: int = 1
  qk_norm: str = "rms_norm"
  guidance_embeds: bool = True
  text_embed_dim: int = 4096
  pooled_projection_dim: int = 768
  rope_theta: float = 256.0
  rope_axes_dim: tuple[int, ...] = (16, 56, 56)
  image_condition_type: str | None = None

  def __post_init__(self):
    # config.json stores the tuple as a list; a tuple keeps the config hashable (jit static).
    object.__setattr__(self, "rope_axes_dim", tuple(self.rope_axes_dim))
    if self.image_condition_type is not None:
      raise UnsupportedConfigError(
          f"config field image_condition_type={self.image_condition_type!r} is not supported: "
          "s2q-jax implements text-to-video HunyuanVideo only (image_condition_type=null), "
          "not the image-to-video variants")
    if self.qk_norm != "rms_norm":
      raise UnsupportedConfigError(
          f"config field qk_norm={self.qk_norm!r} is not supported; HunyuanVideo uses 'rms_norm'")
    for name in ("num_attention_heads", "attention_head_dim", "patch_size", "patch_size_t",
                 "in_channels", "text_embed_dim", "pooled_projection_dim"):
      if getattr(self, name) < 1:
        raise UnsupportedConfigError(f"config field {name}={getattr(self, name)} must be >= 1")
    if (len(self.rope_axes_dim) != 3 or any(d <= 0 or d % 2 for d in self.rope_axes_dim)
        or sum(self.rope_axes_dim) != self.attention_head_dim):
      raise UnsupportedConfigError(
          f"config field rope_axes_dim={list(self.rope_axes_dim)} must be three positive even "
          f"sizes (time, height, width) summing to attention_head_dim={self.attention_head_dim}")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def output_channels(self) -> int:
    return self.out_channels or self.in_channels

  @property
  def mlp_dim(self) -> int:
    """Hidden width of the dual-stream feed-forwards and the single-stream MLP."""
    return int(self.inner_dim * self.mlp_ratio)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "HunyuanVideoConfig":
    return cls(**read_fields(cls, d, DIFFUSERS_CLASS_NAME))

  @classmethod
  def from_diffusers(cls, d: dict[str, Any], origin: str) -> "HunyuanVideoConfig":
    """`from_dict`, warning about missing fields that change the function (as CogVideoX does)."""
    warn_missing_fields(d, origin, cls)
    return cls.from_dict(d)

  def to_dict(self) -> dict[str, Any]:
    return {"_class_name": DIFFUSERS_CLASS_NAME, **dataclasses.asdict(self)}
