"""Salience by HVP power iteration against np.linalg; selection rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2q_jax.calibration import (diffusion_salience, layer_salience, minmax_normalize,
                                 quant_salience, salient_scores, select_indices)


def _with_spectrum(rng, singular_values, n):
  d = len(singular_values)
  u, _ = np.linalg.qr(rng.standard_normal((n, d)))
  v, _ = np.linalg.qr(rng.standard_normal((d, d)))
  return (u * singular_values) @ v.T


def _inputs():
  rng = np.random.default_rng(0)
  yield "gaussian", rng.standard_normal((200, 48))
  yield "ill-conditioned", rng.standard_normal((30, 64)) * np.logspace(-3, 1, 64)
  yield "rank 3", rng.standard_normal((100, 3)) @ rng.standard_normal((3, 40))
  yield "rank 1", np.outer(rng.standard_normal(50), rng.standard_normal(20))
  yield "fewer tokens than channels", rng.standard_normal((5, 128))
  yield "outlier channel", rng.standard_normal((64, 96)) * np.r_[30.0, np.ones(95)]
  # Slow convergence: eigen-ratio 0.98 behind fast-dying components, and a
  # smooth spectrum; stopping on a small Rayleigh-quotient step alone fails these.
  yield "small gap", _with_spectrum(rng, np.r_[1.0, 0.99, np.linspace(0.5, 0.1, 62)], 80)
  yield "flat top", _with_spectrum(rng, np.linspace(1.0, 0.9, 64), 80)
  yield "tall gaussian", rng.standard_normal((4000, 256))


@pytest.mark.parametrize("name,x", list(_inputs()), ids=[n for n, _ in _inputs()])
def test_top_eigenvalue_matches_numpy(name, x):
  expected = np.linalg.norm(x.T @ x, 2)
  got = float(quant_salience(jnp.asarray(x, jnp.float32)))
  assert abs(got - expected) / expected < 1e-3, name
  assert got <= expected * (1 + 1e-5)  # a Rayleigh quotient: a lower bound


def test_leading_axes_are_tokens_and_zero_input():
  x = np.random.default_rng(3).standard_normal((2, 7, 5, 16))
  flat = x.reshape(-1, 16)
  got = float(quant_salience(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(got, np.linalg.norm(flat.T @ flat, 2), rtol=1e-3)
  assert float(quant_salience(jnp.zeros((4, 8)))) == 0.0


def test_iteration_cap_and_jit():
  x = jnp.asarray(np.random.default_rng(4).standard_normal((40, 32)), jnp.float32)
  expected = np.linalg.norm(np.asarray(x).T @ np.asarray(x), 2)
  assert float(quant_salience(x, num_iters=1)) < 0.9 * expected  # one step: far from converged
  np.testing.assert_allclose(jax.jit(quant_salience)(x), expected, rtol=1e-3)


def test_never_forms_the_d_by_d_matrix():
  d = 2048
  x = jax.ShapeDtypeStruct((16, d), jnp.float32)
  # The printed jaxpr includes the while-loop body; a (d, d) value would show as f32[2048,2048].
  assert "2048,2048" in str(jax.make_jaxpr(lambda x: x.T @ x)(x))  # the check can fail
  assert "2048,2048" not in str(jax.make_jaxpr(lambda x: quant_salience(x))(x))


def test_layer_variant_sums_layers():
  rng = np.random.default_rng(1)
  xs = {"a": rng.standard_normal((40, 16)), "b": rng.standard_normal((2, 20, 24)) * 2}
  expected = sum(np.linalg.norm(x.reshape(-1, x.shape[-1]).T @ x.reshape(-1, x.shape[-1]), 2)
                 for x in xs.values())
  got = float(layer_salience({k: jnp.asarray(v, jnp.float32) for k, v in xs.items()}))
  assert abs(got - expected) / expected < 1e-3


def test_diffusion_salience():
  x_t = np.ones((2, 3, 4))
  x_prev = np.stack([np.ones((3, 4)) * 0.5, np.ones((3, 4))])
  np.testing.assert_allclose(diffusion_salience(jnp.asarray(x_t), jnp.asarray(x_prev)),
                             [0.25, 0.0])
  rng = np.random.default_rng(2)
  a, b = rng.standard_normal((3, 2, 5, 6)), rng.standard_normal((3, 2, 5, 6))
  expected = [np.sum((a[i] - b[i]) ** 2) / np.sum(a[i] ** 2) for i in range(3)]
  np.testing.assert_allclose(diffusion_salience(jnp.asarray(a), jnp.asarray(b)), expected,
                             rtol=1e-5)


def test_normalisation_and_product():
  np.testing.assert_allclose(minmax_normalize(np.array([2.0, 4, 3])), [0, 1, 0.5])
  np.testing.assert_array_equal(minmax_normalize(np.full(4, 7.0)), np.ones(4))  # no NaN
  scores = salient_scores(np.array([1.0, 5, 3, 2, 4]), np.array([10.0, 1, 10, 1, 10]))
  np.testing.assert_allclose(scores, [0, 0, 0.5, 0, 0.75])
  np.testing.assert_array_equal(salient_scores(np.ones(3), np.ones(3)), np.ones(3))
  np.testing.assert_allclose(salient_scores(np.ones(3), np.array([1.0, 3, 2])), [0, 1, 0.5])
  with pytest.raises(ValueError, match="finite"):
    minmax_normalize(np.array([1.0, np.nan]))


def test_selection_methods():
  scores = np.array([0.0, 0, 0.5, 0, 0.75])
  np.testing.assert_array_equal(select_indices(scores, 2), [2, 4])
  np.testing.assert_array_equal(select_indices(np.ones(5), 2), [0, 1])  # ties: pool order
  np.testing.assert_array_equal(select_indices(None, 3, "uniform", pool_size=9), [0, 4, 8])
  np.testing.assert_array_equal(select_indices(scores, 5, "uniform"), np.arange(5))
  for n in range(1, 40):
    for m in range(1, n + 1):
      idx = select_indices(None, m, "uniform", pool_size=n)
      assert len(np.unique(idx)) == m and idx[0] == 0 and idx.max() <= n - 1
  a = select_indices(None, 4, "random", pool_size=20, seed=1)
  np.testing.assert_array_equal(a, select_indices(None, 4, "random", pool_size=20, seed=1))
  assert len(set(a)) == 4 and np.all(np.diff(a) > 0)
  assert not np.array_equal(a, select_indices(None, 4, "random", pool_size=20, seed=2))
  np.testing.assert_array_equal(select_indices(None, 20, "random", pool_size=20), np.arange(20))


@pytest.mark.parametrize("args,kwargs,match", [
    ((np.ones(5), 6), {}, "cannot select"),
    ((np.ones(5), 0), {}, "cannot select"),
    ((np.ones(5), 2, "best"), {}, "selection method"),
    ((None, 2), {"pool_size": 5}, "needs scores"),
    ((None, 2, "uniform"), {}, "pool_size"),
    ((np.array([1.0, np.inf, 0.0]), 2), {}, "finite"),
    ((np.ones(5), 2.5), {}, "integer"),
])
def test_selection_errors(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    select_indices(*args, **kwargs)
