"""CogVideoX's DDIM sampler (diffusers' `CogVideoXDDIMScheduler`) in JAX.

v-prediction on a scaled-linear beta schedule whose cumulative alphas are
SNR-shifted and rescaled to zero terminal SNR, "trailing" timestep spacing
(CogVideoX-2B's scheduler config; 5B ships the DPM solver of
`cogvideox_dpm.py` on the same schedule with snr_shift_scale = 1). The
scheduler ignores the pipeline's eta: steps are deterministic. Per-step
coefficients are computed once in float64 with numpy, as diffusers does;
`loop.sample` runs them in a `lax.scan`. Also the training-side helpers
(`add_noise`, `v_target`) on the same ᾱ_t.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class DDIMSchedule:
  """A schedule's constants; closed over by jitted code, not passed as a pytree."""
  alphas_cumprod: np.ndarray  # (num_train_timesteps,) float64 (float32 for "linear" betas)
  timesteps: np.ndarray  # (num_steps,) int32, descending: the model's timestep at each step
  # (num_steps, 4) float32 per step: sqrt(ᾱ_t), sqrt(1 − ᾱ_t), and the DDIM
  # update's a_t (weight of x_t) and b_t (weight of the predicted x_0).
  coefficients: np.ndarray

  @property
  def num_train_timesteps(self) -> int:
    return len(self.alphas_cumprod)

  @property
  def num_steps(self) -> int:
    return len(self.timesteps)

  def init_state(self, x: jax.Array, key: jax.Array | None = None) -> tuple:
    del x, key  # one-step and deterministic: nothing to carry
    return ()

  def step(self, state: tuple, v: jax.Array, i: jax.Array,
           x: jax.Array) -> tuple[jax.Array, tuple, jax.Array]:
    """`loop.Scheduler.step`: the DDIM update at step index i, and its x̂₀."""
    sqrt_a, sqrt_b, coef_x, coef_x0 = jnp.asarray(self.coefficients)[i]
    x32 = x.astype(jnp.float32)
    x0 = sqrt_a * x32 - sqrt_b * v.astype(jnp.float32)
    return (coef_x * x32 + coef_x0 * x0).astype(x.dtype), state, x0


def train_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                         beta_end: float = 0.012, snr_shift_scale: float = 3.0,
                         rescale_zero_snr: bool = True,
                         beta_schedule: str = "scaled_linear") -> np.ndarray:
  """ᾱ_t for t = 0..num_train_timesteps−1: the training noise levels."""
  if beta_schedule == "scaled_linear":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps,
                        dtype=np.float64) ** 2
  elif beta_schedule == "linear":
    # diffusers builds linear betas in float32, and everything after follows.
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
  else:
    raise ValueError(f"beta_schedule must be 'scaled_linear' or 'linear', got {beta_schedule!r}")
  dtype = betas.dtype.type
  ac = np.cumprod(1 - betas)
  ac = ac / (dtype(snr_shift_scale) + (1 - dtype(snr_shift_scale)) * ac)
  if rescale_zero_snr:  # Lin et al. 2024, Algorithm 1: shift and scale sqrt(ᾱ) so ᾱ_T = 0.
    s = np.sqrt(ac)
    s0, s_last = s[0], s[-1]
    ac = ((s - s_last) * (s0 / (s0 - s_last))) ** 2
  return ac


def _inference_timesteps(spacing: str, n: int, num_train: int, steps_offset: int) -> np.ndarray:
  if spacing == "trailing":
    return np.round(np.arange(num_train, 0, -num_train / n)).astype(np.int64) - 1
  if spacing == "leading":
    return (np.arange(n) * (num_train // n)).round()[::-1].astype(np.int64) + steps_offset
  if spacing == "linspace":
    return np.linspace(0, num_train - 1, n).round()[::-1].astype(np.int64)
  raise ValueError(f"timestep_spacing must be 'trailing', 'leading' or 'linspace', "
                   f"got {spacing!r}")


def make_schedule(num_inference_steps: int = 50, *, num_train_timesteps: int = 1000,
                  beta_start: float = 0.00085, beta_end: float = 0.012,
                  beta_schedule: str = "scaled_linear", snr_shift_scale: float = 3.0,
                  rescale_zero_snr: bool = True, timestep_spacing: str = "trailing",
                  steps_offset: int = 0, set_alpha_to_one: bool = True) -> DDIMSchedule:
  """CogVideoX-2B's scheduler config by default (5B uses snr_shift_scale=1.0).

  The keywords mirror `CogVideoXDDIMScheduler`'s config (`rescale_zero_snr`
  is its `rescale_betas_zero_snr`); prediction type is always v.
  """
  if not 1 <= num_inference_steps <= num_train_timesteps:
    raise ValueError(f"num_inference_steps must be in 1..{num_train_timesteps}, "
                     f"got {num_inference_steps}")
  ac = train_alphas_cumprod(num_train_timesteps, beta_start, beta_end, snr_shift_scale,
                            rescale_zero_snr, beta_schedule)
  timesteps = _inference_timesteps(timestep_spacing, num_inference_steps, num_train_timesteps,
                                   steps_offset)
  if timesteps.max() >= num_train_timesteps:
    raise ValueError(f"steps_offset {steps_offset} puts timesteps past {num_train_timesteps - 1}")
  # Like diffusers, the previous timestep is t − num_train // n whatever the
  # spacing, so it need not be the next entry of `timesteps`.
  prev = timesteps - num_train_timesteps // num_inference_steps
  final = 1.0 if set_alpha_to_one else ac[0]
  a_t = ac[timesteps].astype(np.float64)
  a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float64)
  coef_x = np.sqrt((1 - a_prev) / (1 - a_t))
  coef_x0 = np.sqrt(a_prev) - np.sqrt(a_t) * coef_x
  coefficients = np.stack([np.sqrt(a_t), np.sqrt(1 - a_t), coef_x, coef_x0], axis=1)
  return DDIMSchedule(ac, timesteps.astype(np.int32), coefficients.astype(np.float32))


def _per_sample(values: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
  v = jnp.asarray(values, jnp.float32)[t]
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def add_noise(schedule: DDIMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε for integer timesteps t of shape (B,)."""
  ac = _per_sample(schedule.alphas_cumprod, t, x0.ndim)
  return jnp.sqrt(ac) * x0 + jnp.sqrt(1 - ac) * noise


def v_target(schedule: DDIMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """The v-prediction target sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x_0 (diffusers' `get_velocity`)."""
  ac = _per_sample(schedule.alphas_cumprod, t, x0.ndim)
  return jnp.sqrt(ac) * noise - jnp.sqrt(1 - ac) * x0


def ddim_step(schedule: DDIMSchedule, v: jax.Array, step: int | jax.Array,
              x: jax.Array) -> jax.Array:
  """x_{t_prev} from x_t and the model's v prediction at step *index* `step`.

  `step` indexes `schedule.timesteps` (0 is the noisiest); it is not the
  timestep value. The update runs in float32 and returns x's dtype, as the
  pipeline casts latents back after each step.
  """
  if isinstance(step, (int, np.integer)) and not 0 <= step < schedule.num_steps:
    raise ValueError(f"step index must be in 0..{schedule.num_steps - 1}, got {step}")
  return schedule.step((), v, step, x)[0]


def predicted_x0(schedule: DDIMSchedule, step: jax.Array, x: jax.Array,
                 x_prev: jax.Array) -> jax.Array:
  """The x̂₀ a DDIM step at index `step` used, recovered from its input x and output x_prev.

  `ddim_step` computes x_prev = coef_x · x + coef_x0 · x̂₀ with coef_x0 > 0 for
  every step (the previous ᾱ is always larger), so x̂₀ follows exactly; under
  guidance it is the guided prediction. `step` may be per sample (B,).
  """
  coef = jnp.asarray(schedule.coefficients)[jnp.asarray(step)]
  shape = coef.shape[:-1] + (1,) * (x.ndim - coef.ndim + 1)
  coef_x, coef_x0 = coef[..., 2].reshape(shape), coef[..., 3].reshape(shape)
  return (x_prev.astype(jnp.float32) - coef_x * x.astype(jnp.float32)) / coef_x0
