"""Configuration of the Wan 2.1 transformer, read from diffusers' config.json."""
from __future__ import annotations

import dataclasses
from typing import Any

from s2q_jax.models.config import UnsupportedConfigError, read_fields, warn_missing_fields

DIFFUSERS_CLASS_NAME = "WanTransformer3DModel"

# Added to diffusers with Wan 2.1 FLF2V; configs written before it lack the field and mean None.
_OPTIONAL_FIELDS = frozenset({"pos_embed_seq_len"})
# diffusers builds RMSNorm over all heads for q and k whatever `qk_norm` says; this is the
# value its conversion scripts write, and the only one whose meaning is unambiguous.
QK_NORM = "rms_norm_across_heads"


@dataclasses.dataclass(frozen=True)
class WanConfig:
  """Wan 2.1 text-to-video (and image-to-video) transformers.

  Field names and defaults are diffusers' `WanTransformer3DModel` arguments
  (the defaults describe Wan 2.1 14B), so a config.json maps onto it one to one.
  """
  patch_size: tuple[int, int, int] = (1, 2, 2)
  num_attention_heads: int = 40
  attention_head_dim: int = 128
  in_channels: int = 16
  out_channels: int | None = 16
  text_dim: int = 4096
  freq_dim: int = 256
  ffn_dim: int = 13824
  num_layers: int = 40
  cross_attn_norm: bool = True
  qk_norm: str | None = QK_NORM
  eps: float = 1e-6
  image_dim: int | None = None
  added_kv_proj_dim: int | None = None
  rope_max_seq_len: int = 1024
  pos_embed_seq_len: int | None = None

  def __post_init__(self):
    patch = self.patch_size
    if (not isinstance(patch, (list, tuple)) or len(patch) != 3
        or not all(isinstance(p, int) and p > 0 for p in patch)):
      raise UnsupportedConfigError(
          f"config: patch_size={patch!r} must be three positive integers (frames, height, width)")
    object.__setattr__(self, "patch_size", tuple(patch))  # config.json stores a list
    if self.qk_norm != QK_NORM:
      raise UnsupportedConfigError(
          f"config field qk_norm={self.qk_norm!r} is not supported: diffusers ignores it and "
          f"always RMS-normalises q and k across heads, which is what s2q-jax computes; "
          f"set qk_norm to {QK_NORM!r}")
    if self.attention_head_dim % 2:
      raise UnsupportedConfigError(
          f"config: attention_head_dim={self.attention_head_dim} must be even "
          "(3D RoPE rotates pairs of channels)")
    if (self.image_dim is None) != (self.added_kv_proj_dim is None):
      raise UnsupportedConfigError(
          f"config: image_dim={self.image_dim} and added_kv_proj_dim={self.added_kv_proj_dim} "
          "must be set together (image-to-video) or both be null (text-to-video)")
    if self.added_kv_proj_dim is not None and self.added_kv_proj_dim != self.inner_dim:
      raise UnsupportedConfigError(
          f"config: added_kv_proj_dim={self.added_kv_proj_dim} must equal the hidden size "
          f"num_attention_heads·attention_head_dim={self.inner_dim}: the image keys and values "
          "are projected from the image embedder's output, which has that size")
    if self.pos_embed_seq_len is not None and self.image_dim is None:
      raise UnsupportedConfigError(
          f"config: pos_embed_seq_len={self.pos_embed_seq_len} positions image embeddings, "
          "but image_dim is null")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def output_channels(self) -> int:
    return self.out_channels or self.in_channels  # diffusers treats 0 like None

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "WanConfig":
    return cls(**read_fields(cls, d, DIFFUSERS_CLASS_NAME,
                             unknown=f"config fields not supported for {DIFFUSERS_CLASS_NAME}"))

  @classmethod
  def from_diffusers(cls, d: dict[str, Any], origin: str) -> "WanConfig":
    """`from_dict`, warning about missing fields that change the function (as CogVideoX does)."""
    warn_missing_fields(d, origin, cls, defaults="diffusers'",
                        advice="; add the field if the model was trained otherwise",
                        optional=_OPTIONAL_FIELDS, stacklevel=3)
    return cls.from_dict(d)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    return {"_class_name": DIFFUSERS_CLASS_NAME, **d, "patch_size": list(self.patch_size)}
