"""Tiled attention token importance against the dense softmax map; token weights and loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2q_jax.distillation import attention_token_importance, token_weights, weighted_token_mse


def _dense(q, k, scale=None, key_valid=None):
  scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
  s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k.astype(np.float64)) * scale
  if key_valid is not None:
    s = np.where(key_valid[:, None, None, :], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return p.sum(axis=(1, 2))


@pytest.mark.parametrize("b,h,nq,nk,d,block", [(1, 2, 64, 64, 16, 16), (2, 3, 50, 70, 8, 16),
                                               (1, 1, 7, 130, 32, 64), (2, 2, 33, 33, 16, 128),
                                               (1, 4, 100, 9, 8, 32)])
def test_matches_dense_map(b, h, nq, nk, d, block):
  rng = np.random.default_rng(nq + nk)
  q = rng.standard_normal((b, h, nq, d)).astype(np.float32) * 2
  k = rng.standard_normal((b, h, nk, d)).astype(np.float32) * 2
  got = np.asarray(attention_token_importance(jnp.asarray(q), jnp.asarray(k), block_size=block))
  assert got.shape == (b, nk)
  np.testing.assert_allclose(got, _dense(q, k), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got.sum(-1), h * nq, rtol=1e-4)  # every query's row sums to one


@pytest.mark.parametrize("block", [8, 64])
def test_masked_keys_receive_nothing_and_take_nothing(block):
  """A padded prompt token no query may see: the dense map with those keys masked out."""
  rng = np.random.default_rng(11)
  q = rng.standard_normal((2, 2, 30, 8)).astype(np.float32)
  k = rng.standard_normal((2, 2, 30, 8)).astype(np.float32)
  valid = np.ones((2, 30), bool)
  valid[0, 20:] = False
  valid[1, [3, 17]] = False
  got = np.asarray(attention_token_importance(jnp.asarray(q), jnp.asarray(k), jnp.asarray(valid),
                                              block_size=block))
  np.testing.assert_allclose(got, _dense(q, k, key_valid=valid), rtol=1e-4, atol=1e-5)
  assert np.all(got[~valid] == 0)
  np.testing.assert_allclose(got.sum(-1), 2 * 30, rtol=1e-4)  # queries still spread their one


def test_token_weights_over_valid_tokens_only():
  s = jnp.array([[1.0, 3.0, 0.0, 2.0], [4.0, 0.0, 4.0, 4.0]])
  valid = jnp.array([[True, True, False, True], [True, False, True, True]])
  # Min and max over the valid tokens (the masked 0 would otherwise be the minimum).
  np.testing.assert_allclose(token_weights(s, valid=valid),
                             [[0.5, 1.0, 0.0, 0.75], [1.0, 0.0, 1.0, 1.0]])


def test_scale_bf16_and_peaked_logits():
  rng = np.random.default_rng(5)
  q = rng.standard_normal((1, 2, 40, 16)).astype(np.float32)
  k = rng.standard_normal((1, 2, 45, 16)).astype(np.float32)
  got = attention_token_importance(jnp.asarray(q), jnp.asarray(k), block_size=16, scale=3.0)
  np.testing.assert_allclose(got, _dense(q, k, 3.0), rtol=1e-4, atol=1e-4)  # |logits| ~ 50
  qb, kb = jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)
  got = attention_token_importance(qb, kb, block_size=16)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _dense(np.asarray(qb, np.float32), np.asarray(kb, np.float32)),
                             rtol=1e-4, atol=1e-4)


def _largest_intermediate(jaxpr) -> int:
  biggest = 0

  def walk(jx):
    nonlocal biggest
    for eqn in jx.eqns:
      for v in eqn.outvars:
        biggest = max(biggest, int(np.prod(getattr(v.aval, "shape", ()))))
      for p in eqn.params.values():
        for inner in p if isinstance(p, (tuple, list)) else (p,):
          inner = getattr(inner, "jaxpr", inner)  # ClosedJaxpr → Jaxpr
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jaxpr.jaxpr)
  return biggest


def test_cogvideox_length_never_materialises_the_map():
  n, h, block = 17_776, 2, 512  # CogVideoX-2B: 17,550 video + 226 text tokens
  fn = jax.jit(lambda q, k: attention_token_importance(q, k, block_size=block))
  spec = jax.ShapeDtypeStruct((1, h, n, 64), jnp.float32)
  biggest = _largest_intermediate(jax.make_jaxpr(fn)(spec, spec))
  assert h * block * block <= biggest < n * n / 50  # tile-sized; the walk reached the loops
  q = jax.random.normal(jax.random.key(0), (1, h, n, 64))
  k = jax.random.normal(jax.random.key(1), (1, h, n, 64)) * 2
  compiled = fn.lower(q, k).compile()
  stats = compiled.memory_analysis()
  if stats is not None:  # one head's f32 map alone would be n² · 4 B = 1.26 GB
    assert stats.temp_size_in_bytes < n * n * 4 / 20, stats
  got = np.asarray(compiled(q, k))
  np.testing.assert_allclose(got.sum(), h * n, rtol=1e-4)
  # Exact reference for the first 512 queries over all keys (rows are independent).
  part = np.asarray(attention_token_importance(q[:, :, :512], k, block_size=block))
  np.testing.assert_allclose(part, _dense(np.asarray(q[:, :, :512]), np.asarray(k)),
                             rtol=1e-3, atol=1e-5)


def test_token_weights_and_loss():
  s = jnp.array([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
  np.testing.assert_allclose(token_weights(s), [[0.5, 1.0, 0.75], [1.0, 1.0, 1.0]])
  np.testing.assert_allclose(token_weights(s, lam_min=0.2, lam_max=2.0)[0], [0.2, 2.0, 1.1])
  assert np.all(np.isfinite(jax.grad(lambda s: token_weights(s).sum())(s)))
  y = jnp.zeros((1, 3, 2))
  yq = jnp.array([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
  w = jnp.array([[0.5, 1.0, 0.75]])
  np.testing.assert_allclose(weighted_token_mse(y, yq, w), (0.5 * 1 + 1.0 * 4 + 0.75 * 2) / 3)
  rng = np.random.default_rng(6)
  a, b, lam = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 4)), rng.random((2, 5))
  expected = np.mean([np.sum(lam[i] * np.sum((a[i] - b[i]) ** 2, -1)) / 5 for i in range(2)])
  np.testing.assert_allclose(weighted_token_mse(jnp.asarray(a), jnp.asarray(b), jnp.asarray(lam)),
                             expected, rtol=1e-5)
  np.testing.assert_allclose(weighted_token_mse(jnp.asarray(a), jnp.asarray(b), jnp.ones((2, 5))),
                             np.mean(np.sum((a - b) ** 2, -1)), rtol=1e-5)  # λ = 1: plain MSE
