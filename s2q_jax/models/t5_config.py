"""Configuration of the T5 text encoder, read from a transformers `config.json`.

CogVideoX conditions on T5 v1.1 XXL (`google/t5-v1_1-xxl`, encoder only):
gated-GELU feed-forward, RMS layer norms without bias, one relative position
bias table shared by all layers, untied input embedding. Field names and
defaults are transformers' `T5Config`, so its config.json maps one to one.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from s2q_jax.models.config import UnsupportedConfigError, warn_missing_fields

# transformers' names of the feed-forward activations implemented here.
ACTIVATIONS = ("relu", "gelu", "gelu_new")


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
  """The encoder half of transformers' `T5Config` (defaults are its defaults)."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"

  def __post_init__(self):
    if self.dense_act_fn not in ACTIVATIONS or len(self.feed_forward_proj.split("-")) > 2 or (
        "-" in self.feed_forward_proj and not self.is_gated_act):
      raise UnsupportedConfigError(
          f"config feed_forward_proj={self.feed_forward_proj!r} is not supported: use one of "
          f"{', '.join(ACTIVATIONS)}, optionally prefixed by 'gated-' (T5 v1.1 is 'gated-gelu')")
    small = {k: v for k, v in dataclasses.asdict(self).items()
             if k not in ("layer_norm_epsilon", "feed_forward_proj") and v < 1}
    if small:
      raise UnsupportedConfigError(f"config fields must be positive integers: {small}")
    if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
      # The log-spaced buckets start at num_buckets // 4 (bidirectional): a smaller
      # max_distance divides by log(≤1) and gives meaningless buckets.
      raise UnsupportedConfigError(
          f"config relative_attention_max_distance={self.relative_attention_max_distance} must "
          "exceed relative_attention_num_buckets // 4 = "
          f"{self.relative_attention_num_buckets // 4}")

  @property
  def is_gated_act(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def dense_act_fn(self) -> str:
    # transformers maps "gated-gelu" to the tanh approximation ("gelu_new") that
    # T5 v1.1 was trained with; any other "[gated-]act" names the activation.
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"
    return self.feed_forward_proj.split("-")[-1]

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @classmethod
  def from_dict(cls, d: dict[str, Any], origin: str = "config") -> "T5EncoderConfig":
    """Reads a transformers T5 config, refusing what the encoder here does not compute."""
    model_type = d.get("model_type", "t5")
    if model_type != "t5":
      raise UnsupportedConfigError(
          f"{origin}: model_type {model_type!r} is not supported; s2q-jax implements the T5 "
          "encoder (model_type 't5', e.g. T5 v1.1 as used by CogVideoX)")
    if d.get("is_decoder", False):
      raise UnsupportedConfigError(
          f"{origin}: is_decoder=true describes a T5 decoder; load the text encoder folder "
          "(a T5EncoderModel or T5ForConditionalGeneration checkpoint)")
    warn_missing_fields(d, origin, cls, defaults="transformers'", advice="", stacklevel=3)
    # The rest of a T5 config (dropout, initialisation, decoder and generation
    # settings, dtype) does not change the encoder's inference function.
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})
