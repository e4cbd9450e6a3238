"""Flax NNX port of diffusers' `WanTransformer3DModel` (Wan 2.1).

Module attribute names follow diffusers' state-dict names, so a parameter's
NNX path reads like its PyTorch key; `wan.keymap` holds the few renames
(diffusers' `to_out.0`, `ffn.net.0.proj`, `ffn.net.2` list wrappers become
`to_out`, `ffn.proj_in`, `ffn.proj_out`, as in the CogVideoX model).

Like diffusers, the residual stream, the adaLN modulation and every norm run
in float32 whatever the model dtype; the linears run in the model dtype.
"""
from __future__ import annotations

import re

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from s2q_jax.models import embeddings
from s2q_jax.models.interface import BlockState, TextEmbeddingConditions
from s2q_jax.models.layers import LayerNorm, Linear, gelu_tanh
from s2q_jax.models.wan.attention import Rotary, WanAttention, rotary_table
from s2q_jax.models.wan.config import WanConfig

# Wan's image-to-video pipeline pads every prompt to this many text tokens, and diffusers
# finds the image tokens in its concatenated [image; text] context by that length.
I2V_TEXT_TOKENS = 512
# Text tokens of Wan's UMT5 prompt embedding (the pipelines' max_sequence_length).
WAN_TEXT_TOKENS = 512
# The scheduler Wan 2.1's text-to-video pipelines ship (scheduler/scheduler_config.json of
# Wan2.1-T2V-1.3B-Diffusers): UniPC on flow-matching sigmas with shift 3 (5 for 720p).
WAN_T2V_SCHEDULER = {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                     "use_flow_sigmas": True, "flow_shift": 3.0, "solver_order": 2,
                     "num_train_timesteps": 1000}


class FeedForward(nnx.Module):
  def __init__(self, dim: int, hidden: int, out: int, *, approximate: bool, dtype,
               rngs: nnx.Rngs):
    self.approximate = approximate
    self.proj_in = Linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.proj_out = Linear(hidden, out, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj_out(jax.nn.gelu(self.proj_in(x), approximate=self.approximate))


class MLP(nnx.Module):
  """Two linears around an activation (diffusers' `TimestepEmbedding`, `PixArtAlphaTextProjection`)."""

  def __init__(self, dim: int, out: int, activation, *, dtype, rngs: nnx.Rngs):
    self.activation = activation
    self.linear_1 = Linear(dim, out, dtype=dtype, rngs=rngs)
    self.linear_2 = Linear(out, out, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(self.activation(self.linear_1(x)))


class ImageEmbedding(nnx.Module):
  """`WanImageEmbedding`: CLIP image tokens → hidden size (image-to-video models only)."""

  def __init__(self, dim: int, out: int, pos_embed_seq_len: int | None, *, dtype,
               rngs: nnx.Rngs):
    self.norm1 = LayerNorm(dim, dtype=dtype)
    self.ff = FeedForward(dim, dim, out, approximate=False, dtype=dtype, rngs=rngs)
    self.norm2 = LayerNorm(out, dtype=dtype)
    self.pos_embed = (nnx.Param(jnp.zeros((1, pos_embed_seq_len, dim), dtype))
                      if pos_embed_seq_len is not None else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pos_embed is not None:
      # First-last-frame models: the two frames' tokens of each video sit in consecutive
      # batch rows and are joined into one sequence before the learned positions.
      x = x.reshape(-1, 2 * x.shape[1], x.shape[2]) + self.pos_embed[...].astype(x.dtype)
    return self.norm2(self.ff(self.norm1(x)))


class ConditionEmbedder(nnx.Module):
  """`WanTimeTextImageEmbedding`: timestep, text and (optionally) image conditioning."""

  def __init__(self, cfg: WanConfig, *, dtype, rngs: nnx.Rngs):
    d = cfg.inner_dim
    self.freq_dim = cfg.freq_dim
    self.time_embedder = MLP(cfg.freq_dim, d, jax.nn.silu, dtype=dtype, rngs=rngs)
    self.time_proj = Linear(d, 6 * d, dtype=dtype, rngs=rngs)
    self.text_embedder = MLP(cfg.text_dim, d, gelu_tanh, dtype=dtype, rngs=rngs)
    self.image_embedder = (ImageEmbedding(cfg.image_dim, d, cfg.pos_embed_seq_len, dtype=dtype,
                                          rngs=rngs) if cfg.image_dim is not None else None)

  def __call__(self, timestep: jax.Array, text: jax.Array, image: jax.Array | None, dtype):
    """(temb (B, D), timestep_proj (B, 6, D), text (B, L, D), image (B, L_img, D) or None)."""
    sinusoid = embeddings.timestep_embedding(timestep, self.freq_dim, flip_sin_to_cos=True,
                                             freq_shift=0)
    temb = self.time_embedder(sinusoid.astype(dtype))
    timestep_proj = self.time_proj(jax.nn.silu(temb))
    timestep_proj = timestep_proj.reshape(timestep_proj.shape[0], 6, -1)
    image = self.image_embedder(image) if image is not None else None
    return temb, timestep_proj, self.text_embedder(text), image


class WanBlock(nnx.Module):
  """`WanTransformerBlock`: modulated self-attention, cross-attention, modulated FFN."""

  def __init__(self, cfg: WanConfig, *, dtype, rngs: nnx.Rngs):
    d = cfg.inner_dim
    self.norm1 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False, dtype=dtype)
    self.attn1 = WanAttention(d, cfg.num_attention_heads, eps=cfg.eps, dtype=dtype, rngs=rngs)
    self.attn2 = WanAttention(d, cfg.num_attention_heads, eps=cfg.eps,
                              added_kv_dim=cfg.added_kv_proj_dim, dtype=dtype, rngs=rngs)
    self.norm2 = (LayerNorm(d, eps=cfg.eps, dtype=dtype) if cfg.cross_attn_norm else None)
    self.ffn = FeedForward(d, cfg.ffn_dim, d, approximate=True, dtype=dtype, rngs=rngs)
    self.norm3 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False, dtype=dtype)
    self.scale_shift_table = nnx.Param(jnp.zeros((1, 6, d), dtype))

  def __call__(self, x: jax.Array, context: jax.Array, timestep_proj: jax.Array,
               rotary: Rotary, image_context: jax.Array | None = None) -> jax.Array:
    """(B, N, D) video tokens → updated tokens.

    context: (B, L, D) embedded text; timestep_proj: (B, 6, D), the
    per-sample modulation before this block's `scale_shift_table` is added;
    image_context: (B, L_img, D) embedded image tokens (image-to-video only).
    """
    mod = self.scale_shift_table[...].astype(jnp.float32) + timestep_proj.astype(jnp.float32)
    shift, scale, gate, c_shift, c_scale, c_gate = jnp.split(mod, 6, axis=1)  # (B, 1, D) each
    dtype = x.dtype
    h = (self.norm1(x.astype(jnp.float32)) * (1 + scale) + shift).astype(dtype)
    x = (x.astype(jnp.float32) + self.attn1(h, rotary=rotary) * gate).astype(dtype)
    h = self.norm2(x.astype(jnp.float32)).astype(dtype) if self.norm2 is not None else x
    x = x + self.attn2(h, context, image_context=image_context)
    h = (self.norm3(x.astype(jnp.float32)) * (1 + c_scale) + c_shift).astype(dtype)
    return (x.astype(jnp.float32) + self.ffn(h).astype(jnp.float32) * c_gate).astype(dtype)

  # models.interface.CalibrationBlock: the stream is (video,), the context (text, timestep_proj).
  def calibration_call(self, stream, context, extras):
    return (self(stream[0], context[0], context[1], extras),)

  def self_attention_qk(self, stream, context, extras):
    x, timestep_proj = stream[0], context[1]
    mod = self.scale_shift_table[...].astype(jnp.float32) + timestep_proj.astype(jnp.float32)
    shift, scale = mod[:, 0:1], mod[:, 1:2]
    h = (self.norm1(x.astype(jnp.float32)) * (1 + scale) + shift).astype(x.dtype)
    q, k, _ = self.attn1.project(h, rotary=extras)
    return q, k, None  # every key is visible


class WanTransformer3D(nnx.Module, TextEmbeddingConditions):
  """`model(hidden_states (B,C,F,H,W), timestep (B,), encoder_hidden_states (B,L,text_dim))`.

  Returns the sample (B, C_out, F, H, W), as diffusers' forward does. The
  stages are callable one by one for block-wise calibration: `embed`, then
  each of `blocks` with `rotary_embedding`'s table, then `head`.
  """

  def __init__(self, config: WanConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    d = config.inner_dim
    pt, ph, pw = config.patch_size
    # diffusers' Conv3d with stride = kernel = patch: a Linear on (c, pt, ph, pw) patches.
    self.patch_embedding = Linear(config.in_channels * pt * ph * pw, d, dtype=dtype, rngs=rngs)
    self.condition_embedder = ConditionEmbedder(config, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([WanBlock(config, dtype=dtype, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.norm_out = LayerNorm(d, eps=config.eps, elementwise_affine=False, dtype=dtype)
    self.proj_out = Linear(d, config.output_channels * pt * ph * pw, dtype=dtype, rngs=rngs)
    self.scale_shift_table = nnx.Param(jnp.zeros((1, 2, d), dtype))
    # Layers whose quantization depends on the denoising step (ViDiT-Q's per-timestep-range
    # smoothing) share this Variable; `embed` writes each call's (B,) timesteps into it.
    self.step_context: nnx.Variable | None = nnx.data(None)

  def rotary_embedding(self, frames: int, height: int, width: int) -> Rotary:
    """The (cos, sin) table, each (tokens, attention_head_dim), for latents of this size."""
    pt, ph, pw = self.config.patch_size
    return rotary_table(self.config.attention_head_dim, (frames // pt, height // ph, width // pw),
                        self.config.rope_max_seq_len)

  def embed(self, hidden_states: jax.Array, timestep: jax.Array,
            encoder_hidden_states: jax.Array, encoder_hidden_states_image: jax.Array | None = None):
    """Everything before the blocks.

    Returns (tokens (B, N, D), context (B, L, D), image_context (B, L_img, D)
    or None, timestep_proj (B, 6, D), temb (B, D)); tokens are in (f, h, w)
    patch order, so frame i holds tokens [i·h·w, (i+1)·h·w).
    """
    timestep = jnp.broadcast_to(jnp.asarray(timestep), hidden_states.shape[:1])
    if self.step_context is not None:
      self.step_context.set_value(timestep.astype(jnp.float32))
    pt, ph, pw = self.config.patch_size
    patches = einops.rearrange(hidden_states.astype(self.dtype),
                               "b c (f p) (h q) (w r) -> b (f h w) (c p q r)", p=pt, q=ph, r=pw)
    image = (encoder_hidden_states_image.astype(self.dtype)
             if encoder_hidden_states_image is not None else None)
    temb, timestep_proj, context, image_context = self.condition_embedder(
        timestep, encoder_hidden_states.astype(self.dtype), image, self.dtype)
    return self.patch_embedding(patches), context, image_context, timestep_proj, temb

  def head(self, x: jax.Array, temb: jax.Array, out_shape: tuple[int, ...]) -> jax.Array:
    """Final modulated norm, projection and un-patchify to `out_shape` (B, C_out, F, H, W)."""
    shift, scale = jnp.split(self.scale_shift_table[...].astype(jnp.float32)
                             + temb.astype(jnp.float32)[:, None], 2, axis=1)
    x = self.proj_out((self.norm_out(x.astype(jnp.float32)) * (1 + scale) + shift).astype(x.dtype))
    _, _, f, h, w = out_shape
    pt, ph, pw = self.config.patch_size
    return einops.rearrange(x, "b (f h w) (p q r c) -> b c (f p) (h q) (w r)",
                            f=f // pt, h=h // ph, w=w // pw, p=pt, q=ph, r=pw)

  def __call__(self, hidden_states: jax.Array, timestep: jax.Array,
               encoder_hidden_states: jax.Array,
               encoder_hidden_states_image: jax.Array | None = None) -> jax.Array:
    self._check_inputs(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image)
    b, _, f, h, w = hidden_states.shape
    rotary = self.rotary_embedding(f, h, w)
    x, context, image_context, timestep_proj, temb = self.embed(
        hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image)
    for block in self.blocks:
      x = block(x, context, timestep_proj, rotary, image_context)
    return self.head(x, temb, (b, self.config.output_channels, f, h, w))

  # models.interface.VideoDiT. The job's latents are (B, F, C, H, W); Wan's (B, C, F, H, W).
  @staticmethod
  def quant_defaults():
    """(keep_fp, overrides): patch embedding, output projection and image embedder in bf16.

    Every linear of the blocks (self- and cross-attention, FFN) takes the job's
    bits. The condition embedder's timestep MLP and projection act on one vector
    per video and its text MLP on the prompt (the same at every step): 8-bit
    weights with float activations, as CogVideoX's timestep MLP.
    """
    return ((r"^patch_embedding$", r"^proj_out$", r"^condition_embedder\.image_embedder\."),
            ((r"^condition_embedder\.(time_embedder|time_proj|text_embedder)\b", "w8afp"),))

  @property
  def latent_channels(self) -> int:
    return self.config.in_channels

  def condition_shape(self) -> tuple[int, int]:
    return WAN_TEXT_TOKENS, self.config.text_dim

  def default_scheduler_config(self):
    return dict(WAN_T2V_SCHEDULER)

  def denoise(self, latents, conditions, timesteps):
    return self(latents.swapaxes(1, 2), timesteps, conditions).swapaxes(1, 2)

  def latent_tokens(self, latents):
    pt, ph, pw = self.config.patch_size
    return einops.rearrange(latents, "(f p) c (h q) (w r) -> (f h w) (c p q r)",
                            p=pt, q=ph, r=pw)

  def embed_blocks(self, latents, conditions, timesteps) -> BlockState:
    self._check_inputs(latents.swapaxes(1, 2), timesteps, conditions, None)
    x, context, _, timestep_proj, _ = self.embed(latents.swapaxes(1, 2), timesteps, conditions)
    return BlockState((x,), (context, timestep_proj))

  def block_extras(self, frames: int, height: int, width: int):
    return self.rotary_embedding(frames, height, width)

  def calibration_blocks(self):
    return [(f"blocks.{i}", b) for i, b in enumerate(self.blocks)]

  def stream_layout(self, frames: int, condition_tokens: int) -> tuple[int, int]:
    del condition_tokens  # text enters by cross-attention, never the stream
    return 0, frames // self.config.patch_size[0]

  def layer_tokens(self, path: str) -> str:
    # Cross-attention keys and values read the text (or image) tokens, not the video.
    return "context" if re.search(r"attn2\.(to_k|to_v|add_k_proj|add_v_proj)$", path) else "video"

  def _check_inputs(self, hidden_states, timestep, encoder_hidden_states, image) -> None:
    cfg = self.config
    if hidden_states.ndim != 5 or hidden_states.shape[1] != cfg.in_channels:
      raise ValueError(f"hidden_states must be (B, {cfg.in_channels}, F, H, W), "
                       f"got {hidden_states.shape}")
    if any(n % p for n, p in zip(hidden_states.shape[2:], cfg.patch_size)):
      raise ValueError(f"F, H and W must be multiples of patch_size={cfg.patch_size}, "
                       f"got {hidden_states.shape[2:]}")
    b = hidden_states.shape[0]
    if jnp.ndim(timestep) > 1 or jnp.size(timestep) not in (1, b):
      raise ValueError(f"timestep must be a scalar or ({b},), got shape {jnp.shape(timestep)}"
                       + ("; per-token timesteps (Wan 2.2 TI2V) are not supported"
                          if jnp.ndim(timestep) > 1 else ""))
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[::2] != (b, cfg.text_dim):
      raise ValueError(f"encoder_hidden_states must be ({b}, L, {cfg.text_dim}), "
                       f"got {encoder_hidden_states.shape}")
    if image is None:
      return
    if cfg.image_dim is None:
      raise ValueError("encoder_hidden_states_image given, but this is a text-to-video model "
                       "(its config has no image_dim)")
    # First-last-frame models (pos_embed_seq_len set) take both frames' tokens as two rows.
    rows, length = (2 * b, f"{cfg.pos_embed_seq_len // 2}") if cfg.pos_embed_seq_len else (b, "L_img")
    if (image.ndim != 3 or image.shape[0] != rows or image.shape[-1] != cfg.image_dim
        or (cfg.pos_embed_seq_len and 2 * image.shape[1] != cfg.pos_embed_seq_len)):
      raise ValueError(f"encoder_hidden_states_image must be ({rows}, {length}, {cfg.image_dim}), "
                       f"got {image.shape}")
    if encoder_hidden_states.shape[1] != I2V_TEXT_TOKENS:
      raise ValueError(f"image-to-video needs encoder_hidden_states padded to {I2V_TEXT_TOKENS} "
                       f"text tokens (as Wan's pipeline does), got {encoder_hidden_states.shape[1]}")
