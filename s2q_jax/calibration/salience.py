"""Hessian-aware salience of calibration samples (S²Q-VDiT, salient data selection).

For a linear layer with input x (n, d), the reconstruction loss of one
output row, L(w) = ½‖x (w − w₀)‖², has Hessian xᵀx (the paper writes
H = 2XᵀX for the unhalved loss). A sample's quantization salience is that
Hessian's top eigenvalue ‖xᵀx‖₂, found by power iteration on
Hessian-vector products `jvp(grad(L))`, which cost two (n, d) matmuls and
never form the (d, d) matrix.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _reconstruction_loss(x: jax.Array):
  def loss(w):  # w: (d,) deviation of one output row from its full-precision value
    return 0.5 * jnp.sum(jnp.square(x @ w))
  return loss


def hvp(x: jax.Array, v: jax.Array) -> jax.Array:
  """(xᵀx) v via forward-over-reverse differentiation of the layer's reconstruction loss."""
  return jax.jvp(jax.grad(_reconstruction_loss(x)), (jnp.zeros_like(v),), (v,))[1]


@jax.jit
def _power_iteration(x, v0, tol, max_iters):
  def cond(state):
    i, _, lam, prev = state
    return (i < max_iters) & (jnp.abs(lam - prev) > tol * jnp.abs(lam))

  def body(state):
    i, v, lam, _ = state
    hv = hvp(x, v)
    norm = jnp.linalg.norm(hv)
    return i + 1, hv / jnp.maximum(norm, 1e-30), jnp.vdot(v, hv), lam

  init = (0, v0 / jnp.linalg.norm(v0), jnp.array(0.0, x.dtype), jnp.array(-1.0, x.dtype))
  _, _, lam, _ = jax.lax.while_loop(cond, body, init)
  return lam


def quant_salience(x: jax.Array, *, tol: float = 1e-5, max_iters: int = 500,
                   key: jax.Array | None = None) -> jax.Array:
  """‖xᵀx‖₂ for x of shape (..., d) (leading axes are tokens), by HVP power iteration.

  Stops when the Rayleigh quotient changes by less than `tol` relative; the
  start vector is random, so it is not orthogonal to the top eigenvector.
  """
  x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
  key = jax.random.key(0) if key is None else key
  v0 = jax.random.normal(key, (x.shape[-1],), jnp.float32)
  return _power_iteration(x, v0, tol, max_iters)


def layer_salience(inputs: dict[str, jax.Array], **kwargs) -> jax.Array:
  """Per-layer variant: Σ over layers of ‖xₗᵀxₗ‖₂ for one sample's layer inputs {name: x}."""
  return sum(quant_salience(x, **kwargs) for x in inputs.values())


def diffusion_salience(x_t: jax.Array, x_prev: jax.Array) -> jax.Array:
  """‖x_t − x_{t−1}‖² / ‖x_t‖² per sample (leading axis): how much the step changes the latent."""
  axes = tuple(range(1, x_t.ndim))
  return jnp.sum(jnp.square(x_t - x_prev), axis=axes) / jnp.sum(jnp.square(x_t), axis=axes)
