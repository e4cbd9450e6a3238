"""The one interface the quantization methods, the sampler and the job see a video DiT through.

Every architecture's transformer (CogVideoX, Wan, ...) implements `VideoDiT`
and its blocks `CalibrationBlock`, next to the model itself, so the methods
never ask which architecture they calibrate. What the methods need:

- sampling: `denoise` on latents in the job's layout (B, F, C, H, W) — each
  model converts to its own — with conditions (B, L, D) and timesteps (B,).
  A condition is one array per prompt, whatever the model reads from it (a
  text embedding; HunyuanVideo packs its mask, pooled embedding and embedded
  guidance in too); `stand_in_conditions` makes random ones where there is no
  text encoder, and `apply_guidance` says how the job's guidance scale acts
  (classifier-free with the null prompt, or embedded in the conditions);
- block-wise calibration: `embed_blocks` gives each input's `BlockState`;
  `calibration_blocks` lists the blocks in order; every block maps the
  state's `stream` (the token groups blocks update) to the next one, reading
  its `context` (per-sample conditioning) and the model's `block_extras`
  (rotary tables); losses see the stream's groups concatenated on the token
  axis, in order;
- token importance: each block's self-attention queries and keys over those
  concatenated tokens, and which keys its mask lets queries see
  (`self_attention_qk`);
- Q-VDiT's frame axis: `stream_layout` says how many leading stream tokens
  are not video and how many latent frames the rest splits into, and
  `layer_tokens` whether a layer's input (by its dotted path in the model)
  is that joint stream, video tokens only, or conditioning tokens only
  (cross-attention keys and values, a text stream's own projections);
- input salience: `latent_tokens`, the patch vectors the patch embedding sees;
- quantization rules: `quant_defaults`, which layers stay in full precision or
  8-bit by default, and why (its docstring).
"""
from __future__ import annotations

from typing import Any, Literal, NamedTuple, Protocol, Sequence

import jax
import numpy as np
from flax import nnx

# How a layer's token axis reads, for per-frame quantities (Q-VDiT's estimator):
# "stream": the block stream's concatenated tokens; "video": video tokens only, frame-major;
# "context": conditioning tokens only (no frames).
LayerTokens = Literal["stream", "video", "context"]


class BlockState(NamedTuple):
  """What calibration carries from block to block for a batch of model inputs."""
  stream: tuple[Any, ...]  # (B, T_i, D) token groups each block updates, in loss order
  context: tuple[Any, ...]  # per-sample arrays every block only reads (conditioning)


class CalibrationBlock(Protocol):
  def calibration_call(self, stream: Sequence[jax.Array], context: Sequence[jax.Array],
                       extras: Any) -> tuple[jax.Array, ...]:
    """The block on one `BlockState`: the next stream, same shapes."""

  def self_attention_qk(self, stream: Sequence[jax.Array], context: Sequence[jax.Array],
                        extras: Any) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(q, k, key_valid) of the block's self-attention over the stream's T tokens.

    q and k are (B, H, T, D); key_valid is (B, T) boolean, the keys the
    attention mask lets queries see (None: all of them).
    """


class VideoDiT(Protocol):
  config: Any

  @property
  def latent_channels(self) -> int: ...

  @staticmethod
  def quant_defaults() -> tuple[Sequence[str], Sequence[tuple[str, str]]]:
    """(keep_fp regexes, (regex, "wXaY") overrides) for `quant.rules_from_config`."""

  def condition_shape(self) -> tuple[int, int]:
    """(L, D) of one prompt's condition when the model folder says nothing else."""

  def stand_in_conditions(self, rng: np.random.Generator, n: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(n random conditions, the null condition), for a model without its text encoder."""

  def apply_guidance(self, conditions: np.ndarray, null: np.ndarray, guidance_scale: float
                     ) -> tuple[np.ndarray, np.ndarray, float]:
    """(conditions, null, classifier-free scale) for the job's `sampler.guidance_scale`."""

  def default_scheduler_config(self) -> dict[str, Any] | None:
    """The scheduler_config.json its pipelines ship, for a folder without one (None: DDIM)."""

  def denoise(self, latents: jax.Array, conditions: jax.Array, timesteps: jax.Array
              ) -> jax.Array:
    """The model output (v or flow velocity) for latents (B, F, C, H, W), in that layout."""

  def latent_tokens(self, latents: np.ndarray) -> np.ndarray:
    """(F, C, H, W) latent → (tokens, patch vector) as the patch embedding reads it."""

  def embed_blocks(self, latents: jax.Array, conditions: jax.Array, timesteps: jax.Array
                   ) -> BlockState:
    """Everything before the first block, for latents (B, F, C, H, W)."""

  def block_extras(self, frames: int, height: int, width: int) -> Any:
    """What every block reads for latents of this size (rotary tables), or None."""

  def calibration_blocks(self) -> list[tuple[str, nnx.Module]]:
    """(dotted path, block) of every block, in the order they run."""

  def stream_layout(self, frames: int, condition_tokens: int) -> tuple[int, int]:
    """(leading non-video tokens of the concatenated stream, latent frames of the rest)."""

  def layer_tokens(self, path: str) -> LayerTokens:
    """How the token axis of the input of the layer at dotted `path` (in the model) reads."""


def check(model: Any) -> VideoDiT:
  """`model`, if it implements `VideoDiT` (a TypeError naming what it lacks otherwise)."""
  missing = [name for name in ("quant_defaults", "latent_channels", "condition_shape",
                               "stand_in_conditions", "apply_guidance",
                               "default_scheduler_config", "denoise", "latent_tokens",
                               "embed_blocks", "block_extras", "calibration_blocks",
                               "stream_layout", "layer_tokens") if not hasattr(model, name)]
  if missing:
    raise TypeError(f"{type(model).__name__} does not implement the VideoDiT interface "
                    f"(missing {', '.join(missing)}): see s2q_jax.models.interface")
  return model


class TextEmbeddingConditions:
  """`VideoDiT`'s conditioning part for models whose condition is a text embedding alone
  (L, D) and that are guided classifier-free by the null prompt (CogVideoX, Wan)."""

  def stand_in_conditions(self, rng: np.random.Generator, n: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    cond = rng.standard_normal((n, *self.condition_shape()), np.float32)
    return cond, np.zeros_like(cond[0])

  def apply_guidance(self, conditions, null, guidance_scale):
    return conditions, null, guidance_scale
