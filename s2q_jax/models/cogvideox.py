"""Flax NNX port of diffusers' `CogVideoXTransformer3DModel` (CogVideoX 1.0).

Module attribute names follow diffusers' state-dict names, so a parameter's
NNX path reads like its PyTorch key (see `conversion.keymap` for the few
renames).
"""
from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from s2q_jax.models import embeddings
from s2q_jax.models.attention import JointAttention
from s2q_jax.models.config import CogVideoXConfig
from s2q_jax.models.interface import BlockState, TextEmbeddingConditions
from s2q_jax.models.layers import LayerNorm, Linear, gelu_tanh


class PatchEmbed(nnx.Module):
  """Text projection + non-overlapping p×p video patches (diffusers' Conv2d as a Linear)."""

  def __init__(self, cfg: CogVideoXConfig, *, dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    p, d = cfg.patch_size, cfg.inner_dim
    self.proj = Linear(cfg.in_channels * p * p, d, dtype=dtype, rngs=rngs)
    self.text_proj = Linear(cfg.text_embed_dim, d, dtype=dtype, rngs=rngs)
    if cfg.use_learned_positional_embeddings:
      self.pos_embedding = nnx.Param(jnp.zeros((1, cfg.max_text_seq_length + self._num_patches(
          cfg.sample_frames, cfg.sample_height, cfg.sample_width), d), dtype))

  def _num_patches(self, pixel_frames: int, height: int, width: int) -> int:
    p = self.cfg.patch_size
    latent_frames = (pixel_frames - 1) // self.cfg.temporal_compression_ratio + 1
    return latent_frames * (height // p) * (width // p)

  def __call__(self, text: jax.Array, video: jax.Array) -> jax.Array:
    cfg = self.cfg
    _, f, _, h, w = video.shape
    p = cfg.patch_size
    patches = einops.rearrange(video, "b f c (h p) (w q) -> b (f h w) (c p q)", p=p, q=p)
    x = jnp.concatenate([self.text_proj(text), self.proj(patches)], axis=1)
    if cfg.use_learned_positional_embeddings:
      if (h, w) != (cfg.sample_height, cfg.sample_width):
        raise ValueError(f"learned positional embeddings only support the trained size "
                         f"{cfg.sample_height}×{cfg.sample_width}, got {h}×{w}")
      return x + self.pos_embedding[...].astype(x.dtype)
    if not cfg.use_rotary_positional_embeddings:
      if text.shape[1] != cfg.max_text_seq_length:
        raise ValueError(f"sincos positional embeddings need text length "
                         f"max_text_seq_length={cfg.max_text_seq_length}, got {text.shape[1]}")
      pos = embeddings.sincos_pos_embed_3d(
          cfg.inner_dim, f, h // p, w // p,
          spatial_interpolation_scale=cfg.spatial_interpolation_scale,
          temporal_interpolation_scale=cfg.temporal_interpolation_scale)
      return x.at[:, text.shape[1]:].add(jnp.asarray(pos, x.dtype))
    return x


class LayerNormZero(nnx.Module):
  """`CogVideoXLayerNormZero`: one shared LayerNorm, separate shift/scale/gate for text and video."""

  def __init__(self, cond_dim: int, dim: int, cfg: CogVideoXConfig, *, dtype, rngs: nnx.Rngs):
    self.linear = Linear(cond_dim, 6 * dim, dtype=dtype, rngs=rngs)
    self.norm = LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_elementwise_affine,
                          dtype=dtype)

  def __call__(self, video, text, temb):
    shift, scale, gate, t_shift, t_scale, t_gate = jnp.split(
        self.linear(jax.nn.silu(temb))[:, None, :], 6, axis=-1)
    video = self.norm(video) * (1 + scale) + shift
    text = self.norm(text) * (1 + t_scale) + t_shift
    return video, text, gate, t_gate


class FeedForward(nnx.Module):
  def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
    self.proj_in = Linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
    self.proj_out = Linear(4 * dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.proj_out(gelu_tanh(self.proj_in(x)))


class CogVideoXBlock(nnx.Module):
  def __init__(self, cfg: CogVideoXConfig, *, dtype, rngs: nnx.Rngs):
    d = cfg.inner_dim
    self.norm1 = LayerNormZero(cfg.time_embed_dim, d, cfg, dtype=dtype, rngs=rngs)
    self.attn1 = JointAttention(d, cfg.num_attention_heads, cfg.attention_head_dim,
                                qkv_bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
    self.norm2 = LayerNormZero(cfg.time_embed_dim, d, cfg, dtype=dtype, rngs=rngs)
    self.ff = FeedForward(d, dtype=dtype, rngs=rngs)

  def __call__(self, video, text, temb, rotary=None):
    """(B, N, D) video and (B, L, D) text tokens → updated (video, text)."""
    text_len = text.shape[1]
    n_video, n_text, gate, t_gate = self.norm1(video, text, temb)
    attn = self.attn1(jnp.concatenate([n_text, n_video], axis=1), text_len, rotary)
    video = video + gate * attn[:, text_len:]
    text = text + t_gate * attn[:, :text_len]
    n_video, n_text, gate, t_gate = self.norm2(video, text, temb)
    ff = self.ff(jnp.concatenate([n_text, n_video], axis=1))
    return video + gate * ff[:, text_len:], text + t_gate * ff[:, :text_len]

  # models.interface.CalibrationBlock: the stream is (text, video), the context (temb,).
  def calibration_call(self, stream, context, extras):
    text, video = stream
    video, text = self(video, text, context[0], extras)
    return text, video

  def self_attention_qk(self, stream, context, extras):
    text, video = stream
    n_v, n_t, _, _ = self.norm1(video, text, context[0])
    q, k, _ = self.attn1.project(jnp.concatenate([n_t, n_v], axis=1), text.shape[1], extras)
    return q, k, None  # every key is visible


class TimestepEmbedding(nnx.Module):
  def __init__(self, in_dim: int, out_dim: int, *, dtype, rngs: nnx.Rngs):
    self.linear_1 = Linear(in_dim, out_dim, dtype=dtype, rngs=rngs)
    self.linear_2 = Linear(out_dim, out_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class AdaLayerNormOut(nnx.Module):
  """diffusers' `AdaLayerNorm(chunk_dim=1)` before the output projection."""

  def __init__(self, cond_dim: int, dim: int, cfg: CogVideoXConfig, *, dtype, rngs: nnx.Rngs):
    self.linear = Linear(cond_dim, 2 * dim, dtype=dtype, rngs=rngs)
    self.norm = LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_elementwise_affine,
                          dtype=dtype)

  def __call__(self, x, temb):
    shift, scale = jnp.split(self.linear(jax.nn.silu(temb))[:, None, :], 2, axis=-1)
    return self.norm(x) * (1 + scale) + shift


class CogVideoXTransformer3D(nnx.Module, TextEmbeddingConditions):
  """`model(hidden_states (B,F,C,H,W), encoder_hidden_states (B,L,D_text), timestep (B,))`."""

  def __init__(self, config: CogVideoXConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    d = config.inner_dim
    self.patch_embed = PatchEmbed(config, dtype=dtype, rngs=rngs)
    self.time_embedding = TimestepEmbedding(d, config.time_embed_dim, dtype=dtype, rngs=rngs)
    self.transformer_blocks = nnx.List(
        [CogVideoXBlock(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])
    self.norm_final = LayerNorm(d, eps=config.norm_eps,
                                elementwise_affine=config.norm_elementwise_affine, dtype=dtype)
    self.norm_out = AdaLayerNormOut(config.time_embed_dim, d, config, dtype=dtype, rngs=rngs)
    p = config.patch_size
    self.proj_out = Linear(d, p * p * config.output_channels, dtype=dtype, rngs=rngs)
    # Layers whose quantization depends on the denoising step (ViDiT-Q's per-timestep-range
    # smoothing) share this Variable; `embed` writes each call's (B,) timesteps into it.
    self.step_context: nnx.Variable | None = nnx.data(None)

  def rotary_embedding(self, frames: int, height: int, width: int):
    """The (cos, sin) diffusers' CogVideoX pipeline passes for latents of this size, or None."""
    cfg = self.config
    if not cfg.use_rotary_positional_embeddings:
      return None
    p = cfg.patch_size
    cos, sin = embeddings.rotary_pos_embed_3d(
        cfg.attention_head_dim, frames, height // p, width // p,
        base_h=cfg.sample_height // p, base_w=cfg.sample_width // p)
    return jnp.asarray(cos), jnp.asarray(sin)

  def embed(self, hidden_states, encoder_hidden_states, timestep):
    """Everything before the blocks: (video tokens, text tokens, conditioning embedding)."""
    cfg = self.config
    timestep = jnp.broadcast_to(jnp.asarray(timestep), hidden_states.shape[:1])
    if self.step_context is not None:
      self.step_context.set_value(timestep.astype(jnp.float32))
    temb = embeddings.timestep_embedding(timestep, cfg.inner_dim,
                                         flip_sin_to_cos=cfg.flip_sin_to_cos,
                                         freq_shift=cfg.freq_shift)
    temb = self.time_embedding(temb.astype(self.dtype))
    x = self.patch_embed(encoder_hidden_states.astype(self.dtype), hidden_states.astype(self.dtype))
    text_len = encoder_hidden_states.shape[1]
    return x[:, text_len:], x[:, :text_len], temb

  def head(self, video, temb, out_shape):
    """Final norm, modulation, projection and un-patchify to `out_shape` (B, F, C, H, W)."""
    x = self.proj_out(self.norm_out(self.norm_final(video), temb))
    b, f, _, h, w = out_shape
    p = self.config.patch_size
    return einops.rearrange(x, "b (f h w) (c p q) -> b f c (h p) (w q)",
                            f=f, h=h // p, w=w // p, p=p, q=p)

  def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array,
               timestep: jax.Array, image_rotary_emb=None) -> jax.Array:
    self._check_inputs(hidden_states, encoder_hidden_states)
    b, f, _, h, w = hidden_states.shape
    if image_rotary_emb is None:
      image_rotary_emb = self.rotary_embedding(f, h, w)
    video, text, temb = self.embed(hidden_states, encoder_hidden_states, timestep)
    for block in self.transformer_blocks:
      video, text = block(video, text, temb, image_rotary_emb)
    return self.head(video, temb, (b, f, self.config.output_channels, h, w))

  # models.interface.VideoDiT. The job's latent layout (B, F, C, H, W) is CogVideoX's own.
  @staticmethod
  def quant_defaults():
    """(keep_fp, overrides): the patch/text embedding in and the projection out stay in bf16.

    The timestep MLP and the final adaLN modulation act on one vector per video,
    so their 8-bit weights cost no accuracy that shows (activations stay in
    float), and they halve what the full-precision part weighs: on the embedded
    model that is the difference between 3.42× and 3.5× smaller than bf16.
    """
    return ((r"^patch_embed\.", r"^ofs_embedding\.", r"^proj_out$"),
            ((r"^time_embedding\.", "w8afp"), (r"^norm_out\.linear$", "w8afp")))

  @property
  def latent_channels(self) -> int:
    return self.config.in_channels

  def condition_shape(self) -> tuple[int, int]:
    return self.config.max_text_seq_length, self.config.text_embed_dim

  def default_scheduler_config(self):
    return None  # the sampler's default: CogVideoX-2B's DDIM

  def denoise(self, latents, conditions, timesteps):
    return self(latents, conditions, timesteps)

  def latent_tokens(self, latents):
    p = self.config.patch_size
    return einops.rearrange(latents, "f c (h p) (w q) -> (f h w) (c p q)", p=p, q=p)

  def embed_blocks(self, latents, conditions, timesteps) -> BlockState:
    video, text, temb = self.embed(latents, conditions, timesteps)
    return BlockState((text, video), (temb,))

  def block_extras(self, frames: int, height: int, width: int):
    return self.rotary_embedding(frames, height, width)

  def calibration_blocks(self):
    return [(f"transformer_blocks.{i}", b) for i, b in enumerate(self.transformer_blocks)]

  def stream_layout(self, frames: int, condition_tokens: int) -> tuple[int, int]:
    return condition_tokens, frames  # text first, then the video tokens frame by frame

  def layer_tokens(self, path: str) -> str:
    del path  # every token-wise layer of a block reads the joint [text; video] sequence
    return "stream"

  def _check_inputs(self, hidden_states, encoder_hidden_states):
    cfg = self.config
    if hidden_states.ndim != 5 or hidden_states.shape[2] != cfg.in_channels:
      raise ValueError(f"hidden_states must be (B, F, {cfg.in_channels}, H, W), "
                       f"got {hidden_states.shape}")
    if hidden_states.shape[3] % cfg.patch_size or hidden_states.shape[4] % cfg.patch_size:
      raise ValueError(f"H and W must be multiples of patch_size={cfg.patch_size}, "
                       f"got {hidden_states.shape[3:]}")
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.text_embed_dim:
      raise ValueError(f"encoder_hidden_states must be (B, L, {cfg.text_embed_dim}), "
                       f"got {encoder_hidden_states.shape}")
