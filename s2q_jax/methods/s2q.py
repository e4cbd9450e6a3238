"""S²Q-VDiT calibration: salient data selection, then attention-weighted block reconstruction.

Given the full-precision model and its quantized copy (`QuantLinear` layers,
not yet frozen), this picks the calibration samples and calibrates the
blocks one by one, freezing each block's integer codes (GPTQ on the learned
scales) before moving on. State is checkpointed after every block, and a
rerun with the same workdir resumes at the next one.
"""
from __future__ import annotations

import os
import resource
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from s2q_jax.calibration import diffusion_salience, quant_salience, salient_scores, select_indices
from s2q_jax.calibration.capture import recording
from s2q_jax.calibration.gptq import accumulate_hessian, gptq_quantize
from s2q_jax.calibration.pool import Pool
from s2q_jax.distillation import attention_token_importance, token_weights
from s2q_jax.distillation.block_reconstruction import (BlockData, LossFn, NonFiniteLoss,
                                                       TrainConfig, train_block)
from s2q_jax.errors import UserError
from s2q_jax.calibration.rotation import hadamard_matrix
from s2q_jax.quant import QuantLinear, Rotation, SmoothScale
from s2q_jax.quant.apply import quantized_layers
from s2q_jax.quant.qlinear import Codes, QuantParam


def score_pool(model: nnx.Module, pool: Pool, variant: str) -> np.ndarray:
  """C = C̄_diff · C̄_quant for every candidate; `variant` input | layer (see DESIGN §4)."""
  c_diff = np.asarray(diffusion_salience(jnp.asarray(pool.latents), jnp.asarray(pool.previous)))
  c_quant = np.empty(len(pool))
  p = model.config.patch_size
  for i in range(len(pool)):
    if variant == "input":  # the paper's ‖x_tᵀx_t‖₂ over the latent's patch tokens
      x = pool.latents[i]
      f, c, h, w = x.shape
      tokens = x.reshape(f, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
      c_quant[i] = float(quant_salience(jnp.asarray(tokens.reshape(-1, c * p * p))))
    else:  # sum over quantized layers of the top eigenvalue of each layer's inputs
      paths = {path for path, _ in quantized_layers(model)}
      with recording(model, paths) as collect:
        model(pool.latents[i:i + 1], pool.conditions[i:i + 1], pool.timesteps[i:i + 1])
        inputs = collect()
      c_quant[i] = sum(float(quant_salience(x)) for xs in inputs.values() for x in xs)
  return salient_scores(c_diff, c_quant)


@nnx.jit
def _apply_block(block, video, text, temb, rotary):
  return block(video, text, temb, rotary)


@nnx.jit
def _embed(model, latents, conditions, timesteps):
  return model.embed(latents, conditions, timesteps)


def _batched(fn: Callable, arrays: tuple, batch: int = 8):
  outs = [fn(*(a[i:i + batch] for a in arrays)) for i in range(0, len(arrays[0]), batch)]
  return tuple(np.concatenate([np.asarray(o[k]) for o in outs]) for k in range(len(outs[0])))


@nnx.jit
def _block_importance(block, video, text, temb, rotary):
  n_v, n_t, _, _ = block.norm1(video, text, temb)
  q, k, _ = block.attn1.project(jnp.concatenate([n_t, n_v], axis=1), text.shape[1], rotary)
  return (attention_token_importance(q, k, block_size=256),)


def _importance(block, video, text, temb, rotary) -> np.ndarray:
  return _batched(lambda v, t, e: _block_importance(block, v, t, e, rotary),
                  (video, text, temb))[0]


def _init_smoothing(layers: list[tuple[str, QuantLinear]], inputs: dict, alpha: float) -> None:
  """SmoothQuant: s_j = max|X_j|^α / max|W_j|^(1−α), clamped to [1e-2, 1e2]."""
  for path, layer in layers:
    x_max = jnp.max(jnp.stack([jnp.abs(x).reshape(-1, x.shape[-1]).max(0)
                               for x in inputs[path]]), axis=0)
    w_max = jnp.abs(layer.kernel[...].astype(jnp.float32)).max(axis=1)
    s = jnp.clip(x_max ** alpha / jnp.maximum(w_max, 1e-8) ** (1 - alpha), 1e-2, 1e2)
    layer.smooth = SmoothScale(s)


def _add_transforms(layer: QuantLinear, cfg) -> None:
  """Placeholder smoothing (set properly from data) and the fixed Hadamard rotation, if enabled."""
  if cfg.distill.smoothing and layer.smooth is None:
    layer.smooth = SmoothScale(jnp.ones((layer.in_features,)))
  if cfg.distill.rotation and layer.rotation is None:
    layer.rotation = Rotation(hadamard_matrix(layer.in_features))


def _freeze_block(layers, inputs: dict, use_gptq: bool) -> None:
  for path, layer in layers:
    if not use_gptq:
      layer.freeze()
      continue
    h = None
    for x in inputs[path]:
      h = accumulate_hessian(h, x)
    layer.freeze(gptq_quantize(layer.effective_kernel(), h, layer.weight_scales(),
                               bits=layer.w_bits))


def _check_finite(block_index: int, layers) -> None:
  for path, layer in layers:
    for name in ("clip", "smooth"):
      value = getattr(layer, name)
      if value is not None and not bool(jnp.all(jnp.isfinite(value[...]))):
        raise UserError(f"calibration diverged in block {block_index}: layer {path} has "
                        f"non-finite {name}; lower distill.lr_clip / distill.lr_smooth")


def _prepare_s2q_block(block: nnx.Module, cfg) -> None:
  for _, layer in quantized_layers(block):
    _add_transforms(layer, cfg)


def calibrate(q_model: nnx.Module, fp_model: nnx.Module, pool: Pool, cfg, workdir: str,
              mesh: jax.sharding.Mesh, log=print, *,
              prepare_block: Callable[[nnx.Module, Any], None] = _prepare_s2q_block,
              groups: Callable[[Any], dict] | None = None,
              loss: Callable[[Any, int, int], LossFn] | None = None) -> dict[str, Any]:
  """Calibrates q_model in place; returns per-block statistics for the report.

  The keyword hooks let another block-wise method reuse this loop (selection,
  resume, reconstruction, freezing): `prepare_block(block, cfg)` adds the
  method's state to a block's layers (and must be idempotent: resuming calls it
  for finished blocks too), `groups(cfg)` maps Variable types to learning rates,
  `loss(cfg, n_text, frames)` builds the reconstruction loss.
  """
  if cfg.calib.selection == "salient":
    log(f"  scoring {len(pool)} candidates ({cfg.calib.salience} salience)")
    scores = score_pool(fp_model, pool, cfg.calib.salience)
  else:
    scores = None
  try:
    idx = select_indices(scores, cfg.calib.num_samples, cfg.calib.selection,
                         pool_size=len(pool), seed=cfg.seed)
  except ValueError as e:
    raise UserError(f"calib: {e}") from None
  data = pool.take(idx)
  video, text, temb = _batched(lambda x, c, t: _embed(fp_model, x, c, t),
                               (data.latents, data.conditions, data.timesteps))
  f, _, h, w = data.latents.shape[1:]
  rotary = fp_model.rotary_embedding(f, h, w)
  video_q, text_q = video, text
  train_cfg = TrainConfig(cfg.distill.epochs, cfg.distill.batch_size, cfg.distill.lr_clip,
                          cfg.distill.lr_smooth, cfg.seed)

  ckpt = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "calibration")),
                               options=ocp.CheckpointManagerOptions(max_to_keep=1))
  blocks = list(zip(fp_model.transformer_blocks, q_model.transformer_blocks))
  done = ckpt.latest_step() or 0
  if done:
    for _, q_block in blocks[:done]:
      prepare_block(q_block, cfg)
      for _, layer in quantized_layers(q_block):
        layer.freeze()  # placeholders with the right structure, overwritten by the restore
    state = nnx.state(q_model, nnx.Any(QuantParam, Codes))
    restored = ckpt.restore(done, args=ocp.args.StandardRestore(nnx.to_pure_dict(state)))
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(q_model, state)
    log(f"  resumed after block {done}")

  stats = []
  for b, (fp_block, q_block) in enumerate(blocks):
    if b < done:  # replay finished blocks to get the next block's inputs
      video, text = _batched(lambda v, t, e: _apply_block(fp_block, v, t, e, rotary), (video, text, temb))
      video_q, text_q = _batched(lambda v, t, e: _apply_block(q_block, v, t, e, rotary), (video_q, text_q, temb))
      continue
    start = time.perf_counter()
    prepare_block(q_block, cfg)
    layers = quantized_layers(q_block)
    target_v, target_t = _batched(lambda v, t, e: _apply_block(fp_block, v, t, e, rotary), (video, text, temb))
    n_tokens = text.shape[1] + video.shape[1]
    if cfg.distill.token_weighting == "attention":
      weights = np.asarray(token_weights(jnp.asarray(_importance(fp_block, video, text, temb, rotary)),
                                         cfg.distill.lam_min, cfg.distill.lam_max))
    else:
      weights = np.ones((len(video), n_tokens), np.float32)
    paths = {p for p, _ in layers}
    if cfg.distill.smoothing:
      with recording(q_block, paths) as collect:
        _batched(lambda v, t, e: _apply_block(q_block, v, t, e, rotary), (video_q, text_q, temb))
        _init_smoothing(layers, collect(), cfg.distill.smooth_alpha)
    history = []
    if cfg.distill.enabled:
      try:
        history = train_block(
            q_block, BlockData(video_q, text_q, temb, target_v, target_t, weights), rotary,
            train_cfg, mesh, groups=groups(cfg) if groups else None,
            **({"loss": loss(cfg, text.shape[1], f)} if loss else {}))
      except NonFiniteLoss as e:
        _check_finite(b, layers)
        raise UserError(f"calibration diverged in block {b} ({e}); every layer's parameters "
                        "are finite, so the activations overflowed: lower the learning rates")
      _check_finite(b, layers)
    with recording(q_block, paths) as collect:
      _batched(lambda v, t, e: _apply_block(q_block, v, t, e, rotary), (video_q, text_q, temb))
      _freeze_block(layers, collect(), cfg.distill.gptq)
    video_q, text_q = _batched(lambda v, t, e: _apply_block(q_block, v, t, e, rotary), (video_q, text_q, temb))
    video, text = target_v, target_t
    err = float(np.mean((np.concatenate([text_q, video_q], 1) -
                         np.concatenate([target_t, target_v], 1)) ** 2))
    state = nnx.state(q_model, nnx.Any(QuantParam, Codes))
    ckpt.save(b + 1, args=ocp.args.StandardSave(nnx.to_pure_dict(state)))
    ckpt.wait_until_finished()
    stats.append({"block": b, "seconds": time.perf_counter() - start,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "loss_first_epoch": history[0] if history else None,
                  "loss_last_epoch": history[-1] if history else None,
                  "output_mse_after_freeze": err})
    log(f"  block {b + 1}/{len(blocks)}: {stats[-1]['seconds']:.1f}s, output MSE {err:.2e}"
        + (f", loss {history[0]:.2e} → {history[-1]:.2e}" if history else ""))
  return {"num_candidates": len(pool), "selected": idx.tolist(), "blocks": stats,
          "devices": int(mesh.devices.size)}
