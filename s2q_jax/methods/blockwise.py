"""The block-wise calibration loop that S²Q-VDiT and Q-VDiT share, driven by a `BlockRecipe`.

For each transformer block in turn: the full-precision block on
full-precision inputs gives the target; the quantized block gets the
outputs of the already-quantized blocks before it; the recipe's state is
added and trained to match (activation quantization on); the integer codes
are then fixed (GPTQ on the learned scales, or round-to-nearest) and the
state is checkpointed, so a rerun with the same workdir resumes at the next
block.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2q_jax import memory
from s2q_jax.models import interface
from s2q_jax.models.interface import BlockState
from s2q_jax.calibration.capture import recording
from s2q_jax.calibration.gptq import accumulate_hessian, gptq_quantize
from s2q_jax.calibration.pool import Pool
from s2q_jax.distillation import attention_token_importance, token_weights
from s2q_jax.distillation.block_reconstruction import (BlockData, LossFn, NonFiniteLoss,
                                                       TrainConfig, train_block)
from s2q_jax.errors import UserError
from s2q_jax.methods.block_checkpoint import BlockCheckpoint
from s2q_jax.progress import Progress, format_seconds
from s2q_jax.quant import QuantLinear, SmoothScale
from s2q_jax.quant.apply import quantized_layers
from s2q_jax.quant.qlinear import QuantParam


@dataclasses.dataclass(frozen=True)
class BlockRecipe:
  """What a block-wise method does to each block.

  `prepare_block(block, name)` adds the method's state to a block's quantized
  layers (`name` is the block's path in the model, e.g. "transformer_blocks.3"); it
  must be idempotent (resuming calls it on finished blocks too, to rebuild
  the structure the checkpoint restores into). `groups` maps the learned
  Variable types to learning rates; `loss(n_lead, frames)` builds the
  reconstruction loss (None: the token-weighted MSE) for block outputs whose
  first n_lead tokens are not video and whose others split into `frames`
  latent frames (`VideoDiT.stream_layout`).
  """
  prepare_block: Callable[[nnx.Module, str], None]
  groups: dict[type, float]
  train: TrainConfig
  loss: Callable[[int, int], LossFn] | None = None
  token_weighting: str = "attention"  # attention | uniform
  lam_min: float = 0.5
  lam_max: float = 1.0
  smooth_alpha: float | None = None  # SmoothQuant start of existing SmoothScales (None: keep)
  gptq: bool = True
  enabled: bool = True  # False: no training, only the start values and the freeze


@nnx.jit
def _apply_block(block, stream, context, extras):
  return block.calibration_call(stream, context, extras)


@nnx.jit
def _embed(model, latents, conditions, timesteps):
  return model.embed_blocks(latents, conditions, timesteps)


def _batched(fn: Callable, arrays: tuple, batch: int = 8):
  """fn over `arrays` (a pytree of arrays with one leading sample axis) in batches, joined."""
  n = len(jax.tree.leaves(arrays)[0])
  outs = [fn(*jax.tree.map(lambda a: a[i:i + batch], arrays)) for i in range(0, n, batch)]
  return jax.tree.map(lambda *parts: np.concatenate([np.asarray(p) for p in parts]), *outs)


def _batches(state: BlockState, batch: int = 8):
  n = len(state.stream[0])
  for i in range(0, n, batch):
    yield jax.tree.map(lambda a: a[i:i + batch], state)


def tokens(stream) -> np.ndarray:
  """A block stream's token groups joined on the token axis, as losses and weights see them."""
  return np.concatenate([np.asarray(x) for x in stream], axis=1)


def _layer_inputs(block, paths: set[str], state: BlockState, extras, *, transformed: bool = True
                  ) -> dict[str, list[jax.Array]]:
  """{layer path: [its inputs, one array per batch]} when `block` runs on `state`.

  Collected after every batch: recorded inputs left in the block would enter the
  next call as state, a new signature (a recompile) for every batch.
  """
  inputs: dict[str, list[jax.Array]] = {p: [] for p in paths}
  with recording(block, paths, transformed=transformed) as collect:
    for part in _batches(state):
      _apply_block(block, part.stream, part.context, extras)
      for p, xs in collect().items():
        inputs[p] += xs
  return inputs


@nnx.jit
def _block_importance(block, stream, context, extras):
  """(attention each stream token receives, whether queries may see it at all)."""
  q, k, valid = block.self_attention_qk(stream, context, extras)
  if valid is None:
    valid = jnp.ones(k.shape[::2], bool)
  return attention_token_importance(q, k, valid, block_size=256), valid


def init_smoothing(layers: list[tuple[str, QuantLinear]], inputs: dict, alpha: float) -> None:
  """SmoothQuant: s_j = max|X_j|^α / max|W_j|^(1−α), clamped to [1e-2, 1e2], from raw inputs."""
  for path, layer in layers:
    x_max = jnp.max(jnp.stack([jnp.abs(x).reshape(-1, x.shape[-1]).max(0)
                               for x in inputs[path]]), axis=0)
    w_max = jnp.abs(layer.kernel[...].astype(jnp.float32)).max(axis=1)
    s = jnp.clip(x_max ** alpha / jnp.maximum(w_max, 1e-8) ** (1 - alpha), 1e-2, 1e2)
    layer.smooth = SmoothScale(s)


def layer_hessians(block, paths: set[str], state: BlockState, extras) -> dict[str, jax.Array]:
  """{layer path: Σ xᵀx over its (transformed) inputs} when `block` runs on `state`.

  Summed batch by batch, so only one batch of layer inputs is alive at a time:
  all 40 samples' inputs of a block at full length would be tens of GiB.
  """
  hessians: dict[str, jax.Array | None] = {p: None for p in paths}
  with recording(block, paths) as collect:
    for part in _batches(state):
      _apply_block(block, part.stream, part.context, extras)
      for p, xs in collect().items():
        for x in xs:
          hessians[p] = accumulate_hessian(hessians[p], x)
  return hessians


def freeze_block(layers, hessians: dict | None) -> None:
  """Fixes each layer's codes: GPTQ for its current scales and input Hessian, or
  round-to-nearest when `hessians` is None."""
  for path, layer in layers:
    if hessians is None:
      layer.freeze()
      continue
    try:
      layer.freeze(gptq_quantize(layer.effective_kernel(), hessians[path], layer.weight_scales(),
                                 bits=layer.w_bits))
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None


def _check_finite(block_index: int, layers) -> None:
  for path, layer in layers:
    for name, var in vars(layer).items():
      if isinstance(var, QuantParam) and not bool(jnp.all(jnp.isfinite(var[...]))):
        raise UserError(f"calibration diverged in block {block_index}: layer {path} has "
                        f"non-finite {name}; lower the distill learning rates")


def calibrate_blocks(q_model: nnx.Module, fp_model: nnx.Module, data: Pool, recipe: BlockRecipe,
                     workdir: str, mesh: jax.sharding.Mesh, log=print) -> dict[str, Any]:
  """Calibrates q_model's blocks in place on the model inputs `data`; per-block statistics."""
  fp_model = interface.check(fp_model)
  state = _batched(lambda x, c, t: _embed(fp_model, x, c, t),
                   (data.latents, data.conditions, data.timesteps))
  # The quantized blocks get the full-precision embedding too. Feeding them the quantized
  # model's (its 8-bit timestep MLP), as at inference, measured 1 dB PSNR worse on the
  # embedded model (W4A6, seed 0: 27.39 vs 28.44 dB).
  stream, stream_q, context = state.stream, state.stream, state.context
  f, _, h, w = data.latents.shape[1:]
  extras = fp_model.block_extras(f, h, w)
  layout = fp_model.stream_layout(f, data.conditions.shape[1])
  run = lambda block, s: _batched(  # noqa: E731
      lambda s_, c_: _apply_block(block, s_, c_, extras), (s, context))

  ckpt = BlockCheckpoint(os.path.join(workdir, "calibration"))
  names = [name for name, _ in fp_model.calibration_blocks()]
  blocks = [(fb, qb) for (_, fb), (_, qb) in zip(fp_model.calibration_blocks(),
                                                  interface.check(q_model).calibration_blocks())]
  done = min(ckpt.blocks_done(), len(blocks))
  if done:
    for b, (_, q_block) in enumerate(blocks[:done]):
      recipe.prepare_block(q_block, names[b])
      for _, layer in quantized_layers(q_block):
        layer.freeze()  # placeholders with the right structure, overwritten by the restore
      ckpt.restore(b, q_block)
    log(f"  resumed after block {done}")
  epochs = recipe.train.epochs if recipe.enabled else 0
  # A block's unit of work: its epochs, plus one for what surrounds them (targets, GPTQ).
  progress = Progress((len(blocks) - done) * (epochs + 1), "calibration", log=log,
                      skip_first=epochs + 1)

  stats = []
  for b, (fp_block, q_block) in enumerate(blocks):
    if b < done:  # replay finished blocks to get the next block's inputs
      stream, stream_q = run(fp_block, stream), run(q_block, stream_q)
      continue
    start = time.perf_counter()
    memory.reset_host_peak()
    units_before = (b - done) * (epochs + 1)
    recipe.prepare_block(q_block, names[b])
    layers = quantized_layers(q_block)
    paths = {p for p, _ in layers}
    target = run(fp_block, stream)
    quantized_in = BlockState(stream_q, context)
    if recipe.token_weighting == "attention":
      importance, valid = _batched(lambda s_, c_: _block_importance(fp_block, s_, c_, extras),
                                   (stream, context))
      weights = np.asarray(token_weights(jnp.asarray(importance), recipe.lam_min,
                                         recipe.lam_max, jnp.asarray(valid)))
    else:
      weights = np.ones(tokens(stream).shape[:2], np.float32)
    smoothed = [(p, l) for p, l in layers if l.smooth is not None]
    if recipe.smooth_alpha is not None and smoothed:
      init_smoothing(smoothed, _layer_inputs(q_block, {p for p, _ in smoothed}, quantized_in,
                                             extras, transformed=False),
                     recipe.smooth_alpha)
    history, epoch_ends = [], [time.perf_counter()]

    def on_epoch(epoch: int, loss: float, b=b, units_before=units_before) -> None:
      epoch_ends.append(time.perf_counter())
      progress.update(units_before + epoch + 1, f"block {b + 1}/{len(blocks)} epoch "
                      f"{epoch + 1}/{epochs} loss {loss:.2e}")

    if recipe.enabled:
      try:
        history = train_block(
            q_block, BlockData(stream_q, context, target, weights), extras,
            recipe.train, mesh, groups=recipe.groups, on_epoch=on_epoch,
            **({"loss": recipe.loss(*layout)} if recipe.loss else {}))
      except NonFiniteLoss as e:
        _check_finite(b, layers)
        raise UserError(f"calibration diverged in block {b} ({e}); every layer's parameters "
                        "are finite, so the activations overflowed: lower the learning rates")
      _check_finite(b, layers)
    freeze_block(layers, layer_hessians(q_block, paths, quantized_in, extras)
                 if recipe.gptq else None)
    stream_q, stream = run(q_block, stream_q), target
    err = float(np.mean((tokens(stream_q) - tokens(target)) ** 2))
    ckpt.save(b, q_block)
    progress.update(units_before + epochs + 1, show=False)
    progress.clear()
    stats.append({"block": b, "seconds": time.perf_counter() - start,
                  "peak_rss_gib": memory.host_peak_gib(),
                  "peak_device_gib": memory.device_peak_gib(),
                  "epoch_seconds": np.diff(epoch_ends).tolist(),
                  "loss_first_epoch": history[0] if history else None,
                  "loss_last_epoch": history[-1] if history else None,
                  "output_mse_after_freeze": err})
    eta = progress.eta()
    log(f"  block {b + 1}/{len(blocks)}: {stats[-1]['seconds']:.1f}s, output MSE {err:.2e}"
        + (f", loss {history[0]:.2e} → {history[-1]:.2e}" if history else "")
        + f", peak RSS {stats[-1]['peak_rss_gib']:.2f} GiB"
        + (f", ETA {format_seconds(eta)}" if eta is not None else ""))
  return {"blocks": stats, "devices": int(mesh.devices.size)}
