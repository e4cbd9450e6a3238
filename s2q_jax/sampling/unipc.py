"""UniPC on flow-matching noise levels (diffusers' `UniPCMultistepScheduler`, Wan 2.1) in JAX.

The setting Wan2.1's scheduler_config.json selects: `use_flow_sigmas`,
`prediction_type="flow_prediction"`, `predict_x0`, solver_type "bh2"
(B(h) = e^{−h} − 1 in diffusers' sign convention), solver order 2, lower
order on the final step, final σ = 0. On the flow
path x_σ = (1 − σ) x₀ + σ ε: α = 1 − σ, λ = log(α / σ), and the model's
velocity u gives m = x̂₀ = x − σ u.

Step i (Zhao et al. 2023, multistep UniPC with B(h)):
1. Corrector UniC (i > 0, unless disabled): the previous predictor's
   x_i is replaced by a solution from x_{i−1} that also uses m_i, the
   prediction *at* x_i, with the previous step's order.
2. Predictor UniP of order p: x_{i+1} from the corrected x_i and
   m_i, m_{i−1}, ..., m_{i−p+1}.
Both are linear in the sample and the stored predictions, with weights
that depend only on the σ grid, so they are precomputed here in float64 as
`x_next = a·x + b·x_last + Σ_k w_k m_{i−k}` (rows of `corrector` and
`predictor`); the scan carries the last `solver_order` predictions and the
previous sample. diffusers forms the same sums from differences, with
weights computed in float32: at orders 1 and 2 the two agree to ~1e-6 over
50 steps; at order 3 diffusers' own float32 rounding reaches ~1.5e-5, while
these weights agree with its algorithm run in float64 to ~1e-6
(tests/test_schedulers.py).

σ grid: linspace(1, 1/N, n + 1)[:-1] (or explicit `sigmas`), shifted by
`flow_shift` as in flow_match.py, with σ₀ = 1 nudged to 1 − 1e-6 (λ finite),
then 0 appended (`final_sigmas_type="zero"`). The model's timestep is
int(1000 σ), truncated as diffusers' int64 cast does. Not implemented:
bh1 and a higher order on the last step (diffusers returns NaN or inf on
the step to σ = 0), and `final_sigmas_type="sigma_min"` (a last step of
h = 0 that leaves the sample at σ_min).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from s2q_jax.sampling.flow_match import shift_sigmas


class UniPCState(NamedTuple):
  history: jax.Array  # (solver_order, B, ...) float32: m_{i−1}, m_{i−2}, ... (zeros before)
  last_sample: jax.Array  # float32: the previous step's (corrected) input x_{i−1}


@dataclasses.dataclass(frozen=True, eq=False)
class UniPCSchedule:
  """A schedule's constants; closed over by jitted code, not passed as a pytree."""
  sigmas: np.ndarray  # (num_steps + 1,) float32, descending, ending at 0
  timesteps: np.ndarray  # (num_steps,) int32: the model's timestep at each step
  # (num_steps, 2 + K + 1) float32, K = solver_order: weights of x_i, of x_{i−1},
  # and of m_i, m_{i−1}, ..., m_{i−K}. Rows without a correction are (1, 0, ...).
  corrector: np.ndarray
  # (num_steps, 1 + K) float32: weights of the corrected x_i and of m_i, ..., m_{i−K+1}.
  predictor: np.ndarray

  @property
  def num_steps(self) -> int:
    return len(self.timesteps)

  @property
  def solver_order(self) -> int:
    return self.predictor.shape[1] - 1

  def init_state(self, x: jax.Array, key: jax.Array | None = None) -> UniPCState:
    del key  # deterministic
    zeros = jnp.zeros(x.shape, jnp.float32)
    return UniPCState(jnp.stack([zeros] * self.solver_order), zeros)

  def step(self, state: UniPCState, u: jax.Array, i: jax.Array,
           x: jax.Array) -> tuple[jax.Array, UniPCState, jax.Array]:
    """`loop.Scheduler.step`: correct x_i, then predict x_{i+1}; also returns m_i = x̂₀."""
    x32 = x.astype(jnp.float32)
    m = x32 - jnp.asarray(self.sigmas)[i] * u.astype(jnp.float32)
    predictions = jnp.concatenate([m[None], state.history])  # m_i, m_{i−1}, ..., m_{i−K}
    c = jnp.asarray(self.corrector)[i]
    corrected = c[0] * x32 + c[1] * state.last_sample + jnp.tensordot(c[2:], predictions, 1)
    p = jnp.asarray(self.predictor)[i]
    x_next = p[0] * corrected + jnp.tensordot(p[1:], predictions[:-1], 1)
    return x_next.astype(x.dtype), UniPCState(predictions[:-1], corrected), m


def _bh2_weights(lam: np.ndarray, alpha: np.ndarray, at: int, to: int, order: int,
                 corrector: bool) -> np.ndarray:
  """Weights of m_at, m_{at−1}, ..., m_{at−order+1} (then of m_to, for the corrector).

  One UniP (or UniC) step from grid point `at` to `to` with B(h) = e^{−h} − 1
  in diffusers' sign convention, after its `multistep_uni_p_bh_update` and
  `multistep_uni_c_bh_update` (predict_x0):
    x_to = σ_to/σ_at x_at − α_to (e^{−h} − 1) m_at
           − α_to B(h) [Σ_k ρ_k (m_{at−k} − m_at) / r_k  (+ ρ_c (m_to − m_at))]
  with h = λ_to − λ_at, r_k = (λ_{at−k} − λ_at) / h and ρ from the order
  conditions. The σ_to/σ_at weight of x_at is the caller's.
  """
  h = lam[to] - lam[at]
  h_phi_1 = b_h = math.expm1(-h)
  rks = np.array([(lam[at - k] - lam[at]) / h for k in range(1, order)] + [1.0])
  # b_j = h φ_{j+1}(h) j! / B(h) by the φ functions' recurrence, as diffusers writes it.
  b, h_phi_k, factorial = [], h_phi_1 / -h - 1, 1
  for j in range(1, order + 1):
    b.append(h_phi_k * factorial / b_h)
    factorial *= j + 1
    h_phi_k = h_phi_k / -h - 1 / factorial
  vandermonde = np.stack([rks ** (j - 1) for j in range(1, order + 1)])
  if corrector:  # ρ for the earlier predictions, then ρ_c for m_to
    rhos = np.array([0.5]) if order == 1 else np.linalg.solve(vandermonde, np.array(b))
  else:
    rhos = (np.zeros(0) if order == 1 else np.array([0.5]) if order == 2
            else np.linalg.solve(vandermonde[:-1, :-1], np.array(b[:-1])))
  scale = alpha[to] * b_h
  earlier = -scale * rhos[:order - 1] / rks[:order - 1]  # m_{at−k}, k = 1..order−1
  m_at = -alpha[to] * h_phi_1 - earlier.sum()
  if not corrector:
    return np.array([m_at, *earlier])
  rho_c = rhos[-1]
  return np.array([m_at + scale * rho_c, *earlier, -scale * rho_c])


def make_unipc_schedule(num_steps: int, *, flow_shift: float = 1.0, solver_order: int = 2,
                        lower_order_final: bool = True, disable_corrector: Sequence[int] = (),
                        num_train_timesteps: int = 1000,
                        sigmas: Sequence[float] | None = None) -> UniPCSchedule:
  """The steps diffusers' UniPC (flow sigmas, bh2, final σ = 0) takes after `set_timesteps`.

  `disable_corrector` lists step indices i whose *following* step skips the
  corrector (diffusers' convention: step i + 1 does not correct x_{i+1}).
  `sigmas` (num_steps values, descending in (0, 1]) replaces the default
  spacing before the shift.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be at least 1, got {num_steps}")
  if solver_order < 1:
    raise ValueError(f"solver_order must be at least 1, got {solver_order}")
  if flow_shift <= 0:
    raise ValueError(f"flow_shift must be positive, got {flow_shift}")
  if not lower_order_final and solver_order > 1:
    # Order p > 1 on the final step to σ = 0 divides by h = inf: diffusers returns inf/NaN.
    raise ValueError("lower_order_final=False needs solver_order=1: a higher-order final step "
                     "to sigma 0 is undefined (diffusers returns non-finite samples)")
  if sigmas is None:
    sigmas = np.linspace(1, 1 / num_train_timesteps, num_steps + 1)[:-1]
  else:
    sigmas = np.asarray(sigmas, np.float64)
    if sigmas.shape != (num_steps,):
      raise ValueError(f"sigmas must hold num_steps={num_steps} values, got shape {sigmas.shape}")
    if not (np.all(sigmas > 0) and np.all(sigmas <= 1) and np.all(np.diff(sigmas) < 0)):
      raise ValueError(f"sigmas must decrease within (0, 1], got {sigmas.tolist()}")
  sigmas = shift_sigmas(sigmas, flow_shift)
  if abs(sigmas[0] - 1) < 1e-6:
    sigmas[0] -= 1e-6  # keeps λ₀ = log((1 − σ₀) / σ₀) finite
  timesteps = (sigmas * num_train_timesteps).astype(np.int64)  # truncation, as diffusers
  sigmas = np.append(sigmas, 0).astype(np.float32)
  # Coefficients from the float32 σ that diffusers steps with, computed in float64.
  s = sigmas.astype(np.float64)
  alpha = 1 - s
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(s)  # λ_n = +inf at σ = 0
  k = solver_order
  orders = [min(k, num_steps - i if lower_order_final else k, i + 1) for i in range(num_steps)]
  predictor = np.zeros((num_steps, 1 + k))
  corrector = np.zeros((num_steps, 3 + k))
  corrector[:, 0] = 1  # no correction: x_i as predicted
  skip = set(int(i) for i in disable_corrector)
  for i, p in enumerate(orders):
    predictor[i, 0] = s[i + 1] / s[i]
    predictor[i, 1:1 + p] = _bh2_weights(lam, alpha, i, i + 1, p, corrector=False)
    if i > 0 and i - 1 not in skip:
      q = orders[i - 1]
      w = _bh2_weights(lam, alpha, i - 1, i, q, corrector=True)
      corrector[i, :2] = 0, s[i] / s[i - 1]
      corrector[i, 2] = w[-1]  # m_i
      corrector[i, 3:3 + q] = w[:-1]  # m_{i−1}, ..., m_{i−q}
  if not (np.isfinite(predictor).all() and np.isfinite(corrector).all()):
    raise ValueError(f"UniPC coefficients are not finite for these {num_steps} sigmas: "
                     f"{sigmas.tolist()}")
  return UniPCSchedule(sigmas, timesteps.astype(np.int32), corrector.astype(np.float32),
                       predictor.astype(np.float32))
