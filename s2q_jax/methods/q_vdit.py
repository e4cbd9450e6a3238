"""Q-VDiT: Token-aware Quantization Estimator + Temporal Maintenance Distillation.

Every quantized layer of a block becomes a `TokenAwareLinear` (rank-1 error
branch scaled per frame, see `quant.token_estimator`). The block-wise loop of
S²Q-VDiT (`methods.s2q.calibrate`) trains it with Q-VDiT's recipe instead:
calibration samples uniformly spaced over the denoising steps, no token
weighting, no smoothing, round-to-nearest codes, and the loss

    L = MSE(y_fp, y_q) + γ Σ_i KL(D_i^fp ‖ D_i^q),   D_i = softmax_j(cos(frame_i, frame_j))

where frame_i is the block's output for the video tokens of latent frame i:
the distillation keeps how much each frame resembles the others.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from s2q_jax.calibration.pool import Pool
from s2q_jax.distillation.block_reconstruction import LossFn
from s2q_jax.methods import s2q
from s2q_jax.quant.apply import quantized_layers, replace_module
from s2q_jax.quant.qlinear import WeightClip
from s2q_jax.quant.token_estimator import FrameScale, LowRankA, LowRankB, TokenAwareLinear


def frame_similarity(y: jax.Array, n_text: int, frames: int) -> jax.Array:
  """(B, F, F) cosine similarities between the frames of a joint (B, text + video, D) output."""
  video = y[:, n_text:].astype(jnp.float32)
  video = video.reshape(video.shape[0], frames, -1)
  video = video / jnp.maximum(jnp.linalg.norm(video, axis=-1, keepdims=True), 1e-12)
  return jnp.einsum("bfd,bgd->bfg", video, video)


def temporal_kl(target: jax.Array, output: jax.Array, n_text: int, frames: int) -> jax.Array:
  """Σ_i KL(D_i^fp ‖ D_i^q), averaged over the batch."""
  log_p = jax.nn.log_softmax(frame_similarity(target, n_text, frames), axis=-1)
  log_q = jax.nn.log_softmax(frame_similarity(output, n_text, frames), axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=(-2, -1)))


def tmd_loss(gamma: float, n_text: int, frames: int) -> LossFn:
  def loss(target, output, weights):
    del weights  # Q-VDiT weights every token alike
    mse = jnp.mean((output.astype(jnp.float32) - target.astype(jnp.float32)) ** 2)
    return mse + gamma * temporal_kl(target, output, n_text, frames)
  return loss


def recipe_config(cfg):
  """`cfg` with the parts of the shared block loop set as Q-VDiT does them."""
  cfg = cfg.copy_and_resolve_references()
  cfg.calib.selection = "uniform"
  cfg.distill.token_weighting = "uniform"
  cfg.distill.smoothing = False
  cfg.distill.rotation = False
  cfg.distill.gptq = False
  cfg.distill.epochs = cfg.q_vdit.epochs
  return cfg


def calibrate(q_model: nnx.Module, fp_model: nnx.Module, pool: Pool, cfg, workdir: str,
              mesh: jax.sharding.Mesh, log=print) -> dict[str, Any]:
  frames, n_text = pool.latents.shape[1], pool.conditions.shape[1]

  def prepare_block(block, cfg):
    for path, layer in quantized_layers(block):
      if not isinstance(layer, TokenAwareLinear):
        replace_module(block, path, TokenAwareLinear(
            layer, w_bits=layer.w_bits, a_bits=layer.a_bits, path=layer.path, frames=frames,
            n_text=n_text, seed=cfg.seed))

  def groups(cfg):
    lr = cfg.q_vdit.lr_estimator
    return {WeightClip: cfg.distill.lr_clip, LowRankA: lr, LowRankB: lr, FrameScale: lr}

  return s2q.calibrate(q_model, fp_model, pool, recipe_config(cfg), workdir, mesh, log,
                       prepare_block=prepare_block, groups=groups,
                       loss=lambda cfg, n_text, frames: tmd_loss(cfg.q_vdit.gamma, n_text,
                                                                 frames))
