"""Attention-guided token weights (S²Q-VDiT, sparse token distillation).

Token j's importance is the attention it receives, S_j = Σ_heads Σ_queries
softmax(q kᵀ/√d)[h, i, j]. At video lengths (17,776 tokens for
CogVideoX-2B) the n × n map must never exist, so it is computed in two
passes over key tiles: first each query's log-sum-exp (online, like flash
attention), then the column sums of exp(q kᵀ/√d − lse), one
(query tile × key tile) block at a time.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _tiles(x: jax.Array, block: int, fill: float = 0.0):
  """(B, H, n, d) → (n_tiles, B, H, block, d), padded along n."""
  n = x.shape[2]
  pad = -n % block
  x = jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=fill)
  b, h, _, d = x.shape
  return jnp.moveaxis(x.reshape(b, h, -1, block, d), 2, 0)


@functools.partial(jax.jit, static_argnames=("block_size",))
def attention_token_importance(q: jax.Array, k: jax.Array, key_valid: jax.Array | None = None,
                               *, block_size: int = 512, scale: float | None = None
                               ) -> jax.Array:
  """(B, n_k): softmax attention each key receives, summed over heads and queries.

  Args:
    q: queries (B, H, n_q, d), after any qk-norm and rotary embedding.
    k: keys (B, H, n_k, d); n_q and n_k need not be multiples of block_size.
    key_valid: optional (B, n_k) boolean, the keys the model's attention mask
      lets queries see (padded prompt tokens are not); masked keys receive 0.
    block_size: query and key tile length.
    scale: logit scale, 1/√d when None.

  Working memory is O(B·H·block_size²) for one tile plus O(B·H·n_q) for the
  row log-sum-exps, never O(n_q·n_k). Computed in float32 at the default
  matmul precision; the rows of the implied map sum to one, so the result
  sums to H·n_q per batch row. It is a fixed weight: stop gradients through it.
  """
  b, h, n_q, d = q.shape
  n_k = k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  q = q.astype(jnp.float32) * scale
  q_tiles, k_tiles = _tiles(q, block_size), _tiles(k.astype(jnp.float32), block_size)
  valid = jnp.ones((1, n_k), bool) if key_valid is None else jnp.asarray(key_valid, bool)
  key_valid = _tiles(valid[:, None, :, None], block_size)[..., 0]  # (T, 1 or B, 1, block)

  def logits(qt, kt, valid):
    s = jnp.einsum("bhqd,bhkd->bhqk", qt, kt)
    return jnp.where(valid[:, :, None, :], s, -jnp.inf)

  def row_lse(qt):  # pass 1: log-sum-exp of each query over all keys, online
    def step(carry, inputs):
      m, total = carry
      kt, valid = inputs
      s = logits(qt, kt, valid)
      m_new = jnp.maximum(m, s.max(-1))
      total = total * jnp.exp(m - m_new) + jnp.exp(s - m_new[..., None]).sum(-1)
      return (m_new, total), None

    init = (jnp.full(qt.shape[:3], -jnp.inf), jnp.zeros(qt.shape[:3]))
    (m, total), _ = jax.lax.scan(step, init, (k_tiles, key_valid))
    return m + jnp.log(total)

  query_valid = _tiles(jnp.ones((1, 1, n_q, 1), bool), block_size)[..., 0]
  lses = jax.lax.map(row_lse, q_tiles)  # (query tiles, B, H, block)

  def column_sums(kt, valid):  # pass 2: attention received by one key tile, over query tiles
    def step(acc, inputs):
      qt, lse, q_ok = inputs
      p = jnp.exp(logits(qt, kt, valid) - lse[..., None])
      p = jnp.where(q_ok[:, :, :, None], p, 0.0)
      return acc + p.sum(axis=(1, 2)), None

    acc, _ = jax.lax.scan(step, jnp.zeros((b, block_size)), (q_tiles, lses, query_valid))
    return acc

  per_tile = jax.lax.map(lambda args: column_sums(*args), (k_tiles, key_valid))
  return jnp.moveaxis(per_tile, 0, 1).reshape(b, -1)[:, :n_k]


def token_weights(importance: jax.Array, lam_min: float = 0.5, lam_max: float = 1.0,
                  valid: jax.Array | None = None) -> jax.Array:
  """λ_j = λ_min + (λ_max − λ_min)(S_j − min S)/(max S − min S) per batch row.

  A row whose tokens are all equally important gets λ_max everywhere (plain MSE).
  With `valid` (B, n) boolean, min and max run over the valid tokens and the
  others get λ = 0: no query ever reads them, so their errors cost nothing.
  """
  ok = jnp.ones(importance.shape, bool) if valid is None else jnp.asarray(valid, bool)
  lo = jnp.where(ok, importance, jnp.inf).min(axis=-1, keepdims=True)
  span = jnp.where(ok, importance, -jnp.inf).max(axis=-1, keepdims=True) - lo
  frac = jnp.where(span > 0, (importance - lo) / jnp.where(span > 0, span, 1.0), 1.0)
  return jnp.where(ok, lam_min + (lam_max - lam_min) * frac, 0.0)


def weighted_token_mse(y_fp: jax.Array, y_q: jax.Array, weights: jax.Array) -> jax.Array:
  """(1/n) Σ_j λ_j ‖y_fp_j − y_q_j‖², averaged over the batch.

  y_fp, y_q: (B, n, D); weights: (B, n). Not normalised by Σλ, as in the paper.
  """
  per_token = jnp.sum(jnp.square(y_fp.astype(jnp.float32) - y_q.astype(jnp.float32)), axis=-1)
  return jnp.mean(weights * per_token)
