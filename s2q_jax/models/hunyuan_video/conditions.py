"""HunyuanVideo's per-prompt inputs as the one array per prompt the job carries.

HunyuanVideo reads, per prompt, the text encoder's hidden states (L,
text_embed_dim), their attention mask (L,), the pooled CLIP embedding
(pooled_projection_dim,) and, in guidance-distilled checkpoints
(`guidance_embeds`), the embedded guidance scale. The sampler, the
calibration pool and the methods carry one array per prompt
(`models.interface`), so these travel packed, (L + 1, W) with
W = max(text_embed_dim, pooled_projection_dim) + 1:

  row i < L:  [hidden state i, zeros…, mask i]
  row L:      [pooled embedding, zeros…, guidance]

Packing is exact: the model reads back the same values (the mask as > 0.5).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from s2q_jax.models.hunyuan_video.config import HunyuanVideoConfig

# The prompt length diffusers' HunyuanVideoPipeline gives the transformer (max_sequence_length).
HUNYUAN_TEXT_TOKENS = 256
# The pipeline embeds 1000 × guidance_scale (its default guidance_scale is 6).
GUIDANCE_MULTIPLIER = 1000.0


class Conditions(NamedTuple):
  text: object  # (B, L, text_embed_dim)
  mask: object  # (B, L) boolean
  pooled: object  # (B, pooled_projection_dim)
  guidance: object  # (B,) the embedded guidance (1000 × scale), 0 when unset


def packed_width(config: HunyuanVideoConfig) -> int:
  return max(config.text_embed_dim, config.pooled_projection_dim) + 1


def pack(config: HunyuanVideoConfig, text, mask, pooled, guidance=None) -> np.ndarray:
  """(B, L + 1, W) float32 from (B, L, D_text) text, (B, L) mask, (B, D_pooled) pooled and
  optional (B,) or scalar embedded guidance."""
  text, pooled = np.asarray(text, np.float32), np.asarray(pooled, np.float32)
  b, length, d_text = text.shape
  if d_text != config.text_embed_dim or pooled.shape != (b, config.pooled_projection_dim):
    raise ValueError(f"text must be (B, L, {config.text_embed_dim}) and pooled "
                     f"(B, {config.pooled_projection_dim}), got {text.shape} and {pooled.shape}")
  if np.shape(mask) != (b, length):
    raise ValueError(f"mask must be (B, L) = {(b, length)}, got {np.shape(mask)}")
  out = np.zeros((b, length + 1, packed_width(config)), np.float32)
  out[:, :length, :d_text] = text
  out[:, :length, -1] = np.asarray(mask, bool)
  out[:, length, :pooled.shape[1]] = pooled
  out[:, length, -1] = 0.0 if guidance is None else np.broadcast_to(guidance, (b,))
  return out


def unpack(config: HunyuanVideoConfig, packed) -> Conditions:
  """The model inputs of (B, L + 1, W) packed conditions (numpy or traced arrays)."""
  if packed.ndim != 3 or packed.shape[-1] != packed_width(config) or packed.shape[1] < 2:
    raise ValueError(f"HunyuanVideo conditions must be packed (B, L + 1, "
                     f"{packed_width(config)}) arrays (models.hunyuan_video.conditions.pack), "
                     f"got shape {packed.shape}")
  return Conditions(text=packed[:, :-1, :config.text_embed_dim], mask=packed[:, :-1, -1] > 0.5,
                    pooled=packed[:, -1, :config.pooled_projection_dim],
                    guidance=packed[:, -1, -1])


def with_guidance(packed: np.ndarray, guidance: float) -> np.ndarray:
  """`packed` conditions ((..., L + 1, W)) with their embedded guidance set to `guidance`."""
  out = np.array(packed, np.float32)
  out[..., -1, -1] = guidance
  return out


def stand_in(config: HunyuanVideoConfig, rng: np.random.Generator, n: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """n random prompts and a null prompt, packed, for a transformer without its text encoders.

  Each random prompt keeps a random number of valid tokens (at least half),
  as real prompts padded to the pipeline's length do, so masking is exercised;
  the null prompt is zeros with one valid token (the pipeline's empty prompt
  keeps its BOS token).
  """
  length = HUNYUAN_TEXT_TOKENS
  text = rng.standard_normal((n, length, config.text_embed_dim), np.float32)
  valid = rng.integers(length // 2, length + 1, size=n)
  mask = np.arange(length)[None, :] < valid[:, None]
  pooled = rng.standard_normal((n, config.pooled_projection_dim), np.float32)
  null_mask = np.arange(length)[None, :] < 1
  null = pack(config, np.zeros((1, length, config.text_embed_dim)), null_mask,
              np.zeros((1, config.pooled_projection_dim)))[0]
  return pack(config, text, mask, pooled), null
