"""Configuration of CogVideoX's 3D VAE, read from the `vae/config.json` of a diffusers pipeline."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from s2q_jax.models.config import UnsupportedConfigError, read_fields

VAE_CLASS_NAME = "AutoencoderKLCogVideoX"
UP_BLOCK = "CogVideoXUpBlock3D"
DOWN_BLOCK = "CogVideoXDownBlock3D"
# diffusers' `get_activation` names; the decoder uses `act_fn` inside its resnets.
ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")


@dataclasses.dataclass(frozen=True)
class CogVideoXVAEConfig:
  """diffusers' `AutoencoderKLCogVideoX` arguments; the defaults are CogVideoX's VAE.

  Encoder-only fields (`in_channels`, `down_block_types`, `use_quant_conv`)
  and the latent statistics (`scaling_factor`, `shift_factor`,
  `latents_mean/std`, `invert_scale_latents`) are kept so a config.json
  round-trips; decoding does not use them: the caller undoes the latent
  scaling before `decode`, as the pipeline does.
  """
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = (DOWN_BLOCK,) * 4
  up_block_types: tuple[str, ...] = (UP_BLOCK,) * 4
  block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
  latent_channels: int = 16
  layers_per_block: int = 3
  act_fn: str = "silu"
  # diffusers hands `norm_eps` to the resnets, but spatially conditioned norms (all of the
  # decoder's) fix their GroupNorm eps at 1e-6, so it only matters to the encoder.
  norm_eps: float = 1e-6
  norm_num_groups: int = 32
  temporal_compression_ratio: float = 4
  sample_height: int = 480
  sample_width: int = 720
  scaling_factor: float = 1.15258426
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  force_upcast: bool = True
  use_quant_conv: bool = False
  use_post_quant_conv: bool = False
  invert_scale_latents: bool = False

  def __post_init__(self):
    for name in ("down_block_types", "up_block_types", "block_out_channels", "latents_mean",
                 "latents_std"):
      value = getattr(self, name)
      if isinstance(value, list):  # JSON arrays: frozen and hashable like the defaults
        object.__setattr__(self, name, tuple(value))
    problems = []
    if any(t != UP_BLOCK for t in self.up_block_types):
      problems.append(f"up_block_types={list(self.up_block_types)}: only {UP_BLOCK!r} exists")
    if len(self.up_block_types) != len(self.block_out_channels):
      problems.append(f"{len(self.up_block_types)} up_block_types for "
                      f"{len(self.block_out_channels)} block_out_channels: give one per block")
    if bad := [c for c in self.block_out_channels if c % self.norm_num_groups]:
      problems.append(f"block_out_channels {bad} are not multiples of "
                      f"norm_num_groups={self.norm_num_groups} (GroupNorm needs whole groups)")
    if self.act_fn not in ACTIVATIONS:
      problems.append(f"act_fn={self.act_fn!r}: expected one of {', '.join(ACTIVATIONS)}")
    if self.temporal_compression_levels < 0 or 2 ** self.temporal_compression_levels != \
        self.temporal_compression_ratio:
      problems.append(f"temporal_compression_ratio={self.temporal_compression_ratio}: expected "
                      "a power of two (1, 2, 4, ...)")
    if self.use_post_quant_conv:
      # diffusers builds it with out_channels (3) inputs, so it cannot take latents; no
      # released CogVideoX VAE has one.
      problems.append("use_post_quant_conv=True is not supported (no CogVideoX VAE uses it)")
    if problems:
      raise UnsupportedConfigError("VAE config: " + "; ".join(problems))

  @property
  def temporal_compression_levels(self) -> int:
    """How many up blocks double the frame count (diffusers: int(log2(ratio)))."""
    ratio = self.temporal_compression_ratio
    return int(math.log2(ratio)) if ratio >= 1 else -1

  @property
  def spatial_scale(self) -> int:
    """Pixels per latent along height and width: every up block but the last doubles them."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CogVideoXVAEConfig":
    return cls(**read_fields(cls, d, VAE_CLASS_NAME, unknown="VAE config fields not supported",
                             wrong_class=f", not {VAE_CLASS_NAME!r}: pass the 'vae' sub-folder "
                             "of a CogVideoX pipeline"))

  def to_dict(self) -> dict[str, Any]:
    return {"_class_name": VAE_CLASS_NAME, **dataclasses.asdict(self)}
