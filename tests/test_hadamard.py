"""Hadamard-type rotations are orthogonal, and folding them into linear layers is exact."""
import jax.numpy as jnp
import numpy as np
import pytest

from s2q_jax.quant.rotation import hadamard_matrix, rotate_linear, rotate_output


@pytest.mark.parametrize("n", [1, 2, 3, 12, 64, 96, 128, 15, 1920, 3072])
def test_orthogonal_symmetric_and_flat(n):
  h = np.asarray(hadamard_matrix(n), np.float64)
  assert h.shape == (n, n)
  np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
  np.testing.assert_array_equal(h, h.T)  # symmetric: its own inverse
  assert np.abs(h).max() <= np.sqrt(2 / n) + 1e-7  # near-equal magnitudes: spreads outliers


@pytest.mark.parametrize("n", [1, 2, 8, 256])
def test_powers_of_two_are_sylvester(n):
  h = np.asarray(hadamard_matrix(n), np.float64) * np.sqrt(n)
  np.testing.assert_allclose(np.abs(h), 1.0, atol=1e-6)
  if n > 1:  # Sylvester recursion: H_2n = [[H, H], [H, -H]]
    half = h[: n // 2, : n // 2]
    np.testing.assert_allclose(h[n // 2:, n // 2:], -half, atol=1e-6)
    np.testing.assert_allclose(h[: n // 2, n // 2:], half, atol=1e-6)


def test_spreads_an_outlier_channel():
  x = np.zeros(96)
  x[7] = 100.0
  rotated = x @ np.asarray(hadamard_matrix(96), np.float64)
  assert np.abs(rotated).max() < 0.2 * np.abs(x).max()  # one spike becomes 96 small entries
  np.testing.assert_allclose(np.linalg.norm(rotated), 100.0, rtol=1e-6)


def test_input_fold_is_exact():
  rng = np.random.default_rng(0)
  x, w, b = rng.standard_normal((10, 96)), rng.standard_normal((96, 40)), rng.standard_normal(40)
  r = hadamard_matrix(96)
  folded = np.asarray(rotate_linear(jnp.asarray(w, jnp.float32), r), np.float64)
  np.testing.assert_allclose(folded, np.asarray(r, np.float64).T @ w, rtol=1e-5, atol=1e-5)
  y = (x @ np.asarray(r, np.float64)) @ folded + b
  np.testing.assert_allclose(y, x @ w + b, rtol=1e-5, atol=1e-5)
  q, _ = np.linalg.qr(rng.standard_normal((96, 96)))  # any orthogonal matrix folds the same way
  y = (x @ q) @ np.asarray(rotate_linear(jnp.asarray(w), jnp.asarray(q, jnp.float32)))
  np.testing.assert_allclose(y, x @ w, rtol=1e-4, atol=1e-4)


def test_output_then_input_fold_cancels():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((6, 32))
  w1, b1, w2 = rng.standard_normal((32, 48)), rng.standard_normal(48), rng.standard_normal((48, 16))
  r = hadamard_matrix(48)
  w1r, b1r = rotate_output(jnp.asarray(w1), jnp.asarray(b1), r)
  w2r = rotate_linear(jnp.asarray(w2), r)
  hidden = x @ np.asarray(w1r, np.float64) + np.asarray(b1r, np.float64)  # = (x W1 + b1) R
  np.testing.assert_allclose(hidden @ np.asarray(w2r, np.float64), (x @ w1 + b1) @ w2,
                             rtol=1e-4, atol=1e-4)
  w1r, none = rotate_output(jnp.asarray(w1), None, r)
  assert none is None and w1r.dtype == jnp.float32


def test_errors():
  with pytest.raises(ValueError, match="positive integer"):
    hadamard_matrix(0)
  with pytest.raises(ValueError, match="does not match"):
    rotate_linear(jnp.zeros((8, 4)), hadamard_matrix(4))
  with pytest.raises(ValueError, match="does not match"):
    rotate_output(jnp.zeros((8, 4)), None, hadamard_matrix(8))
