"""S²Q-VDiT calibration: Hessian-aware salient data selection, then sparse token distillation.

Selection scores every pool position by C = C̄_diff · C̄_quant and keeps the
most salient (`calib.selection`, see `select_positions`). Each block is then
trained to reproduce its full-precision twin with the token-weighted loss,
learning per layer (appendix A of the paper): weight clipping and activation
clipping (lr 5e-2), a SmoothQuant-initialised smoothing scale and a
FlatQuant-style Kronecker transform of the input (lr 5e-3). GPTQ then fixes
the integer codes for the learned scales. The loop itself is
`methods.blockwise`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2q_jax.calibration import (diffusion_salience, quant_salience, salient_scores,
                                 select_indices)
from s2q_jax.calibration.capture import recording
from s2q_jax.calibration.pool import Pool
from s2q_jax.calibration.selection import stratified_indices
from s2q_jax.distillation.block_reconstruction import TrainConfig
from s2q_jax.errors import UserError
from s2q_jax.methods.blockwise import BlockRecipe, calibrate_blocks
from s2q_jax.methods.calibration_data import calibration_data, num_positions
from s2q_jax.quant import QuantLinear, Rotation, SmoothScale
from s2q_jax.quant import kronecker
from s2q_jax.quant.apply import quantized_layers
from s2q_jax.quant.qlinear import ActClip, KroneckerFactor, WeightClip
from s2q_jax.quant.rotation import hadamard_matrix

TRANSFORMS = ("kronecker", "none")


def salience(model: nnx.Module, pool: Pool, quant_variant: str, diff_variant: str
             ) -> tuple[np.ndarray, np.ndarray]:
  """(C_diff, C_quant) of every pool position (see DESIGN §4).

  C_diff: `latent` ‖x_t − x_{t−1}‖²/‖x_t‖², or `x0` the change of the predicted
  clean video (`Pool.x0_change`). C_quant: `input` ‖x_tᵀx_t‖₂ over the latent's
  patch tokens (the paper's), or `layer` the sum over quantized layers of the top
  eigenvalue of each layer's input Hessian (conditional input).
  """
  if diff_variant == "latent":
    c_diff = np.asarray(diffusion_salience(jnp.asarray(pool.latents), jnp.asarray(pool.previous)))
  elif diff_variant == "x0":
    c_diff = np.asarray(pool.x0_change, np.float64)
  else:
    raise UserError(f"calib.diffusion_salience={diff_variant!r}: use latent or x0")
  if quant_variant not in ("input", "layer"):
    raise UserError(f"calib.salience={quant_variant!r}: use input or layer")
  c_quant = np.empty(len(pool))
  paths = {path for path, _ in quantized_layers(model)}
  for i in range(len(pool)):
    if quant_variant == "input":
      c_quant[i] = float(quant_salience(jnp.asarray(model.latent_tokens(pool.latents[i]))))
    else:
      with recording(model, paths) as collect:
        model.denoise(pool.latents[i:i + 1], pool.conditions[i:i + 1], pool.timesteps[i:i + 1])
        inputs = collect()
      c_quant[i] = sum(float(quant_salience(x)) for xs in inputs.values() for x in xs)
  return c_diff, c_quant


def select_positions(model: nnx.Module, pool: Pool, cfg, log=print) -> np.ndarray:
  """Pool positions to calibrate on, by `calib.selection`.

  salient_stratified (default): the sampler's steps split into `calib.bands`
  bands (0: one per position; `calib.band_layout`: contiguous steps, or one step
  each spread over the trajectory), each with its quota (`calib.band_quota`),
  ranked by C within the band, no prompt taking much more than its share.
  salient: the paper's literal global top-N of C (on zero-terminal-SNR
  schedules it takes only the last steps). uniform | random: ablations.
  """
  n = num_positions(cfg, pool)
  method = cfg.calib.selection
  try:
    if method in ("salient", "salient_stratified"):
      log(f"  scoring {len(pool)} candidates ({cfg.calib.diffusion_salience} diffusion × "
          f"{cfg.calib.salience} quantization salience)")
      c_diff, c_quant = salience(model, pool, cfg.calib.salience, cfg.calib.diffusion_salience)
      if method == "salient":
        return select_indices(salient_scores(c_diff, c_quant), n)
      return stratified_indices(c_diff, c_quant, pool.steps, int(pool.steps.max()) + 1, n,
                                cfg.calib.bands, cfg.calib.band_quota, pool.prompt_index(),
                                cfg.calib.band_layout)
    return select_indices(None, n, method, pool_size=len(pool), seed=cfg.seed)
  except ValueError as e:
    raise UserError(f"calib: {e}") from None


def add_quantizer_state(layer: QuantLinear, cfg) -> None:
  """The learnable parts S²Q-VDiT adds to a layer (idempotent)."""
  d = cfg.distill
  if d.smoothing and layer.smooth is None:
    layer.smooth = SmoothScale(jnp.ones((layer.in_features,)))  # set from data by the loop
  if d.rotation and layer.rotation is None:
    layer.rotation = Rotation(hadamard_matrix(layer.in_features))
  if d.transform not in TRANSFORMS:
    raise UserError(f"distill.transform={d.transform!r}: use one of {', '.join(TRANSFORMS)}")
  if d.transform == "kronecker" and layer.a_bits is not None and layer.transform_left is None:
    try:
      p1, p2 = kronecker.initial_factors(layer.in_features, d.transform_init)
    except ValueError as e:
      raise UserError(f"distill.transform_init: {e}") from None
    layer.transform_left, layer.transform_right = KroneckerFactor(p1), KroneckerFactor(p2)
  if d.act_clip and layer.a_bits is not None and layer.act_clip is None:
    layer.act_clip = ActClip(jnp.ones(()))


def recipe(cfg) -> BlockRecipe:
  d = cfg.distill

  def prepare_block(block: nnx.Module, name: str) -> None:
    del name  # every layer starts alike
    for _, layer in quantized_layers(block):
      add_quantizer_state(layer, cfg)

  return BlockRecipe(
      prepare_block=prepare_block,
      groups={WeightClip: d.lr_clip, ActClip: d.lr_act_clip, SmoothScale: d.lr_smooth,
              KroneckerFactor: d.lr_transform},
      train=TrainConfig(d.epochs, d.batch_size, d.lr_clip, d.lr_smooth, cfg.seed),
      token_weighting=d.token_weighting, lam_min=d.lam_min, lam_max=d.lam_max,
      smooth_alpha=d.smooth_alpha if d.smoothing else None, gptq=d.gptq, enabled=d.enabled)


def calibrate(q_model: nnx.Module, fp_model: nnx.Module, pool: Pool, cfg, workdir: str,
              mesh: jax.sharding.Mesh, log=print) -> dict[str, Any]:
  """Calibrates q_model in place; returns what the report says about it."""
  positions = select_positions(fp_model, pool, cfg, log)
  data, selection = calibration_data(pool, positions, cfg)
  log(f"  {len(data)} calibration inputs ({selection['uncond']} null-prompt), per sampler "
      f"step: {selection['step_histogram']}")
  stats = calibrate_blocks(q_model, fp_model, data, recipe(cfg), workdir, mesh, log)
  return {"num_candidates": len(pool), "selection": selection, **stats}
