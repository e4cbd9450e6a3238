"""Tiled attention token importance against the dense softmax map."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2q_jax.distillation import attention_token_importance, token_weights, weighted_token_mse


def _dense(q, k):
  s = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return p.sum(axis=(1, 2))


@pytest.mark.parametrize("b,h,nq,nk,d,block", [(1, 2, 64, 64, 16, 16), (2, 3, 50, 70, 8, 16),
                                               (1, 1, 7, 130, 32, 64), (2, 2, 33, 33, 16, 128)])
def test_matches_dense_map(b, h, nq, nk, d, block):
  rng = np.random.default_rng(nq + nk)
  q = rng.standard_normal((b, h, nq, d)).astype(np.float32) * 2
  k = rng.standard_normal((b, h, nk, d)).astype(np.float32) * 2
  got = np.asarray(attention_token_importance(jnp.asarray(q), jnp.asarray(k), block_size=block))
  np.testing.assert_allclose(got, _dense(q, k), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got.sum(-1), h * nq, rtol=1e-4)  # every query's row sums to one


def test_cogvideox_length_never_materialises_the_map():
  n, block = 17_776, 512
  q = jax.ShapeDtypeStruct((1, 2, n, 64), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda q, k: attention_token_importance(q, k, block_size=block))(q, q)
  biggest = 0

  def walk(jx):
    nonlocal biggest
    for eqn in jx.eqns:
      for v in eqn.outvars:
        biggest = max(biggest, int(np.prod(getattr(v.aval, "shape", ()) or (1,))))
      for p in eqn.params.values():
        inner = getattr(p, "jaxpr", None)
        if inner is not None:
          walk(getattr(inner, "jaxpr", inner))

  walk(jaxpr.jaxpr)
  assert biggest < n * n / 50  # the largest intermediate is tile-sized, not n × n


def test_token_weights_and_loss():
  s = jnp.array([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
  np.testing.assert_allclose(token_weights(s), [[0.5, 1.0, 0.75], [1.0, 1.0, 1.0]])
  y = jnp.zeros((1, 3, 2))
  yq = jnp.array([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
  w = jnp.array([[0.5, 1.0, 0.75]])
  np.testing.assert_allclose(weighted_token_mse(y, yq, w), (0.5 * 1 + 1.0 * 4 + 0.75 * 2) / 3)
