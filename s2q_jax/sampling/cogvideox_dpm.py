"""CogVideoX's DPM solver (diffusers' `CogVideoXDPMScheduler`, CogVideoX-5B's default) in JAX.

The same v-prediction training schedule as `ddim.py` (5B: snr_shift_scale
1), stepped by the stochastic second-order multistep DPM-Solver++(2M) SDE.
With λ = log √(ᾱ / (1 − ᾱ)), h = λ_prev − λ_t and x̂₀ from this step's v:

  D      = (1 + 1/2r) x̂₀ − (1/2r) x̂₀_before,   r = (λ_t − λ_before) / h
  x_prev = σ_prev/σ_t e^{−h} x_t + α_prev (1 − e^{−2h}) D + σ_prev √(1 − e^{−2h}) z

where α = √ᾱ, σ = √(1 − ᾱ), "before" is the previous (noisier) step and
z ~ N(0, I). D = x̂₀ on the first step and on the last (whose previous ᾱ is
the final one, 1 by default, making x_prev = x̂₀ exactly). As in diffusers,
"prev" is t − num_train_timesteps // num_steps whatever the spacing, so it
need not equal the next step's timestep that λ_before uses.

Noise: `CogVideoXPipeline` passes eta = 0 and a generator, but this
scheduler's step never reads eta; the noise term is always added. Sampling
is therefore a deterministic function of the initial noise and a PRNG key,
and `init_state` requires one. Each sample has its own key (`sample_keys`:
sample b of a batch sampled with one key uses fold_in(key, b)) and step i
draws its N(0, I) from fold_in(sample key, i) (`step_noise`): the same key
gives the same video for a full-precision and a quantized model, and a
video does not depend on which batch, or which position in it, it is
sampled in. diffusers' `clip_sample`,
`clip_sample_range` and `sample_max_value` have no effect on its step.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from s2q_jax.sampling.ddim import make_schedule


class DPMState(NamedTuple):
  previous_x0: jax.Array  # float32 x̂₀ of the previous step (zeros before the first)
  keys: jax.Array  # (B,) one PRNG key per sample


def sample_keys(key: jax.Array, batch: int) -> jax.Array:
  """(batch,) per-sample keys: `key` given per sample already, or fold_in(key, b) for sample b."""
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # a raw uint32 `jax.random.PRNGKey`
  if key.shape == (batch,):
    return key
  if key.shape:
    raise ValueError(f"expected one PRNG key or one per sample ({batch},), got keys of shape "
                     f"{key.shape}")
  return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))


def step_noise(keys: jax.Array, i: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The (B, ...) N(0, I) float32 noise step i adds; sample b's comes from keys[b] alone."""
  def draw(key):
    return jax.random.normal(jax.random.fold_in(key, i), shape[1:], jnp.float32)
  return jax.vmap(draw)(keys)


@dataclasses.dataclass(frozen=True, eq=False)
class CogVideoXDPMSchedule:
  """A schedule's constants; closed over by jitted code, not passed as a pytree."""
  alphas_cumprod: np.ndarray  # (num_train_timesteps,) the training ᾱ_t
  timesteps: np.ndarray  # (num_steps,) int32, descending: the model's timestep at each step
  # (num_steps, 7) float32 per step: √ᾱ_t and √(1 − ᾱ_t) (x̂₀ from v), the update's
  # weights of x_t and of D, D's weights of x̂₀ and x̂₀_before, and the noise's weight.
  coefficients: np.ndarray

  @property
  def num_steps(self) -> int:
    return len(self.timesteps)

  def init_state(self, x: jax.Array, key: jax.Array | None) -> DPMState:
    if key is None:
      raise ValueError("CogVideoXDPMScheduler adds noise at every step (the pipeline's eta is "
                       "ignored): pass a PRNG key, e.g. key=jax.random.key(0)")
    return DPMState(jnp.zeros(x.shape, jnp.float32), sample_keys(key, x.shape[0]))

  def step(self, state: DPMState, v: jax.Array, i: jax.Array,
           x: jax.Array) -> tuple[jax.Array, DPMState, jax.Array]:
    """`loop.Scheduler.step`: one DPM-Solver++(2M) SDE step at step index i, and its x̂₀."""
    sqrt_a, sqrt_b, w_x, w_d, d_x0, d_before, w_noise = jnp.asarray(self.coefficients)[i]
    x32 = x.astype(jnp.float32)
    x0 = sqrt_a * x32 - sqrt_b * v.astype(jnp.float32)
    denoised = d_x0 * x0 - d_before * state.previous_x0
    x_prev = w_x * x32 - w_d * denoised + w_noise * step_noise(state.keys, i, x.shape)
    return x_prev.astype(x.dtype), DPMState(x0, state.keys), x0


def _log_snr(a: np.ndarray) -> np.ndarray:
  """λ = log √(ᾱ / (1 − ᾱ)): −inf at zero SNR, +inf at ᾱ = 1, as diffusers computes it."""
  return np.log(np.sqrt(a / (1 - a)))


def make_dpm_schedule(num_inference_steps: int = 50, *, num_train_timesteps: int = 1000,
                      beta_start: float = 0.00085, beta_end: float = 0.012,
                      beta_schedule: str = "scaled_linear", snr_shift_scale: float = 1.0,
                      rescale_zero_snr: bool = True, timestep_spacing: str = "trailing",
                      steps_offset: int = 0, set_alpha_to_one: bool = True) -> CogVideoXDPMSchedule:
  """CogVideoX-5B's scheduler config by default (2B's numbers: snr_shift_scale=3.0).

  The keywords mirror `CogVideoXDPMScheduler`'s config (`rescale_zero_snr` is
  its `rescale_betas_zero_snr`); prediction type is always v.
  """
  grid = make_schedule(num_inference_steps, num_train_timesteps=num_train_timesteps,
                       beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule,
                       snr_shift_scale=snr_shift_scale, rescale_zero_snr=rescale_zero_snr,
                       timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                       set_alpha_to_one=set_alpha_to_one)
  ac, t = grid.alphas_cumprod, grid.timesteps.astype(np.int64)
  prev = t - num_train_timesteps // num_inference_steps
  final = 1.0 if set_alpha_to_one else ac[0]
  a_t = ac[t].astype(np.float64)
  a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float64)
  # The infinities are intended: zero terminal SNR gives λ_t = −inf on the first
  # step and ᾱ_prev = 1 gives λ_prev = +inf on the last, and the weights' limits
  # there (e^{−inf} = 0) are the values diffusers computes the same way.
  with np.errstate(divide="ignore", invalid="ignore"):
    h = _log_snr(a_prev) - _log_snr(a_t)
    w_x = np.sqrt((1 - a_prev) / (1 - a_t)) * np.exp(-h)
    w_d = np.expm1(-2 * h) * np.sqrt(a_prev)
    w_noise = np.sqrt(1 - a_prev) * np.sqrt(1 - np.exp(-2 * h))
    # Second order from the second step on, except on the last (prev < 0).
    a_before = np.concatenate([[np.nan], a_t[:-1]])
    second_order = (np.arange(len(t)) > 0) & (prev >= 0)
    half_inv_r = np.where(second_order, h / (_log_snr(a_t) - _log_snr(a_before)) / 2, 0.0)
  coefficients = np.stack([np.sqrt(a_t), np.sqrt(1 - a_t), w_x, w_d, 1 + half_inv_r,
                           half_inv_r, w_noise], axis=1)
  if not np.isfinite(coefficients).all():
    raise ValueError(f"CogVideoX DPM coefficients are not finite for {num_inference_steps} steps "
                     "of this schedule; check its beta and SNR settings")
  return CogVideoXDPMSchedule(ac, grid.timesteps, coefficients.astype(np.float32))
