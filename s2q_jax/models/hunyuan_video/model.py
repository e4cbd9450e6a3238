"""Flax NNX port of diffusers' `HunyuanVideoTransformer3DModel` (text-to-video).

Module attribute names follow diffusers' state-dict names, so a parameter's
NNX path reads like its PyTorch key (`keymap` has the few renames). The
forward is split as for CogVideoX so calibration can run block by block:
`embed` → each of `transformer_blocks`, then each of
`single_transformer_blocks` (same call signature) → `head`.

It implements `models.interface.VideoDiT` as well: its conditions are the
packed arrays of `hunyuan_video.conditions`, and the job's guidance scale is
the embedded one (as `HunyuanVideoPipeline`'s guidance_scale), with no
classifier-free pass, for guidance-distilled checkpoints.
"""
from __future__ import annotations

import re

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2q_jax.models.hunyuan_video import conditions as conditions_lib
from s2q_jax.models.hunyuan_video.blocks import DualStreamBlock, SingleStreamBlock
from s2q_jax.models.hunyuan_video.config import HunyuanVideoConfig
from s2q_jax.models.hunyuan_video.embeddings import (PatchEmbed, TimestepTextEmbedding,
                                                     rotary_pos_embed_3d)
from s2q_jax.models.hunyuan_video.layers import AdaLayerNormContinuous
from s2q_jax.models.hunyuan_video.token_refiner import TokenRefiner
from s2q_jax.models.interface import BlockState
from s2q_jax.models.layers import Linear

# The scheduler HunyuanVideo's pipelines ship (scheduler/scheduler_config.json of
# hunyuanvideo-community/HunyuanVideo): flow-matching Euler with shift 7.
HUNYUAN_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 7.0,
                     "num_train_timesteps": 1000}


class HunyuanVideoTransformer3D(nnx.Module):
  """`model(hidden_states (B,C,F,H,W), timestep (B,), encoder_hidden_states (B,L,D_text),
  encoder_attention_mask (B,L), pooled_projections (B,D_pooled), guidance (B,))` → (B,C,F,H,W).
  """

  def __init__(self, config: HunyuanVideoConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    cfg, d = config, config.inner_dim
    self.x_embedder = PatchEmbed(cfg.in_channels, d, cfg.patch_size, cfg.patch_size_t,
                                 dtype=dtype, rngs=rngs)
    self.context_embedder = TokenRefiner(cfg, dtype=dtype, rngs=rngs)
    self.time_text_embed = TimestepTextEmbedding(d, cfg.pooled_projection_dim,
                                                 guidance=cfg.guidance_embeds, dtype=dtype,
                                                 rngs=rngs)
    self.transformer_blocks = nnx.List(
        [DualStreamBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
    self.single_transformer_blocks = nnx.List(
        [SingleStreamBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_single_layers)])
    self.norm_out = AdaLayerNormContinuous(d, dtype=dtype, rngs=rngs)
    self.proj_out = Linear(
        d, cfg.patch_size_t * cfg.patch_size ** 2 * cfg.output_channels, dtype=dtype, rngs=rngs)
    # As in CogVideoXTransformer3D: layers quantized per timestep range read the (B,)
    # timesteps `embed` writes here.
    self.step_context: nnx.Variable | None = nnx.data(None)

  def rotary_embedding(self, frames: int, height: int, width: int):
    """(cos, sin), each (video tokens, head_dim), for latents of this size (not patches)."""
    cfg = self.config
    cos, sin = rotary_pos_embed_3d(cfg.rope_axes_dim, frames // cfg.patch_size_t,
                                   height // cfg.patch_size, width // cfg.patch_size,
                                   cfg.rope_theta)
    return jnp.asarray(cos), jnp.asarray(sin)

  def embed(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
            pooled_projections, guidance=None):
    """Everything before the blocks: (video tokens, text tokens, temb, attention_mask).

    `attention_mask` (B, 1, 1, N + L) lets every query see all video tokens and
    the first `encoder_attention_mask.sum(1)` text tokens: like diffusers, the
    blocks assume valid text tokens come first (the token refiner alone honours
    the mask token by token).
    """
    b, n_text = encoder_hidden_states.shape[:2]
    timestep = jnp.broadcast_to(jnp.asarray(timestep), (b,))
    if self.step_context is not None:
      self.step_context.set_value(timestep.astype(jnp.float32))
    if guidance is not None:
      guidance = jnp.broadcast_to(jnp.asarray(guidance), (b,))
    temb = self.time_text_embed(timestep, pooled_projections, guidance)
    video = self.x_embedder(hidden_states.astype(self.dtype))
    text_mask = jnp.asarray(encoder_attention_mask).astype(bool)
    text = self.context_embedder(encoder_hidden_states.astype(self.dtype), timestep, text_mask)
    n_valid = text_mask.sum(axis=1, keepdims=True)
    keys = jnp.concatenate([jnp.ones((b, video.shape[1]), bool),
                            jnp.arange(n_text)[None, :] < n_valid], axis=1)
    return video, text, temb, keys[:, None, None, :]

  def head(self, video, temb, out_shape):
    """Final norm, modulation, projection and un-patchify to `out_shape` (B, C, F, H, W)."""
    cfg = self.config
    x = self.proj_out(self.norm_out(video, temb))
    _, _, f, h, w = out_shape
    p, pt = cfg.patch_size, cfg.patch_size_t
    return einops.rearrange(x, "b (f h w) (c pt p q) -> b c (f pt) (h p) (w q)",
                            f=f // pt, h=h // p, w=w // p, pt=pt, p=p, q=p)

  def __call__(self, hidden_states: jax.Array, timestep: jax.Array,
               encoder_hidden_states: jax.Array, encoder_attention_mask: jax.Array,
               pooled_projections: jax.Array, guidance: jax.Array | None = None) -> jax.Array:
    self._check_inputs(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                       pooled_projections, guidance)
    b, _, f, h, w = hidden_states.shape
    rotary = self.rotary_embedding(f, h, w)
    video, text, temb, mask = self.embed(hidden_states, timestep, encoder_hidden_states,
                                         encoder_attention_mask, pooled_projections, guidance)
    for block in self.transformer_blocks:
      video, text = block(video, text, temb, mask, rotary)
    for block in self.single_transformer_blocks:
      video, text = block(video, text, temb, mask, rotary)
    return self.head(video, temb, (b, self.config.output_channels, f, h, w))

  # models.interface.VideoDiT. The job's latents are (B, F, C, H, W); HunyuanVideo's (B, C, F, H, W).
  @staticmethod
  def quant_defaults():
    """(keep_fp, overrides): patch embedding and output projection in bf16.

    Every linear of the dual- and single-stream blocks takes the job's bits.
    What acts on one vector per video (the timestep, pooled-text and guidance
    MLPs, the final modulation) and the token refiner, which reads the prompt
    once per step, get 8-bit weights with float activations, as CogVideoX's
    timestep MLP does.
    """
    return ((r"^x_embedder\.", r"^proj_out$"),
            ((r"^(time_text_embed|context_embedder)\.", "w8afp"),
             (r"^norm_out\.linear$", "w8afp")))

  @property
  def latent_channels(self) -> int:
    return self.config.in_channels

  def condition_shape(self) -> tuple[int, int]:
    return conditions_lib.HUNYUAN_TEXT_TOKENS + 1, conditions_lib.packed_width(self.config)

  def stand_in_conditions(self, rng, n):
    return conditions_lib.stand_in(self.config, rng, n)

  def apply_guidance(self, conditions, null, guidance_scale):
    if not self.config.guidance_embeds:  # a model trained with classifier-free guidance
      return conditions, null, guidance_scale
    embedded = conditions_lib.GUIDANCE_MULTIPLIER * guidance_scale
    return (conditions_lib.with_guidance(conditions, embedded),
            conditions_lib.with_guidance(null, embedded), 1.0)

  def default_scheduler_config(self):
    return dict(HUNYUAN_SCHEDULER)

  def _model_inputs(self, latents, conditions):
    c = conditions_lib.unpack(self.config, conditions)
    guidance = c.guidance if self.config.guidance_embeds else None
    return latents.swapaxes(1, 2), c.text, c.mask, c.pooled, guidance

  def denoise(self, latents, conditions, timesteps):
    x, text, mask, pooled, guidance = self._model_inputs(latents, conditions)
    return self(x, timesteps, text, mask, pooled, guidance).swapaxes(1, 2)

  def latent_tokens(self, latents):
    p, pt = self.config.patch_size, self.config.patch_size_t
    return einops.rearrange(latents, "(f pt) c (h p) (w q) -> (f h w) (c pt p q)",
                            pt=pt, p=p, q=p)

  def embed_blocks(self, latents, conditions, timesteps) -> BlockState:
    x, text, mask, pooled, guidance = self._model_inputs(latents, conditions)
    self._check_inputs(x, timesteps, text, mask, pooled, guidance)
    video, text, temb, keys = self.embed(x, timesteps, text, mask, pooled, guidance)
    return BlockState((text, video), (temb, keys))

  def block_extras(self, frames: int, height: int, width: int):
    return self.rotary_embedding(frames, height, width)

  def calibration_blocks(self):
    return ([(f"transformer_blocks.{i}", b) for i, b in enumerate(self.transformer_blocks)]
            + [(f"single_transformer_blocks.{i}", b)
               for i, b in enumerate(self.single_transformer_blocks)])

  def stream_layout(self, frames: int, condition_tokens: int) -> tuple[int, int]:
    # Text first (its packed condition has one extra row), then the video frame by frame.
    return condition_tokens - 1, frames // self.config.patch_size_t

  def layer_tokens(self, path: str) -> str:
    if path.startswith("single_transformer_blocks."):
      return "stream"  # one set of weights on [text; video]
    # Dual-stream blocks: the text stream has its own norms, projections and MLP.
    return "context" if re.search(r"\.(norm1_context|ff_context|attn\.add_\w+|attn\.to_add_out)\b",
                                  path) else "video"

  def _check_inputs(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                    pooled_projections, guidance):
    cfg = self.config
    if hidden_states.ndim != 5 or hidden_states.shape[1] != cfg.in_channels:
      raise ValueError(f"hidden_states must be (B, {cfg.in_channels}, F, H, W) latents, "
                       f"got shape {hidden_states.shape}")
    b, _, f, h, w = hidden_states.shape
    if f % cfg.patch_size_t or h % cfg.patch_size or w % cfg.patch_size:
      raise ValueError(f"latent frames must be a multiple of patch_size_t={cfg.patch_size_t} and "
                       f"H, W multiples of patch_size={cfg.patch_size}, got F, H, W = {f, h, w}")
    if (encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b
        or encoder_hidden_states.shape[2] != cfg.text_embed_dim):
      raise ValueError(f"encoder_hidden_states must be (B={b}, L, {cfg.text_embed_dim}), "
                       f"got shape {encoder_hidden_states.shape}")
    n_text = encoder_hidden_states.shape[1]
    if np.shape(encoder_attention_mask) != (b, n_text):
      raise ValueError(f"encoder_attention_mask must be (B, L) = {(b, n_text)} like "
                       f"encoder_hidden_states, got shape {np.shape(encoder_attention_mask)}")
    if not isinstance(encoder_attention_mask, jax.core.Tracer):
      empty = np.flatnonzero(~np.asarray(encoder_attention_mask).astype(bool).any(axis=1))
      if empty.size:
        raise ValueError(f"encoder_attention_mask has no valid text token in batch rows "
                         f"{empty.tolist()}; every prompt needs at least one (e.g. BOS)")
    if np.shape(pooled_projections) != (b, cfg.pooled_projection_dim):
      raise ValueError(f"pooled_projections must be (B, pooled_projection_dim) = "
                       f"{(b, cfg.pooled_projection_dim)}, "
                       f"got shape {np.shape(pooled_projections)}")
    for name, value in (("timestep", timestep), ("guidance", guidance)):
      if value is not None and np.shape(value) not in ((), (b,)):
        raise ValueError(f"{name} must be a scalar or (B,) = ({b},), got shape {np.shape(value)}")
    if cfg.guidance_embeds and guidance is None:
      raise ValueError("this model embeds the guidance scale (config guidance_embeds=true): pass "
                       "guidance, e.g. 6000.0 (diffusers' pipeline passes 1000 × guidance_scale)")
    if not cfg.guidance_embeds and guidance is not None:
      raise ValueError("guidance was given but this model has no guidance embedding (config "
                       "guidance_embeds=false): pass guidance=None")
