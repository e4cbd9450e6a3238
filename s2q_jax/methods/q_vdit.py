"""Q-VDiT: Token-aware Quantization Estimator + Temporal Maintenance Distillation.

Every quantized layer of a block becomes a `TokenAwareLinear` (rank-1 error
branch scaled per frame, see `quant.token_estimator`). The block-wise loop
S²Q-VDiT uses (`methods.blockwise`) trains it with Q-VDiT's recipe:
calibration samples uniformly spaced over the denoising steps, no token
weighting, no smoothing, round-to-nearest codes, and the loss

    L = MSE(y_fp, y_q) + γ Σ_i KL(D_i^fp ‖ D_i^q),   D_i = softmax_j(cos(frame_i, frame_j))

where frame_i is the block's output for the video tokens of latent frame i:
the distillation keeps how much each frame resembles the others.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from s2q_jax.calibration.pool import Pool
from s2q_jax.distillation.block_reconstruction import LossFn, TrainConfig
from s2q_jax.methods.blockwise import BlockRecipe, calibrate_blocks
from s2q_jax.methods.calibration_data import calibration_data, uniform_positions
from s2q_jax.models.interface import VideoDiT
from s2q_jax.quant.apply import quantized_layers, replace_module
from s2q_jax.quant.qlinear import WeightClip
from s2q_jax.quant.token_estimator import FrameScale, LowRankA, LowRankB, TokenAwareLinear


def frame_similarity(y: jax.Array, n_text: int, frames: int) -> jax.Array:
  """(B, F, F) cosine similarities between the frames of a (B, n_text + video, D) output."""
  video = y[:, n_text:].astype(jnp.float32)
  video = video.reshape(video.shape[0], frames, -1)
  video = video / jnp.maximum(jnp.linalg.norm(video, axis=-1, keepdims=True), 1e-12)
  return jnp.einsum("bfd,bgd->bfg", video, video)


def temporal_kl(target: jax.Array, output: jax.Array, n_text: int, frames: int) -> jax.Array:
  """Σ_i KL(D_i^fp ‖ D_i^q), averaged over the batch."""
  log_p = jax.nn.log_softmax(frame_similarity(target, n_text, frames), axis=-1)
  log_q = jax.nn.log_softmax(frame_similarity(output, n_text, frames), axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=(-2, -1)))


@functools.lru_cache(maxsize=8)  # one loss object per setting: blocks share a compiled step
def tmd_loss(gamma: float, n_text: int, frames: int) -> LossFn:
  def loss(target, output, weights):
    del weights  # Q-VDiT weights every token alike
    mse = jnp.mean((output.astype(jnp.float32) - target.astype(jnp.float32)) ** 2)
    return mse + gamma * temporal_kl(target, output, n_text, frames)
  return loss


def recipe(cfg, model: VideoDiT, frames: int, n_lead: int) -> BlockRecipe:
  """Q-VDiT's block recipe: estimator branch + clipping, TMD loss, no smoothing, RTN codes.

  `frames`, `n_lead`: the block stream's layout (`VideoDiT.stream_layout`); each
  layer's frame axis follows what its input holds (`VideoDiT.layer_tokens`).
  """
  leading = {"stream": n_lead, "video": 0, "context": None}  # None: no frames, one group

  def prepare_block(block: nnx.Module, name: str) -> None:
    for path, layer in quantized_layers(block):
      if not isinstance(layer, TokenAwareLinear):
        replace_module(block, path, TokenAwareLinear(
            layer, w_bits=layer.w_bits, a_bits=layer.a_bits, path=f"{name}.{path}", frames=frames,
            n_text=leading[model.layer_tokens(f"{name}.{path}")], seed=cfg.seed))

  lr = cfg.q_vdit.lr_estimator
  return BlockRecipe(
      prepare_block=prepare_block,
      groups={WeightClip: cfg.distill.lr_clip, LowRankA: lr, LowRankB: lr, FrameScale: lr},
      train=TrainConfig(cfg.q_vdit.epochs, cfg.distill.batch_size, seed=cfg.seed),
      loss=lambda n_lead, frames: tmd_loss(cfg.q_vdit.gamma, n_lead, frames),
      token_weighting="uniform", gptq=False)


def calibrate(q_model: nnx.Module, fp_model: nnx.Module, pool: Pool, cfg, workdir: str,
              mesh: jax.sharding.Mesh, log=print) -> dict[str, Any]:
  """Calibration samples uniformly spaced over the steps (with null-prompt twins)."""
  data, selection = calibration_data(pool, uniform_positions(pool, cfg), cfg)
  n_lead, frames = fp_model.stream_layout(pool.latents.shape[1], pool.conditions.shape[1])
  stats = calibrate_blocks(q_model, fp_model, data, recipe(cfg, fp_model, frames, n_lead),
                           workdir, mesh, log)
  return {"num_candidates": len(pool), "selection": selection, **stats}
