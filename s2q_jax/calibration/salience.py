"""Hessian-aware salience of calibration samples (S²Q-VDiT, salient data selection).

For a linear layer with input x (n, d), the reconstruction loss of one
output row, L(w) = ½‖x (w − w₀)‖², has Hessian xᵀx. The paper writes
H = 2XᵀX for the unhalved loss ‖XWᵀ − XŴᵀ‖²; the factor 2 is the same for
every sample, so it is dropped and the salience is ‖xᵀx‖₂, the top
eigenvalue. It is found by power iteration on Hessian-vector products
`jvp(grad(L))`, which cost two (n, d) matmuls and never form the (d, d)
matrix.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _reconstruction_loss(x: jax.Array):
  def loss(w):  # w: (d,) deviation of one output row from its full-precision value
    return 0.5 * jnp.sum(jnp.square(x @ w))
  return loss


def hvp(x: jax.Array, v: jax.Array) -> jax.Array:
  """(xᵀx) v by forward-over-reverse differentiation of the layer's reconstruction loss."""
  # The loss is quadratic, so the Hessian is the same at every point: expand at 0.
  return jax.jvp(jax.grad(_reconstruction_loss(x)), (jnp.zeros_like(v),), (v,))[1]


_PATIENCE = 3  # consecutive steps that must pass the stopping test


@jax.jit
def _power_iteration(x, v0, tol, num_iters):
  def cond(state):
    i, *_, streak = state
    return (i < num_iters) & (streak < _PATIENCE)

  def body(state):
    i, v, lam, delta, rho, streak = state
    hv = hvp(x, v)
    norm = jnp.linalg.norm(hv)
    new_lam = jnp.vdot(v, hv)  # Rayleigh quotient of the unit vector v
    new_delta = new_lam - lam
    # For a PSD matrix the Rayleigh quotients of power iterates never decrease,
    # and once one eigen-gap dominates, their steps shrink geometrically by
    # rho: the error still left is about delta·rho/(1 − rho). Stopping on a
    # small step alone quits early when convergence is slow (rho near 1);
    # requiring rho to have stopped rising, several steps in a row, skips the
    # lull after fast components die out and before the slow one's rate shows.
    new_rho = new_delta / jnp.where(delta > 0, delta, jnp.inf)
    tail = new_delta * new_rho / jnp.maximum(1.0 - new_rho, 1e-12)
    settled = (new_rho < 1.0) & (new_rho <= rho + 0.05)
    streak = jnp.where(settled & (tail <= tol * new_lam), streak + 1, 0)
    at_noise_floor = (i >= 2) & (new_delta <= 0.0)  # float rounding outweighs progress
    streak = jnp.where(at_noise_floor | (norm == 0.0), _PATIENCE, streak)
    return i + 1, hv / jnp.maximum(norm, 1e-30), new_lam, new_delta, new_rho, streak

  zero = jnp.zeros((), x.dtype)
  init = (0, v0 / jnp.linalg.norm(v0), zero, zero, jnp.array(jnp.inf, x.dtype), 0)
  return jax.lax.while_loop(cond, body, init)[2]


def quant_salience(x: jax.Array, *, num_iters: int = 1000, tol: float = 1e-4,
                   key: jax.Array | None = None) -> jax.Array:
  """‖xᵀx‖₂ for x of shape (..., d) (leading axes are tokens), by HVP power iteration.

  Args:
    x: layer input; all leading axes are flattened into tokens.
    num_iters: cap on Hessian-vector products.
    tol: stop once the estimated remaining relative error of the Rayleigh
      quotient (last step extrapolated geometrically) is below `tol`.
    key: PRNG key of the random start vector (fixed when None, so scores are
      reproducible).

  Returns:
    A float32 scalar: a Rayleigh quotient, so never above the true value
    (up to rounding). An all-zero x gives 0. When several top eigenvalues
    lie within ~1% of each other and the start vector barely touches the
    top one, float32 rounding can hide the progress and the result lands
    anywhere in that cluster; for ranking samples that is immaterial.
  """
  x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
  key = jax.random.key(0) if key is None else key
  v0 = jax.random.normal(key, (x.shape[-1],), jnp.float32)
  return _power_iteration(x, v0, tol, num_iters)


def layer_salience(inputs: dict[str, jax.Array], **kwargs) -> jax.Array:
  """Per-layer variant: Σ over layers of ‖xₗᵀxₗ‖₂ for one sample.

  `inputs` maps layer name to that layer's input (..., d_l); keyword
  arguments go to `quant_salience`.
  """
  total = jnp.zeros((), jnp.float32)
  for x in inputs.values():
    total = total + quant_salience(x, **kwargs)
  return total


def diffusion_salience(x_t: jax.Array, x_prev: jax.Array) -> jax.Array:
  """‖x_t − x_{t−1}‖² / ‖x_t‖² per sample (leading axis): how much a step moves the latent."""
  axes = tuple(range(1, x_t.ndim))
  x_t, x_prev = jnp.asarray(x_t, jnp.float32), jnp.asarray(x_prev, jnp.float32)
  change = jnp.sum(jnp.square(x_t - x_prev), axis=axes)
  return change / jnp.sum(jnp.square(x_t), axis=axes)
