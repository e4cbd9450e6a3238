"""Salience by HVP power iteration against np.linalg; selection rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2q_jax.calibration import (diffusion_salience, layer_salience, quant_salience,
                                 salient_scores, select_indices)


def _inputs():
  rng = np.random.default_rng(0)
  yield rng.standard_normal((200, 48))
  yield rng.standard_normal((30, 64)) * np.linspace(0.01, 10, 64)  # ill-conditioned
  yield rng.standard_normal((100, 3)) @ rng.standard_normal((3, 40))  # rank 3
  yield rng.standard_normal((5, 128))  # fewer tokens than channels


@pytest.mark.parametrize("x", list(_inputs()))
def test_top_eigenvalue_matches_numpy(x):
  expected = np.linalg.norm(x.T @ x, 2)
  got = float(quant_salience(jnp.asarray(x, jnp.float32)))
  assert abs(got - expected) / expected < 1e-3


def test_never_forms_the_d_by_d_matrix():
  d = 2048
  x = jnp.ones((16, d))
  # The printed jaxpr includes the while-loop body; a (d, d) value would show as f32[2048,2048].
  assert "2048,2048" in str(jax.make_jaxpr(lambda x: x.T @ x)(x))  # the check can fail
  assert "2048,2048" not in str(jax.make_jaxpr(lambda x: quant_salience(x))(x))


def test_layer_variant_sums_layers():
  rng = np.random.default_rng(1)
  xs = {"a": rng.standard_normal((40, 16)), "b": rng.standard_normal((40, 24)) * 2}
  expected = sum(np.linalg.norm(x.T @ x, 2) for x in xs.values())
  got = float(layer_salience({k: jnp.asarray(v, jnp.float32) for k, v in xs.items()}))
  assert abs(got - expected) / expected < 1e-3


def test_diffusion_salience():
  x_t = np.ones((2, 3, 4))
  x_prev = np.stack([np.ones((3, 4)) * 0.5, np.ones((3, 4))])
  np.testing.assert_allclose(diffusion_salience(jnp.asarray(x_t), jnp.asarray(x_prev)),
                             [0.25, 0.0])


def test_selection_methods():
  scores = salient_scores(np.array([1.0, 5, 3, 2, 4]), np.array([10.0, 1, 10, 1, 10]))
  np.testing.assert_allclose(scores, [0, 0, 0.5, 0, 0.75])
  np.testing.assert_array_equal(select_indices(scores, 2), [2, 4])
  np.testing.assert_array_equal(select_indices(None, 3, "uniform", pool_size=9), [0, 4, 8])
  a = select_indices(None, 4, "random", pool_size=20, seed=1)
  np.testing.assert_array_equal(a, select_indices(None, 4, "random", pool_size=20, seed=1))
  assert len(set(a)) == 4
  with pytest.raises(ValueError, match="cannot select"):
    select_indices(scores, 6)
  with pytest.raises(ValueError, match="selection method"):
    select_indices(scores, 2, "best")
  np.testing.assert_array_equal(salient_scores(np.ones(3), np.ones(3)), np.ones(3))
